"""A Wyoming speech-to-text server (the protocol Home Assistant's voice pipeline speaks), on its own TCP port.

Per connection: `describe` → `info` naming our ASR; `transcribe` (optional: language), then `audio-start`,
`audio-chunk`s (any rate, width and channel count: converted to 16 kHz s16 mono), `audio-stop` → one `transcript`.
A request over `wyoming.max_audio_s` gets one `error` (`audio-too-long`); the rest of its audio is read and dropped.
The client does the endpointing (Home Assistant's VAD decides when the command ended), so the whole clip is one
utterance. Its transcript is also published as a final of the `wyoming.stream` stream (store, alerts, clients).

The Wyoming protocol has no authentication: the server binds to loopback unless told otherwise (docs). Bounded
before work, whatever a client sends: at most `wyoming.max_connections` connections (one more gets an error event
and is closed); a connection that sends nothing for `wyoming.idle_timeout_s` is closed; a header line that is not
a Wyoming event is refused (`bad-event`); an event whose declared data or payload is over `wyoming.max_event_bytes`
is refused before it is read; an audio chunk's rate (8-192 kHz), width
(1-4 bytes), channels (1-2) and length are checked, and its size once converted is counted against
`wyoming.max_audio_s` before it is converted. Each refusal is an `error` event with a code, then (for a
connection that broke the protocol) a close, after reading and dropping at most 1 MiB / 1 s of what the client
was still sending, so that the error is not lost to a connection reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from ..clock import SAMPLE_RATE
from ..config import WyomingConfig
from .floodlog import EveryFew
from .transcriber import AsrBusy, Transcriber

log = logging.getLogger(__name__)
# After a refusal, how long and how much of a client's remaining input is read and dropped before the close (see
# `_Handler._linger`): enough for the rest of one bounded event, short enough that a refused connection goes soon.
LINGER_S = 1.0
LINGER_BYTES = 1 << 20


def describe(asr_model: str, language: str | None, version: str) -> Info:
    """What `describe` answers: one ASR program (this daemon) with one model (the configured faster-whisper)."""
    languages = [language] if language else _whisper_languages()
    model = AsrModel(
        name=asr_model,
        attribution=Attribution(
            name="OpenAI Whisper via faster-whisper", url="https://github.com/SYSTRAN/faster-whisper"
        ),
        installed=True,
        description=f"Whisper {asr_model} (CTranslate2)",
        version=None,
        languages=languages,
    )
    program = AsrProgram(
        name="ltu-daemon",
        attribution=Attribution(name="ltu-daemon", url=""),  # no public home page yet
        installed=True,
        description="ltu-daemon speech-to-text (faster-whisper, with its hallucination defences)",
        version=version,
        models=[model],
    )
    return Info(asr=[program])


def _whisper_languages() -> list[str]:
    try:  # a private table of faster-whisper's; without it, say English rather than nothing
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        return sorted(_LANGUAGE_CODES)
    except ImportError:
        return ["en"]


class Refused(Exception):
    """A connection broke a limit: `code` and `text` go out as an error event, then the connection closes."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


@dataclass
class Connections:
    """The connections open now, against `limit`; refusals are logged at most once per 10 s each."""

    limit: int
    open: int = 0
    refused: int = 0
    refusals_log: EveryFew = field(default_factory=lambda: EveryFew(log, level=logging.INFO))


