"""Memory: the history store (SQLite), retrieval for questions about the past, digests and alert rules."""
