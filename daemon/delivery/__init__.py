"""Delivery: the protocol models (the only way a message is made), the event bus and the websocket server."""