class _BoundedReader:
    """What `wyoming.event.async_read_event` reads through: each read waits at most `idle_s`; each header line
    (bounded by the stream's own limit, 64 KiB) must be a JSON object with a string `type` and whole lengths (the
    library would raise on anything else); and a declared data or payload length over `max_bytes` is refused before
    a byte of it is read."""

    def __init__(self, reader: asyncio.StreamReader, idle_s: float, max_bytes: int) -> None:
        self.reader, self.idle_s, self.max_bytes = reader, idle_s, max_bytes
        self._data_length = 0  # the data part the library reads next (it reads data, then payload)

    async def readline(self) -> bytes:
        line = await self._wait(self.reader.readline())
        if line:  # b"": the client closed
            self._data_length = _check_header(line)
        return line

    async def readexactly(self, n: int) -> bytes:
        if n > self.max_bytes:
            raise Refused("too-large", f"an event of {n} bytes is over wyoming.max_event_bytes = {self.max_bytes}")
        data = await self._wait(self.reader.readexactly(n))
        if self._data_length:
            self._data_length = 0
            try:
                ok = isinstance(json.loads(data), dict)
            except (ValueError, RecursionError):
                ok = False
            if not ok:
                raise Refused("bad-event", "an event's data must be a JSON object")
        return data

    async def _wait(self, read: Awaitable[bytes]) -> bytes:
        try:
            return await asyncio.wait_for(read, self.idle_s)
        except TimeoutError:
            raise Refused("timeout", f"nothing received for wyoming.idle_timeout_s = {self.idle_s:g} s") from None


def _check_header(line: bytes) -> int:
    """Raises `Refused` (bad-event) for a header line that is not a Wyoming event; its data length."""
    try:
        head = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        raise Refused("bad-event", "an event's header line must be JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise Refused("bad-event", "an event's header must be a JSON object with a string type")
    for key in ("data_length", "payload_length"):
        n = head.get(key)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise Refused("bad-event", f"{key} must be a whole number of bytes")
    if head.get("data") is not None and not isinstance(head["data"], dict):
        raise Refused("bad-event", "an event's data must be a JSON object")
    return int(head.get("data_length") or 0)


def _check_chunk(chunk: AudioChunk) -> None:
    """Raises `Refused` (bad-audio) for a chunk the converter must not be given."""
    rate, width, channels = chunk.rate, chunk.width, chunk.channels
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels)):
        raise Refused("bad-audio", "rate, width and channels must be integers")
    if not 8000 <= rate <= 192000 or width not in (1, 2, 3, 4) or channels not in (1, 2):
        raise Refused(
            "bad-audio",
            f"unsupported audio: rate {rate} (8000-192000 Hz), width {width} (1-4), channels {channels} (1-2)",
        )
    if len(chunk.audio) % (width * channels):
        raise Refused("bad-audio", f"{len(chunk.audio)} bytes is not a whole number of {width * channels}-byte frames")


