"""The websocket server (protocol v1, `docs/protocol.md`): one handler per connection with a reader and a writer
task, a bounded subscriber queue per client, `/healthz`, token auth, Origin and Host checks, size, depth and rate
limits.

A client is never allowed to slow anyone else down: events reach it only through its own queue (overflow policy in
`bus`), and a send that cannot complete within `server.send_timeout_s` (the client stopped reading) aborts its
connection. Every TCP connection counts against `server.max_connections` from the moment it is accepted (one over
is aborted at once), must finish its HTTP request within `server.open_timeout_s`, and holds no state on any
rejection path. A satellite's audio is paced to real time (`server.max_audio_ahead_s`, `server.audio_frames_per_s`):
its socket is read more slowly, nothing is dropped. The server receives narrow collaborators, never the service:
the bus, the remote streams, the question desk (None without a model), a `welcome` builder and a `health` reporter.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import http
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import __version__
from ..capture.audio import AudioFormatError
from ..capture.sources import NotReady, RemoteStreams
from ..config import ServerConfig
from .bus import EventBus, Filter, Subscriber
from .events import (
    EVENT_TYPES,
    AlertAdded,
    AlertRemoved,
    AlertRules,
    Answer,
    AudioReady,
    AudioStopped,
    Cancelled,
    ErrorEvent,
    HistoryResults,
    Labelled,
    LabelRemoved,
    Labels,
    LearnRolledBack,
    LearnStarted,
    Pong,
    ServerMessage,
    StreamInfo,
    Subscribed,
    TimelineData,
    Welcome,
)
from .floodlog import EveryFew
from .hosts import host_allowed, refusal
from .protocol import (
    AlertAdd,
    AlertList,
    AlertRemove,
    Ask,
    AudioStart,
    AudioStop,
    Cancel,
    ClientMessage,
    Hello,
    HistorySearch,
    Label,
    LabelList,
    LabelRemove,
    Learn,
    LearnRollback,
    ProtocolError,
    Subscribe,
    Timeline,
    parse_client_message,
)
from .wire import PROTOCOL_VERSION, CloseCode, ErrorCode, MessageId

log = logging.getLogger(__name__)

LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$")
NOT_READY_RETRY_S = 1.0
REFUSAL_WINDOW_S = 10.0  # a client refused more than messages_burst times within this is closed (1008)


# The web page (daemon/web): plain files, served as they are. The policy allows nothing but this origin's own
# script, style and websocket, so even text that slipped into the page as HTML could not run.
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),  # what a browser asks for when a page names no icon
}
WEB_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; media-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _web_page() -> dict[str, tuple[str, bytes]]:
    """Path → (content type, body) of the page's files, read once from the package."""
    folder = resources.files("daemon") / "web"
    return {path: (kind, (folder / name).read_bytes()) for path, (name, kind) in WEB_FILES.items()}


class Desk(Protocol):
    """What the server needs from the question desk (`understanding.desk.QuestionDesk`)."""

    async def ask(self, owner: object, send: Callable[[Answer], None], msg: Ask) -> None: ...
    def cancel(self, owner: object, tag: MessageId) -> bool: ...
    def disconnected(self, owner: object) -> None: ...


class Memory(Protocol):
    """What the server needs from the memory desk (`memory.desk.MemoryDesk`)."""

    async def search(self, msg: HistorySearch) -> HistoryResults: ...
    async def timeline(self, msg: Timeline) -> TimelineData: ...
    def rules(self, msg: AlertList) -> AlertRules: ...
    def add(self, msg: AlertAdd) -> AlertAdded: ...
    def remove(self, msg: AlertRemove) -> AlertRemoved: ...


class Learning(Protocol):
    """What the server needs from the learning desk (`learning.desk.LearnDesk`)."""

    async def label(self, msg: Label) -> Labelled: ...
    async def list(self, msg: LabelList) -> Labels: ...
    async def remove(self, msg: LabelRemove) -> LabelRemoved: ...
    async def learn(self, msg: Learn) -> LearnStarted: ...
    async def rollback(self, msg: LearnRollback) -> LearnRolledBack: ...


