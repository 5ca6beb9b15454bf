"""Every message a test client receives from the daemon is checked against the *published* schema
(`docs/protocol.schema.json`), whichever test receives it: the websockets client connections (asyncio and sync)
validate each text frame before handing it over. A message the schema rejects fails the test that received it.
`conftest.py` turns this on for the whole session."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import websockets.asyncio.client
import websockets.sync.client

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "protocol.schema.json").read_text())
_server = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/ServerMessage"})
validated: collections.Counter[str] = collections.Counter()


def check_server_message(text: str) -> dict[str, Any]:
    """Validate one message from the daemon against the published schema; returns it parsed."""
    message = json.loads(text)
    errors = sorted(_server.iter_errors(message), key=lambda e: e.path)
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise AssertionError(f"the daemon sent a message the published schema rejects: {best.message}\n{text[:500]}")
    if "seq" in message:
        assert message["seq"] >= 1, message
    validated[message["type"]] += 1
    return message


def _checked(recv: Any, is_async: bool) -> Any:
    if is_async:

        async def arecv(self: Any, *args: Any, **kwargs: Any) -> Any:
            data = await recv(self, *args, **kwargs)
            if isinstance(data, str):
                check_server_message(data)
            return data

        return arecv

    def srecv(self: Any, *args: Any, **kwargs: Any) -> Any:
        data = recv(self, *args, **kwargs)
        if isinstance(data, str):
            check_server_message(data)
        return data

    return srecv


@pytest.fixture(scope="session", autouse=True)
def validate_every_received_message() -> Iterator[None]:
    a, s = websockets.asyncio.client.ClientConnection, websockets.sync.client.ClientConnection
    a_recv, s_recv = a.recv, s.recv
    a.recv = _checked(a_recv, True)  # type: ignore[method-assign]
    s.recv = _checked(s_recv, False)  # type: ignore[method-assign]
    try:
        yield
    finally:
        a.recv, s.recv = a_recv, s_recv  # type: ignore[method-assign]