class _Handler(AsyncEventHandler):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        config: WyomingConfig,
        desk: Transcriber,
        info: Info,
        connections: Connections,
    ) -> None:
        super().__init__(reader, writer)
        self.config, self.desk, self.info, self.connections = config, desk, info, connections
        self.bounded = _BoundedReader(reader, config.idle_timeout_s, config.max_event_bytes)
        self.converter: AudioChunkConverter | None = None
        self.format: tuple[int, int, int] | None = None  # (rate, width, channels) of the request's first chunk
        self.pcm: list[bytes] | None = None
        self.size = 0
        self.refused = False  # the current request went over max_audio_s

    async def run(self) -> None:
        """The library's loop, with every read bounded (`_BoundedReader`) and the connection counted."""
        c = self.connections
        c.open += 1
        try:
            if c.open > c.limit:
                c.refused += 1
                raise Refused("busy", f"wyoming.max_connections = {c.limit} are open; try again")
            while (event := await self._read()) is not None:
                if not await self.handle_event(event):
                    break
        except Refused as e:
            c.refusals_log.warn(e.code, "wyoming: closed a connection: %s: %s", e.code, e.text)
            with contextlib.suppress(ConnectionError):
                await self.write_event(Error(text=e.text, code=e.code).event())
                if e.code != "busy":  # a connection over the cap sent nothing yet: its slot is freed at once
                    await self._linger()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            c.open -= 1
            self.writer.close()

    async def _linger(self) -> None:
        """Let the error event reach the client before closing: half-close, then read and drop what it is still
        sending, for at most `LINGER_S` and `LINGER_BYTES`. Closing with unread input makes the kernel reset the
        connection, and a reset discards the error still waiting in the client's receive buffer (the fuzz test saw
        `ConnectionResetError` instead of the `bad-audio` it had been sent)."""
        loop = asyncio.get_running_loop()
        deadline, left = loop.time() + LINGER_S, LINGER_BYTES
        with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            await asyncio.wait_for(self.writer.drain(), LINGER_S)
            while left > 0 and (timeout := deadline - loop.time()) > 0:
                data = await asyncio.wait_for(self.reader.read(min(65536, left)), timeout)
                if not data:
                    break
                left -= len(data)

    async def _read(self) -> Event | None:
        """The next event through the bounded reader (which refuses what the library would fail on); None once the
        client closed."""
        return await async_read_event(self.bounded)  # type: ignore[arg-type]

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.info.event())
        elif Transcribe.is_type(event.type) or AudioStart.is_type(event.type):
            self._new_request()  # audio-start may or may not follow a transcribe
        elif AudioChunk.is_type(event.type):
            if self.refused:
                return True  # the rest of a refused request: read and dropped (the client may still be sending)
            try:
                chunk = AudioChunk.from_event(event)
            except (KeyError, TypeError, ValueError):
                raise Refused("bad-audio", "audio-chunk needs rate, width, channels and a payload") from None
            _check_chunk(chunk)
            if self.pcm is None:
                self._new_request()
            if self.format is None:
                self.format = (chunk.rate, chunk.width, chunk.channels)
            elif self.format != (chunk.rate, chunk.width, chunk.channels):
                raise Refused("bad-audio", "the audio format changed within one request")
            # what it will be once converted (16 kHz s16 mono), counted before converting it
            self.size += 2 * (len(chunk.audio) // (chunk.width * chunk.channels)) * SAMPLE_RATE // chunk.rate
            if self.size > self.config.max_audio_s * SAMPLE_RATE * 2:
                self.pcm, self.size, self.refused = None, 0, True
                await self.write_event(
                    Error(
                        text=f"audio longer than wyoming.max_audio_s = {self.config.max_audio_s:g} s: request dropped",
                        code="audio-too-long",
                    ).event()
                )
                return True
            assert self.converter is not None and self.pcm is not None
            self.pcm.append(self.converter.convert(chunk).audio)
        elif AudioStop.is_type(event.type):
            if self.refused:  # its error went out already
                self.refused = False
                return True
            pcm, self.pcm, self.size, self.format = b"".join(self.pcm or []), None, 0, None
            audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
            try:
                heard = await self.desk.transcribe(self.config.stream, audio)
            except AsrBusy as e:
                await self.write_event(Error(text=f"busy: {e}; try again", code="busy").event())
                return True
            await self.write_event(Transcript(text=heard.text).event())
            log.info("wyoming: %.1f s → %r", heard.duration_s, heard.text)
        return True  # other events (ping, select-program, …) are ignored, as the protocol asks

    def _new_request(self) -> None:
        self.pcm, self.size, self.refused, self.format = [], 0, False, None
        self.converter = AudioChunkConverter(rate=SAMPLE_RATE, width=2, channels=1)  # resampler state per request


class WyomingServer:
    """Receives what it uses: its config section, the speech desk and the `Info` to describe itself with."""

    name = "wyoming"

    def __init__(self, config: WyomingConfig, desk: Transcriber, info: Info) -> None:
        self.config, self.desk, self.info = config, desk, info
        self.connections = Connections(config.max_connections)
        self._server = AsyncTcpServer(config.host, config.port)

    def stats(self) -> dict[str, int]:
        """Connections open now, and refused for being over `wyoming.max_connections` since start."""
        return {"connections": self.connections.open, "refused": self.connections.refused}

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS chose for port 0)."""
        sockets = getattr(self._server._server, "sockets", None)  # an asyncio.Server once started
        return int(sockets[0].getsockname()[1]) if sockets else self.config.port

    async def start(self) -> None:
        await self._server.start(
            partial(_Handler, config=self.config, desk=self.desk, info=self.info, connections=self.connections)
        )
        log.info("Wyoming speech-to-text on tcp://%s:%d (stream %r)", self.config.host, self.port, self.config.stream)

    async def close(self) -> None:
        await self._server.stop()