@dataclass(frozen=True)
class Identity:
    """What `welcome` says about this daemon besides the streams."""

    demo: bool
    model: bool


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. `take()` spends one, or says how long until one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 if a token was spent, else the seconds until the next one."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _capped(limit: int, refused: Callable[[], None]) -> type[ServerConnection]:
    """A connection class that aborts itself at accept when `limit` connections (handshakes included) are open."""

    class Capped(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if len(self.server.handler_tasks) > limit:
                refused()
                self.transport.abort()  # before reading a byte: its handshake fails at once and its task ends

    return Capped


class Client:
    """One connection after its hello: its queue, its limits and what it owns."""

    def __init__(self, conn: ServerConnection, sub: Subscriber, config: ServerConfig, name: str) -> None:
        self.conn, self.sub, self.name = conn, sub, name
        self.messages = TokenBucket(config.messages_per_s, config.messages_burst)
        self.questions = TokenBucket(config.questions_per_s, config.questions_burst)
        self.frames = TokenBucket(config.audio_frames_per_s, max(1, int(config.audio_frames_per_s)))
        self.closed = asyncio.ensure_future(conn.wait_closed())  # ends a satellite's pacing wait at once
        self.refusals: collections.deque[float] = collections.deque()  # when messages were refused (monotonic)

    def __repr__(self) -> str:
        host, port = self.conn.remote_address[:2] if self.conn.remote_address else ("?", 0)
        return f"{host}:{port}" + (f" ({self.name})" if self.name else "")


class WebsocketServer:
    def __init__(
        self,
        config: ServerConfig,
        bus: EventBus,
        remotes: RemoteStreams,
        desk: Desk | None,
        memory: Memory,
        streams: Callable[[], list[StreamInfo]],
        identity: Identity,
        health: Callable[[], dict[str, Any]],
        extra_routes: dict[str, Callable[[], tuple[str, bytes]]] | None = None,
        clips: Callable[[str], bytes | None] | None = None,
        learning: Learning | None = None,
    ) -> None:
        """`extra_routes`: GET paths answered over HTTP, each by a function giving (content type, body); `clips`:
        an alert clip's WAV bytes by file name (None: no such clip), served at /clips/<name> with the token;
        `learning`: the learning desk (None: `learn.enabled = false`)."""
        self.config = config
        self.learning = learning
        self.bus, self.remotes, self.desk, self.memory = bus, remotes, desk, memory
        self.routes = extra_routes or {}
        self.clips = clips
        self.web = _web_page() if config.web else {}
        self.streams, self.identity, self.health = streams, identity, health
        self.token = config.resolved_token()
        self._server: Server | None = None
        self.connections: set[ServerConnection] = set()  # websocket connections: what max_clients bounds
        self.clients = 0  # connections past their hello
        self.rejected: collections.Counter[str] = collections.Counter()
        self._log = EveryFew(log)  # refusals: a flood of bad connections logs a line per 10 s, with a count
        self._info = EveryFew(log, level=logging.INFO)

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
            self._handler,
            c.host,
            c.port,
            process_request=self._process_request,
            origins=origins,
            max_size=c.max_message_bytes,
            ping_interval=c.ping_interval_s,
            ping_timeout=c.ping_timeout_s,
            open_timeout=c.open_timeout_s,
            close_timeout=2,
            server_header=f"ltu-daemon/{__version__}",
            create_connection=_capped(c.max_connections, self._refused_at_accept),
        )

    def _refused_at_accept(self) -> None:
        self.rejected["connections"] += 1
        self._log.warn(
            "connections",
            "refused a connection at accept: server.max_connections = %d are open",
            self.config.max_connections,
        )

    async def close(self) -> None:
        """Close every connection with 1001 (going away) and stop listening."""
        if self._server is not None:
            self._server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="daemon shutting down")
            await self._server.wait_closed()

    def stats(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "connections": len(self.connections),
            "rejected_connections": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
        }

    # --- HTTP side ---

    def _authorized(self, request: Request) -> bool | None:
        """Whether the request's `Authorization: Bearer` header holds the token (None: no header sent)."""
        auth = request.headers.get("Authorization")
        if auth is None or self.token is None:
            return None
        scheme, _, given = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        host = request.headers.get("Host")
        if not host_allowed(host, self.config.allowed_hosts):
            self.rejected["host"] += 1
            self._log.warn("host", "refused a request for Host %r (server.allowed_hosts)", (host or "")[:80])
            return conn.respond(http.HTTPStatus.FORBIDDEN, refusal(host))
        authorized = self._authorized(request)
        if path == "/healthz":  # with a token, what is public is only whether the daemon lives and is ready
            health = self.health()
            status = http.HTTPStatus.OK if health["ready"] else http.HTTPStatus.SERVICE_UNAVAILABLE
            public = self.token is None or authorized
            return _json_response(conn, status, health if public else {k: health[k] for k in ("live", "ready")})
        if path.startswith("/clips/") and self.clips is not None:
            if self.token is not None and not authorized:
                self.rejected["unauthorized"] += 1
                return conn.respond(http.HTTPStatus.UNAUTHORIZED, "send 'Authorization: Bearer <server.token>'\n")
            clip = self.clips(path.removeprefix("/clips/"))  # a name check, then one small bounded file read
            if clip is None:
                return conn.respond(http.HTTPStatus.NOT_FOUND, "no such clip\n")
            return _body(conn, "audio/wav", clip)
        if path in self.routes:
            if self.token is not None and not authorized:
                self.rejected["unauthorized"] += 1
                return conn.respond(http.HTTPStatus.UNAUTHORIZED, "send 'Authorization: Bearer <server.token>'\n")
            return _body(conn, *self.routes[path]())
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if path in self.web and not upgrade:  # a browser asking for the page (the websocket is also at /)
            response = _body(conn, *self.web[path])
            for name, value in WEB_HEADERS.items():
                response.headers[name] = value
            return response
        if path != "/":
            known = ", ".join(["/healthz", *self.routes, *(p for p in self.web if p != "/")])
            return conn.respond(http.HTTPStatus.NOT_FOUND, f"websocket endpoint is /; also {known}\n")
        if authorized is False:
            self.rejected["unauthorized"] += 1
            self._log.warn("unauthorized", "rejected a connection from %s: bad token", _peer(conn))
            return conn.respond(http.HTTPStatus.UNAUTHORIZED, "bad token\n")
        return None

    # --- websocket side ---

    async def _handler(self, conn: ServerConnection) -> None:
        # Counted before the first await: connections that open together cannot all squeeze under the limit.
        if len(self.connections) >= self.config.max_clients:
            self.rejected["full"] += 1
            self._log.warn("full", "refused %s: server full (%d clients)", _peer(conn), self.config.max_clients)
            await conn.close(CloseCode.FULL, f"server full ({self.config.max_clients} clients)")
            return
        self.connections.add(conn)
        client: Client | None = None
        try:
            hello = await self._handshake(conn)
            if hello is None:
                return
            sub = self.bus.subscribe(
                self.config.client_queue, Filter(list(hello.subscribe.streams), list(hello.subscribe.events))
            )
            client = Client(conn, sub, self.config, hello.client)
            self.clients += 1
            sub.send(
                Welcome(
                    re=hello.id,
                    protocol=PROTOCOL_VERSION,
                    server=f"ltu-daemon {__version__}",
                    streams=self.streams(),
                    events=list(EVENT_TYPES),
                    subscribe=hello.subscribe,
                    demo=self.identity.demo,
                    model=self.identity.model,
                )
            )
            log.info("client %r connected", client)
            await self._serve(client)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            if client is not None:
                client.closed.cancel()
                self.clients -= 1
                self.bus.unsubscribe(client.sub)
                if self.desk is not None:
                    self.desk.disconnected(client)
                await self.remotes.release(client)
                log.info("client %r disconnected: %s", client, _close_reason(conn))

    async def _handshake(self, conn: ServerConnection) -> Hello | None:
        try:
            first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except TimeoutError:
            self.rejected["handshake"] += 1
            self._info.warn("no hello", "closed %s: no hello within %g s", _peer(conn), self.config.hello_timeout_s)
            await conn.close(CloseCode.HANDSHAKE, f"send hello within {self.config.hello_timeout_s:g} s")
            return None
        try:
            if not isinstance(first, str):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "the first message must be a hello text frame")
            if len(first) > self.config.max_control_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"control messages are limited to {self.config.max_control_bytes} bytes"
                )
            msg = parse_client_message(first)
            if not isinstance(msg, Hello):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "the first message must be hello", msg.id)
            if msg.protocol != PROTOCOL_VERSION:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"protocol {msg.protocol} is not supported; this daemon speaks {PROTOCOL_VERSION}",
                    msg.id,
                )
        except ProtocolError as e:
            self.rejected["handshake"] += 1
            self._info.warn("handshake", "closed %s: handshake failed: %s: %s", _peer(conn), e.code, e.message)
            await conn.send(e.event().model_dump_json())
            await conn.close(CloseCode.HANDSHAKE, str(e.code))
            return None
        if (
            self.token is not None
            and not (conn.request is not None and self._authorized(conn.request))  # the upgrade's header
            and not hmac.compare_digest((msg.token or "").encode(), self.token.encode())
        ):
            self.rejected["unauthorized"] += 1
            log.warning("rejected a connection from %s: %s token", _peer(conn), "wrong" if msg.token else "no")
            await conn.send(
                ErrorEvent(code=ErrorCode.UNAUTHORIZED, message="missing or wrong token", re=msg.id).model_dump_json()
            )
            await conn.close(CloseCode.UNAUTHORIZED, "unauthorized")
            return None
        return msg

    async def _serve(self, client: Client) -> None:
        writer = asyncio.create_task(self._writer(client), name="writer")
        reader = asyncio.create_task(self._reader(client), name="reader")
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (writer, reader):
                t.cancel()
            for t, outcome in zip(
                (writer, reader), await asyncio.gather(writer, reader, return_exceptions=True), strict=True
            ):
                if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionClosed):
                    log.error("client %r: %s task failed", client, t.get_name(), exc_info=outcome)
                    await client.conn.close(CloseCode.INTERNAL, "internal error")

    async def _writer(self, client: Client) -> None:
        conn = client.conn
        while (text := await client.sub.get()) is not None:
            try:
                await asyncio.wait_for(conn.send(text), self.config.send_timeout_s)
            except TimeoutError:
                log.warning("client %r stopped reading for %.0f s: disconnected", client, self.config.send_timeout_s)
                conn.transport.abort()  # it is not reading: a close frame would never get through
                return
        log.warning(
            "client %r fell %d messages behind: disconnected (%d)", client, client.sub.maxsize, CloseCode.SLOW_CONSUMER
        )
        await conn.close(CloseCode.SLOW_CONSUMER, "too slow: event queue overflowed")

    async def _reader(self, client: Client) -> None:
        async for message in client.conn:
            if isinstance(message, bytes):
                await self._audio(client, message)
                continue
            try:
                reply = await self._message(client, message)
            except ProtocolError as e:
                client.sub.send(e.event())
                if e.code == ErrorCode.RATE_LIMITED and len(client.refusals) > self.config.messages_burst:
                    log.warning(
                        "client %r kept sending over its rate limit: disconnected (%d)", client, CloseCode.POLICY
                    )
                    await client.conn.close(CloseCode.POLICY, "rate limit exceeded")
                    return
                continue
            if reply is not None:
                client.sub.send(reply)

    async def _message(self, client: Client, text: str) -> ServerMessage | None:
        """Handle one text frame; its reply (None: the reply comes later, e.g. answer events). Raises
        `ProtocolError` with the message's id in `re`."""
        if len(text) > self.config.max_control_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"control messages are limited to {self.config.max_control_bytes} bytes"
            )
        wait = client.messages.take()
        try:
            msg = parse_client_message(text)
        except ProtocolError as e:
            if wait:
                raise self._refuse(client, wait, "messages", e.re) from None
            raise
        if not wait and isinstance(msg, Ask):
            wait = client.questions.take()
            if wait:
                raise self._refuse(client, wait, "questions", msg.id)
        if wait:
            raise self._refuse(client, wait, "messages", msg.id)
        try:
            return await self._dispatch(client, msg)
        except ProtocolError:
            raise
        except Exception as e:  # a bug: the client still gets an answer it can match, and we get the traceback
            log.exception("client %r: handling %s failed", client, msg.type)
            raise ProtocolError(
                ErrorCode.INTERNAL, f"internal error handling {msg.type}: {type(e).__name__}", msg.id
            ) from e

    def _refuse(self, client: Client, wait: float, what: str, re: MessageId | None) -> ProtocolError:
        now = time.monotonic()
        client.refusals.append(now)
        while client.refusals[0] < now - REFUSAL_WINDOW_S:
            client.refusals.popleft()
        limit = (
            f"{self.config.questions_per_s:g} questions/s (server.questions_per_s)"
            if what == "questions"
            else f"{self.config.messages_per_s:g} messages/s (server.messages_per_s)"
        )
        return ProtocolError(
            ErrorCode.RATE_LIMITED, f"too many {what}: the limit is {limit}", re, retry_after_s=round(wait, 3)
        )

    async def _dispatch(self, client: Client, msg: ClientMessage) -> ServerMessage | None:
        if isinstance(msg, Ask):  # answer events follow from the model worker, to this client only
            if self.desk is None:
                raise ProtocolError(
                    ErrorCode.MODEL_DISABLED, "LTU-AS is off in this daemon (model.enabled = false)", msg.id
                )
            await self.desk.ask(client, client.sub.send, msg)
            return None
        if isinstance(msg, HistorySearch):
            return await self.memory.search(msg)
        if isinstance(msg, Timeline):
            return await self.memory.timeline(msg)
        if isinstance(msg, AlertList):
            return self.memory.rules(msg)
        if isinstance(msg, AlertAdd):
            return self.memory.add(msg)
        if isinstance(msg, AlertRemove):
            return self.memory.remove(msg)
        if isinstance(msg, Label | LabelList | LabelRemove | Learn | LearnRollback):
            return await self._learning(msg)
        if isinstance(msg, Cancel):
            if self.desk is None or not self.desk.cancel(client, msg.target):
                raise ProtocolError(ErrorCode.UNKNOWN_QUESTION, f"no question {msg.target!r} in progress", msg.id)
            return Cancelled(re=msg.id, target=msg.target)
        if isinstance(msg, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already received", msg.id)
        if isinstance(msg, Subscribe):
            client.sub.filter = Filter(list(msg.streams), list(msg.events))
            return Subscribed(re=msg.id, streams=list(msg.streams), events=list(msg.events))
        if isinstance(msg, AudioStart):
            remote = self.remotes.get(msg.stream)
            if remote is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_STREAM,
                    f"{msg.stream!r} is not a remote stream (remote "
                    f"streams: {', '.join(self.remotes.names()) or 'none configured'})",
                    msg.id,
                )
            fed = self.remotes.fed_by(client)
            if fed is not None and fed is not remote:
                raise ProtocolError(
                    ErrorCode.STREAM_BUSY, f"this connection already feeds {fed.name!r}; send audio.stop first", msg.id
                )
            try:
                await remote.claim(client, msg.rate, msg.channels, msg.format)
            except PermissionError as e:
                raise ProtocolError(ErrorCode.STREAM_BUSY, str(e), msg.id) from None
            except NotReady as e:
                raise ProtocolError(ErrorCode.NOT_READY, str(e), msg.id, retry_after_s=NOT_READY_RETRY_S) from None
            return AudioReady(re=msg.id, stream=msg.stream)
        if isinstance(msg, AudioStop):
            return AudioStopped(re=msg.id, stream=await self.remotes.release(client))
        return Pong(re=msg.id)

    async def _learning(self, msg: Label | LabelList | LabelRemove | Learn | LearnRollback) -> ServerMessage:
        d = self.learning
        if d is None:
            raise ProtocolError(
                ErrorCode.LEARN_DISABLED, "learning is off in this daemon (learn.enabled = false)", msg.id
            )
        if isinstance(msg, Label):
            return await d.label(msg)
        if isinstance(msg, LabelList):
            return await d.list(msg)
        if isinstance(msg, LabelRemove):
            return await d.remove(msg)
        if isinstance(msg, Learn):
            return await d.learn(msg)
        return await d.rollback(msg)

    async def _audio(self, client: Client, data: bytes) -> None:
        """One binary frame: paced first (frames per second), then decoded and queued, then held while the audio
        runs ahead of real time (`RemoteSource.push`). Pacing only reads this client's socket more slowly, and
        ends once the connection has closed: frames it sent before closing are still taken, without waiting
        (a satellite that sends its last frames and closes loses nothing)."""
        while not client.closed.done() and (wait := client.frames.take()):
            await asyncio.sleep(wait)
        remote = self.remotes.fed_by(client)
        if remote is None:
            client.sub.send(
                ErrorEvent(code=ErrorCode.NOT_STARTED, message="send audio.start before binary audio frames")
            )
            return
        try:
            hold = await remote.push(client, data)
        except AudioFormatError as e:
            client.sub.send(ErrorEvent(code=ErrorCode.BAD_AUDIO, message=f"frame ignored: {e}"))
            return
        if hold > 0:
            await asyncio.wait({client.closed}, timeout=hold)


def _peer(conn: ServerConnection) -> str:
    addr = conn.remote_address
    return f"{addr[0]}:{addr[1]}" if addr else "?"


def _close_reason(conn: ServerConnection) -> str:
    """Why a connection ended, for the log: the close frames each side sent, or how it broke."""
    sent, rcvd = conn.protocol.close_sent, conn.protocol.close_rcvd
    if sent is not None and sent.code == CloseCode.INTERNAL and "keepalive" in sent.reason:
        return f"keepalive: no pong within server.ping_timeout_s (closed {sent.code})"
    parts = []
    if rcvd is not None:
        parts.append(f"client sent {rcvd.code}" + (f" {rcvd.reason!r}" if rcvd.reason else ""))
    if sent is not None:
        parts.append(f"server sent {sent.code}" + (f" {sent.reason!r}" if sent.reason else ""))
    return "; ".join(parts) or "connection lost without a close frame"


def _body(conn: ServerConnection, content_type: str, body: bytes) -> Response:
    response = conn.respond(http.HTTPStatus.OK, "")
    response.body = body
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    return response


def _json_response(conn: ServerConnection, status: http.HTTPStatus, body: dict[str, Any]) -> Response:
    response = conn.respond(status, json.dumps(body, indent=1) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
