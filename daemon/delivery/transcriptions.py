"""OpenAI-compatible `POST /v1/audio/transcriptions` on its own HTTP port (aiohttp), so Frigate and other tools that
speak OpenAI's audio API can use the daemon's ASR. Also `GET /v1/models` (the one model) for clients that list.

Request: multipart form with `file` (any format PyAV decodes: wav, flac, mp3, ogg, webm, m4a …), `model` (any
name is accepted; the daemon's `asr.model` transcribes), `language` (optional; must match `asr.language` when that
is set), `response_format` = json (default) | text | verbose_json. `prompt` and `temperature` are accepted and
ignored (decoding is greedy/beam, without conditioning, like every transcript of the daemon).

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 401 bad or missing token (when
`server.token` is set), 413 upload over `api.max_upload_mb` or audio over `api.max_audio_s`, 400 no `file`, not an
audio file, or an unsupported `response_format`, 503 the ASR queue stayed full (with Retry-After).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
from typing import Any

from aiohttp import BodyPartReader, web

from ltu_as.model.audio import load_audio

from ..clock import SAMPLE_RATE
from ..config import ApiConfig
from .transcriber import AsrBusy, Transcriber

log = logging.getLogger(__name__)

FORMATS = ("json", "text", "verbose_json")
FIELD_BYTES = 4096  # the largest non-file form field read


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "5"} if self.status == 503 else None
        return web.json_response(body, status=self.status, headers=headers)


class TranscriptionApi:
    """Receives what it uses: its config section, the token (or None: no auth), the speech desk, and the ASR's
    model name and language for answers and checks."""

    name = "api"

    def __init__(
        self, config: ApiConfig, token: str | None, desk: Transcriber, asr_model: str, language: str | None
    ) -> None:
        self.config, self.token, self.desk = config, token, desk
        self.asr_model, self.language = asr_model, language
        self.max_bytes = int(config.max_upload_mb * (1 << 20))
        # aiohttp's own cap sits above ours, so our check answers first with a clear message
        app = web.Application(client_max_size=self.max_bytes + (1 << 20))
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        server = self._site._server if self._site else None
        sockets = getattr(server, "sockets", None)
        return int(sockets[0].getsockname()[1]) if sockets else self.config.port

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await self._site.start()
        log.info(
            "OpenAI-compatible transcriptions on http://%s:%d/v1/audio/transcriptions (stream %r)",
            self.config.host,
            self.port,
            self.config.stream,
        )

    async def close(self) -> None:
        await self._runner.cleanup()

    # --- handlers ---

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return web.json_response(
            {"object": "list", "data": [{"id": self.asr_model, "object": "model", "owned_by": "ltu-daemon"}]}
        )

    async def _transcriptions(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
            upload, fields = await self._read_form(request)
            return await self._answer(upload, fields)
        except ApiError as e:
            log.info("transcriptions: %d %s", e.status, e.message)
            return e.response()

    def _authorize(self, request: web.Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <server.token>'",
                           "invalid_api_key")  # fmt: skip

    async def _read_form(self, request: web.Request) -> tuple[bytes, dict[str, str]]:
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
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not part of this API
            if part.name == "file":
                data = bytearray()
                while chunk := await part.read_chunk(1 << 16):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise too_big
                upload = bytes(data)
            elif part.name:
                value = await part.read(decode=True)
                if len(value) > FIELD_BYTES:
                    raise ApiError(400, f"form field {part.name!r} is too long", "invalid_request", part.name)
                fields[part.name] = value.decode("utf-8", "replace")
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
        try:
            audio = await asyncio.to_thread(load_audio, io.BytesIO(upload), SAMPLE_RATE)
        except Exception as e:  # PyAV's errors for non-audio input are many (InvalidDataError, ValueError …)
            raise ApiError(400, f"not an audio file this daemon can decode: {e}", "invalid_file", "file") from e
        if not len(audio):
            raise ApiError(400, "the file decodes to no audio samples", "invalid_file", "file")
        if len(audio) > self.config.max_audio_s * SAMPLE_RATE:
            raise ApiError(413, f"audio longer than api.max_audio_s = {self.config.max_audio_s:g} s",
                           "audio_too_long", "file")  # fmt: skip
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
