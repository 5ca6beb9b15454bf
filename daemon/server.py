"""The websocket server (protocol v1, `docs/protocol.md`): one handler per connection with a reader and a writer
task, a bounded subscriber queue per client, `/healthz`, token auth, Origin checks and size limits.

A client is never allowed to slow anyone else down: events reach it only through its own queue (overflow policy in
`bus`), and a send that cannot complete within `server.send_timeout_s` (the client stopped reading) aborts its
connection.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import __version__
from .audio import AudioFormatError
from .bus import Filter, Subscriber
from .config import ServerConfig
from .protocol import (PROTOCOL_VERSION, Ask, AudioStart, AudioStop, Cancel, CloseCode, ErrorCode, Hello, Ping,
                       ProtocolError, Subscribe, parse_client_message)
from .sources import RemoteSource

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$")


def _error(code: str, message: str, re: object = None) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "re": re, "time": time.time()}


class WebsocketServer:
    def __init__(self, config: ServerConfig, service: Service) -> None:
        self.config = config
        self.service = service
        self.token = config.resolved_token()
        self._server: Server | None = None
        self.connections: set[ServerConnection] = set()
        self._authed: set[ServerConnection] = set()
        self.rejected = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self) -> None:
        origins: list[Any] = [None]  # no Origin header: not a browser (CLI, satellite)
        origins += self.config.allowed_origins
        if self.config.allow_loopback_origins:
            origins.append(LOOPBACK_ORIGIN)
        c = self.config
        self._server = await serve(
            self._handler, c.host, c.port, process_request=self._process_request, origins=origins,
            max_size=c.max_message_bytes, ping_interval=c.ping_interval_s, ping_timeout=c.ping_timeout_s,
            close_timeout=2, server_header=f"ltu-daemon/{__version__}")

    async def close(self) -> None:
        """Close every connection with 1001 (going away) and stop listening."""
        if self._server is not None:
            self._server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="daemon shutting down")
            await self._server.wait_closed()

    # --- HTTP side ---

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            health = self.service.health()
            status = http.HTTPStatus.OK if health["ready"] else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _json_response(conn, status, health)
        if path != "/":
            return conn.respond(http.HTTPStatus.NOT_FOUND, "websocket endpoint is /, health is /healthz\n")
        auth = request.headers.get("Authorization")
        if self.token is not None and auth is not None:
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                self.rejected += 1
                log.warning("rejected a connection from %s: bad token", conn.remote_address)
                return conn.respond(http.HTTPStatus.UNAUTHORIZED, "bad token\n")
            self._authed.add(conn)
        return None

    # --- websocket side ---

    async def _handler(self, conn: ServerConnection) -> None:
        try:
            if len(self.connections) >= self.config.max_clients:
                await conn.close(CloseCode.FULL, f"server full ({self.config.max_clients} clients)")
                return
            hello = await self._handshake(conn)
            if hello is None:
                return
            self.connections.add(conn)
            sub = self.service.bus.subscribe(self.config.client_queue,
                                             Filter(list(hello.subscribe.streams), list(hello.subscribe.events)))
            await conn.send(json.dumps(self.service.welcome(hello)))
            log.info("client %s (%s) connected", conn.remote_address, hello.client or "unnamed")
            await self._serve(conn, sub)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self._authed.discard(conn)
            self.service.disconnected(conn)
            for remote in self.service.remotes.values():
                await remote.release(conn)

    async def _handshake(self, conn: ServerConnection) -> Hello | None:
        try:
            first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except TimeoutError:
            await conn.close(CloseCode.HANDSHAKE, f"send hello within {self.config.hello_timeout_s:g} s")
            return None
        try:
            if not isinstance(first, str):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "the first message must be a hello text frame")
            msg = parse_client_message(first)
            if not isinstance(msg, Hello):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "the first message must be hello", msg.id)
            if msg.protocol != PROTOCOL_VERSION:
                raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                    f"protocol {msg.protocol} is not supported; this daemon speaks {PROTOCOL_VERSION}",
                                    msg.id)
        except ProtocolError as e:
            await conn.send(json.dumps(_error(e.code, e.message, e.re)))
            await conn.close(CloseCode.HANDSHAKE, e.code)
            return None
        if self.token is not None and conn not in self._authed:
            given = (msg.token or "").encode()
            if not hmac.compare_digest(given, self.token.encode()):
                self.rejected += 1
                log.warning("rejected a connection from %s: %s token", conn.remote_address,
                            "wrong" if msg.token else "no")
                await conn.send(json.dumps(_error(ErrorCode.UNAUTHORIZED, "missing or wrong token", msg.id)))
                await conn.close(CloseCode.UNAUTHORIZED, "unauthorized")
                return None
        return msg

    async def _serve(self, conn: ServerConnection, sub: Subscriber) -> None:
        writer = asyncio.create_task(self._writer(conn, sub))
        reader = asyncio.create_task(self._reader(conn, sub))
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.service.bus.unsubscribe(sub)
            for t in (writer, reader):
                t.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)

    async def _writer(self, conn: ServerConnection, sub: Subscriber) -> None:
        while (event := await sub.get()) is not None:
            try:
                await asyncio.wait_for(conn.send(json.dumps(event)), self.config.send_timeout_s)
            except TimeoutError:
                log.warning("client %s stopped reading for %.0f s: disconnected", conn.remote_address,
                            self.config.send_timeout_s)
                conn.transport.abort()  # it is not reading: a close frame would never get through
                return
        log.warning("client %s fell %d events behind: disconnected (%d)", conn.remote_address, sub.maxsize,
                    CloseCode.SLOW_CONSUMER)
        await conn.close(CloseCode.SLOW_CONSUMER, "too slow: event queue overflowed")

    async def _reader(self, conn: ServerConnection, sub: Subscriber) -> None:
        async for message in conn:
            if isinstance(message, bytes):
                await self._audio(conn, sub, message)
                continue
            if len(message) > self.config.max_control_bytes:
                sub.offer(_error(ErrorCode.TOO_LARGE, f"control messages are limited to "
                                 f"{self.config.max_control_bytes} bytes"), force=True)
                continue
            try:
                msg = parse_client_message(message)
                reply = await self._dispatch(conn, sub, msg)
            except ProtocolError as e:
                sub.offer({**_error(e.code, e.message, e.re), **e.extra}, force=True)
                continue
            if reply is not None:
                sub.offer({**reply, "re": msg.id, "time": time.time()}, force=True)

    async def _dispatch(self, conn: ServerConnection, sub: Subscriber,
                        msg: Hello | Subscribe | AudioStart | AudioStop | Ping | Ask | Cancel) -> dict[str, Any] | None:
        if isinstance(msg, Ask):  # answer events follow from the model worker, to this client only
            self.service.ask(conn, lambda event: sub.offer(event, force=True), msg)
            return None
        if isinstance(msg, Cancel):
            if not self.service.cancel(conn, msg.target):
                raise ProtocolError(ErrorCode.UNKNOWN_QUESTION, f"no question {msg.target!r} in progress", msg.id)
            return {"type": "cancelled", "target": msg.target}
        if isinstance(msg, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already received", msg.id)
        if isinstance(msg, Subscribe):
            sub.filter = Filter(list(msg.streams), list(msg.events))
            return {"type": "subscribed", "streams": list(msg.streams), "events": list(msg.events)}
        if isinstance(msg, AudioStart):
            remote = self._remote(msg.stream, msg.id)
            try:
                await remote.claim(conn, msg.rate, msg.channels, msg.format)
            except PermissionError as e:
                raise ProtocolError(ErrorCode.STREAM_BUSY, str(e), msg.id) from None
            return {"type": "audio.ready", "stream": msg.stream}
        if isinstance(msg, AudioStop):
            for remote in self.service.remotes.values():
                await remote.release(conn)
            return {"type": "audio.stopped"}
        return {"type": "pong"}

    def _remote(self, name: str, re: object) -> RemoteSource:
        remote = self.service.remotes.get(name)
        if remote is None:
            known = ", ".join(sorted(self.service.remotes)) or "none configured"
            raise ProtocolError(ErrorCode.UNKNOWN_STREAM,
                                f"{name!r} is not a remote stream (remote streams: {known})", re)
        return remote

    async def _audio(self, conn: ServerConnection, sub: Subscriber, data: bytes) -> None:
        remote = next((r for r in self.service.remotes.values() if r.owner is conn), None)
        if remote is None:
            sub.offer(_error(ErrorCode.NOT_STARTED, "send audio.start before binary audio frames"), force=True)
            return
        try:
            await remote.push(conn, data)
        except AudioFormatError as e:
            sub.offer(_error(ErrorCode.BAD_AUDIO, f"frame ignored: {e}"), force=True)


def _json_response(conn: ServerConnection, status: http.HTTPStatus, body: dict[str, Any]) -> Response:
    response = conn.respond(status, json.dumps(body, indent=1) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
