"""OpenAI-compatible `POST /v1/audio/transcriptions` on its own HTTP port (aiohttp), so Frigate and other tools that
speak OpenAI's audio API can use the daemon's ASR. Also `GET /v1/models` (the one model) for clients that list.

Request: multipart form with `file` (any format PyAV decodes: wav, flac, mp3, ogg, webm, m4a …), `model` (any
name is accepted; the daemon's `asr.model` transcribes), `language` (optional; must match `asr.language` when that
is set), `response_format` = json (default) | text | verbose_json. `prompt` and `temperature` are accepted and
ignored (decoding is greedy/beam, without conditioning, like every transcript of the daemon).

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 401 bad or missing token (when
`server.token` is set), 403 a `Host` that is not allowed (`daemon.delivery.hosts`), 404/405 another path or method,
408 a body not received within `api.body_timeout_s`, 413 upload over `api.max_upload_mb` or audio over
`api.max_audio_s`, 400 no `file`, not an audio file, or an unsupported `response_format`, 503 the ASR queue stayed
full, or `api.max_connections` are open (with Retry-After).

Bounded before work, whatever a client sends: a connection over `api.max_connections` gets a 503 at accept and is
closed; one that has not sent its request's headers within `api.header_timeout_s` (also the idle keep-alive time)
is closed; the body must arrive within `api.body_timeout_s` and within `api.max_upload_mb` (every form part read raw,
in chunks, against that one budget: fields at most `FIELD_BYTES`, at most `MAX_PARTS` parts); the audio's length is
read from the container before decoding (and decoding stops at `api.max_audio_s` when the container does not say),
at most `api.max_decodes` at a time, in worker threads.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.web_protocol import RequestHandler

from ltu_as.model.audio import AudioTooLong, load_audio

from ..clock import SAMPLE_RATE
from ..config import ApiConfig
from .floodlog import EveryFew, MalformedHttp
from .hosts import host_allowed, refusal
from .transcriber import AsrBusy, Transcriber

log = logging.getLogger(__name__)

FORMATS = ("json", "text", "verbose_json")
FIELD_BYTES = 4096  # the largest non-file form field read
MAX_PARTS = 32  # form parts in one request (the API takes five fields)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "5"} if self.status == 503 else None
        return web.json_response(body, status=self.status, headers=headers)


def _full_response() -> bytes:
    """The raw answer to a connection over `api.max_connections` (written before aiohttp reads its request)."""
    message = "api.max_connections connections are open: retry later"
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": "busy"}})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return (head + body).encode()


FULL = _full_response()


class _CappedServer(web.Server):
    """aiohttp's low-level server, counting connections from accept: one over `limit` gets a 503 and is closed
    before a byte of its request is read."""

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], limit: int, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.limit, self.refused = limit, 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.connections) > self.limit:
            self.refused += 1
            # once its request task has started (it starts right after this call): closing an idle handler the
            # way aiohttp's own keep-alive timeout does
            asyncio.get_running_loop().call_soon(_refuse, handler, transport)


def _refuse(handler: RequestHandler, transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.write(FULL)
    handler.force_close()


class TranscriptionApi:
    """Receives what it uses: its config section, the token (or None: no auth), the speech desk, the ASR's model
    name and language for answers and checks, and the Host names allowed besides IPs and localhost."""

    name = "api"

    def __init__(
        self,
        config: ApiConfig,
        token: str | None,
        desk: Transcriber,
        asr_model: str,
        language: str | None,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.config, self.token, self.desk = config, token, desk
        self.asr_model, self.language = asr_model, language
        self.allowed_hosts = list(allowed_hosts)
        self.max_bytes = int(config.max_upload_mb * (1 << 20))
        self.created = int(time.time())
        self._decoding = asyncio.Semaphore(config.max_decodes)
        self._log = EveryFew(log, level=logging.INFO)  # refusals: a flood of bad requests logs a line per 10 s
        self._server: _CappedServer | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        server = self._site._server if self._site else None
        sockets = getattr(server, "sockets", None)
        return int(sockets[0].getsockname()[1]) if sockets else self.config.port

    def stats(self) -> dict[str, int]:
        """Connections open now, and refused at accept since start."""
        s = self._server
        return {"connections": len(s.connections) if s else 0, "refused": s.refused if s else 0}

    async def start(self) -> None:
        c = self.config
        http_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, MalformedHttp) for f in http_log.filters):
            http_log.addFilter(MalformedHttp())
        # keepalive_timeout: aiohttp closes a connection still waiting for a request's headers (first or next)
        # this long after it opened or after its last response: the header and idle timeout in one.
        # lingering_time: after answering a request whose body was not read (a refusal), aiohttp reads and drops
        # the rest for this long so the client sees the answer; 2 s instead of 10 keeps refused floods cheap
        self._server = _CappedServer(self._handle, c.max_connections, keepalive_timeout=c.header_timeout_s,
                                     lingering_time=2.0, access_log=None)  # fmt: skip
        self._runner = web.ServerRunner(self._server)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, c.host, c.port)
        await self._site.start()
        log.info(
            "OpenAI-compatible transcriptions on http://%s:%d/v1/audio/transcriptions (stream %r)",
            self.config.host,
            self.port,
            self.config.stream,
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers ---

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request (the two paths of the API), after the Host check."""
        try:
            if not host_allowed(request.headers.get("Host"), self.allowed_hosts):
                raise ApiError(403, refusal(request.headers.get("Host")).strip(), "host_not_allowed")
            routes = {"/v1/audio/transcriptions": ("POST", self._transcriptions), "/v1/models": ("GET", self._models)}
            if request.path not in routes:
                raise ApiError(404, f"no such path: the API serves {', '.join(routes)}", "not_found")
            method, handler = routes[request.path]
            if request.method != method:
                raise ApiError(405, f"{request.path} takes {method}", "method_not_allowed")
            self._authorize(request)
            return await handler(request)
        except ApiError as e:
            self._log.warn(str(e.status), "api: %d %s", e.status, e.message)
            return e.response()

    async def _models(self, request: web.BaseRequest) -> web.Response:
        model = {"id": self.asr_model, "object": "model", "created": self.created, "owned_by": "ltu-daemon"}
        return web.json_response({"object": "list", "data": [model]})

    async def _transcriptions(self, request: web.BaseRequest) -> web.Response:
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                upload, fields = await self._read_form(request)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within api.body_timeout_s = "
                                f"{self.config.body_timeout_s:g} s", "timeout") from None  # fmt: skip
        return await self._answer(upload, fields)

    def _authorize(self, request: web.BaseRequest) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <server.token>'",
                           "invalid_api_key")  # fmt: skip

    async def _read_form(self, request: web.BaseRequest) -> tuple[bytes, dict[str, str]]:
        too_big = ApiError(
            413, f"upload larger than api.max_upload_mb = {self.config.max_upload_mb:g} MB", "file_too_large", "file"
        )
        if request.content_length is not None and request.content_length > self.max_bytes + (1 << 16):
            raise too_big  # refused before reading: the declared size is already over
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "send multipart/form-data with the audio in a 'file' field", "invalid_request")
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as e:
            raise ApiError(400, f"malformed multipart body: {e}", "invalid_request") from e
        upload: bytes | None = None
        fields: dict[str, str] = {}
        budget = self.max_bytes + (1 << 16)  # every part together, read raw (no Content-Encoding inflating here)
        parts = 0
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > MAX_PARTS:
                raise ApiError(400, f"more than {MAX_PARTS} form parts", "invalid_request")
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not part of this API (the reader skips it, reading nothing in)
            limit = self.max_bytes if part.name == "file" else FIELD_BYTES
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                data += chunk
                budget -= len(chunk)
                if budget < 0 or (part.name == "file" and len(data) > limit):
                    raise too_big
                if len(data) > limit:
                    raise ApiError(400, f"form field {part.name!r} is too long", "invalid_request", part.name)
            if part.name == "file":
                upload = bytes(data)
            elif part.name:
                fields[part.name] = bytes(data).decode("utf-8", "replace")
        if not upload:
            raise ApiError(400, "no audio: the form needs a non-empty 'file' field", "invalid_request", "file")
        return upload, fields

    async def _answer(self, upload: bytes, fields: dict[str, str]) -> web.Response:
        fmt = fields.get("response_format", "json")
        if fmt not in FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is not supported: use one of {FORMATS}", "invalid_value",
                           "response_format")  # fmt: skip
        language = fields.get("language") or None
        if language and self.language and language.lower() != self.language.lower():
            raise ApiError(400, f"this daemon transcribes {self.language!r} (asr.language), not {language!r}",
                           "unsupported_language", "language")  # fmt: skip
        too_long = f"audio longer than api.max_audio_s = {self.config.max_audio_s:g} s"
        try:
            async with self._decoding:  # at most api.max_decodes at a time, each stopping at api.max_audio_s
                audio = await asyncio.to_thread(load_audio, io.BytesIO(upload), SAMPLE_RATE, self.config.max_audio_s)
        except AudioTooLong as e:
            raise ApiError(413, f"{too_long} ({e})", "audio_too_long", "file") from None
        except Exception as e:  # PyAV's errors for non-audio input are many (InvalidDataError, ValueError …)
            raise ApiError(400, f"not an audio file this daemon can decode: {e}", "invalid_file", "file") from e
        if not len(audio):
            raise ApiError(400, "the file decodes to no audio samples", "invalid_file", "file")
        try:
            heard = await self.desk.transcribe(self.config.stream, audio)
        except AsrBusy as e:
            raise ApiError(503, f"the ASR is busy ({e}); retry later", "busy") from e
        if fmt == "text":
            return web.Response(text=heard.text + "\n", content_type="text/plain")
        if fmt == "json":
            return web.json_response({"text": heard.text})
        segments: list[dict[str, Any]] = [
            {"id": i, "start": p.start_s, "end": p.end_s, "text": p.text} for i, p in enumerate(heard.pieces)
        ]
        return web.json_response(
            {
                "task": "transcribe",
                "language": self.language or language or "",
                "duration": heard.duration_s,
                "text": heard.text,
                "segments": segments,
            }
        )
