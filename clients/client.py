"""An async client for the ltu-daemon websocket protocol v1 (`docs/protocol.md`).

    async with DaemonClient("ws://127.0.0.1:8765", events=["transcript.*"]) as client:
        async for event in client:
            print(event["type"], event.get("text"))

Satellites push audio: `await client.start_audio("porch", rate=16000)`, then `await client.send_audio(pcm_bytes)`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

PROTOCOL_VERSION = 1


class DaemonError(Exception):
    """The daemon answered with an error event; `code` is its error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class DaemonClient:
    def __init__(
        self,
        url: str = "ws://127.0.0.1:8765",
        *,
        token: str | None = None,
        streams: list[str] | None = None,
        events: list[str] | None = None,
        name: str = "ltu-client",
        open_timeout: float = 10,
    ) -> None:
        self.url, self.token, self.name = url, token, name
        self.streams, self.events = streams or ["*"], events or ["*"]
        self.open_timeout = open_timeout
        self.ws: ClientConnection | None = None
        self.welcome: dict[str, Any] = {}
        self._next_id = 0

    async def __aenter__(self) -> DaemonClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> dict[str, Any]:
        """Open the connection, say hello, and return the welcome. Raises `DaemonError` if refused."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.ws = await connect(self.url, additional_headers=headers, open_timeout=self.open_timeout, max_size=None)
        await self._send(
            {
                "type": "hello",
                "protocol": PROTOCOL_VERSION,
                "client": self.name,
                "subscribe": {"streams": self.streams, "events": self.events},
            }
        )
        reply = json.loads(await self.ws.recv())
        if reply.get("type") == "error":
            raise DaemonError(reply["code"], reply["message"])
        self.welcome = reply
        return reply

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    @property
    def last_id(self) -> str:
        """The id of the last message sent (`c<n>`): what `cancel` takes for a question."""
        return f"c{self._next_id}"

    async def _send(self, message: dict[str, Any]) -> str:
        assert self.ws is not None, "connect() first"
        self._next_id += 1
        message.setdefault("id", f"c{self._next_id}")
        await self.ws.send(json.dumps(message))
        return str(message["id"])

    async def subscribe(self, streams: list[str] | None = None, events: list[str] | None = None) -> str:
        """Replace the subscription; the daemon answers `subscribed` (returns the message id)."""
        return await self._send({"type": "subscribe", "streams": streams or ["*"], "events": events or ["*"]})

    async def start_audio(self, stream: str, rate: int = 16000, channels: int = 1, fmt: str = "s16le") -> str:
        """Claim a remote stream; binary frames sent afterwards are its audio (`audio.ready` confirms)."""
        return await self._send(
            {"type": "audio.start", "stream": stream, "rate": rate, "channels": channels, "format": fmt}
        )

    async def send_audio(self, pcm: bytes) -> None:
        assert self.ws is not None, "connect() first"
        await self.ws.send(pcm)

    async def stop_audio(self) -> str:
        return await self._send({"type": "audio.stop"})

    async def ask(
        self,
        question: str,
        *,
        stream: str | None = None,
        window: str | None = None,
        at: float | None = None,
        **options: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Ask about a window (default: the newest) and yield this question's events: `answer.start`, then
        `answer.delta`s, then `answer.done`, or a single `error` (e.g. `busy` with `retry_after_s`). Other events
        arriving meanwhile are skipped (use a client subscribed to nothing, or iterate it separately).
        `options`: scope (live, history, auto), since, until (Unix times), max_new_tokens, greedy, temperature,
        top_p, top_k, repetition_penalty, seed."""
        message: dict[str, Any] = {"type": "ask", "question": question, **options}
        for key, value in (("stream", stream), ("window", window), ("at", at)):
            if value is not None:
                message[key] = value
        qid = await self._send(message)
        while True:
            event = await self.recv()
            if event.get("re") != qid:
                continue
            yield event
            if event["type"] in ("answer.done", "error"):
                return

    async def search(self, query: str = "", **options: Any) -> dict[str, Any]:
        """`history.search`: the reply (`history.results` with `hits`), or raises `DaemonError`.
        `options`: since, until (Unix times), streams (globs), limit, mode (combined, text, vector, time)."""
        qid = await self._send({"type": "history.search", "query": query, **options})
        while True:
            event = await self.recv()
            if event.get("re") == qid:
                if event["type"] == "error":
                    raise DaemonError(event["code"], event["message"])
                return event

    async def cancel(self, question_id: str) -> str:
        return await self._send({"type": "cancel", "target": question_id})

    async def recv(self) -> dict[str, Any]:
        """The next message from the daemon (events, replies and errors alike)."""
        assert self.ws is not None, "connect() first"
        return json.loads(await self.ws.recv())

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        """Every message until the daemon closes the connection."""
        assert self.ws is not None, "connect() first"
        async for raw in self.ws:
            yield json.loads(raw)
