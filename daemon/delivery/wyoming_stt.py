"""A Wyoming speech-to-text server (the protocol Home Assistant's voice pipeline speaks), on its own TCP port.

Per connection: `describe` → `info` naming our ASR; `transcribe` (optional: language), then `audio-start`,
`audio-chunk`s (any rate, width and channel count: converted to 16 kHz s16 mono), `audio-stop` → one `transcript`.
A request over `wyoming.max_audio_s` gets one `error` (`audio-too-long`); the rest of its audio is read and dropped.
The client does the endpointing (Home Assistant's VAD decides when the command ended), so the whole clip is one
utterance. Its transcript is also published as a final of the `wyoming.stream` stream (store, alerts, clients).

The Wyoming protocol has no authentication: the server binds to loopback unless told otherwise (docs).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from ..clock import SAMPLE_RATE
from ..config import WyomingConfig
from .transcriber import AsrBusy, Transcriber

log = logging.getLogger(__name__)


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


class _Handler(AsyncEventHandler):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        config: WyomingConfig,
        desk: Transcriber,
        info: Info,
    ) -> None:
        super().__init__(reader, writer)
        self.config, self.desk, self.info = config, desk, info
        self.converter = AudioChunkConverter(rate=SAMPLE_RATE, width=2, channels=1)
        self.pcm: list[bytes] | None = None
        self.size = 0
        self.refused = False  # the current request went over max_audio_s

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.info.event())
        elif Transcribe.is_type(event.type) or AudioStart.is_type(event.type):
            self.pcm, self.size, self.refused = [], 0, False  # a new request (audio-start may or may not follow)
        elif AudioChunk.is_type(event.type):
            if self.refused:
                return True  # the rest of a refused request: read and dropped (the client may still be sending)
            data = self.converter.convert(AudioChunk.from_event(event)).audio
            if self.pcm is None:
                self.pcm, self.size = [], 0
            self.size += len(data)
            if self.size > self.config.max_audio_s * SAMPLE_RATE * 2:
                self.pcm, self.size, self.refused = None, 0, True
                await self.write_event(
                    Error(
                        text=f"audio longer than wyoming.max_audio_s = {self.config.max_audio_s:g} s: request dropped",
                        code="audio-too-long",
                    ).event()
                )
                return True
            self.pcm.append(data)
        elif AudioStop.is_type(event.type):
            if self.refused:  # its error went out already
                self.refused = False
                return True
            pcm, self.pcm, self.size = b"".join(self.pcm or []), None, 0
            audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
            try:
                heard = await self.desk.transcribe(self.config.stream, audio)
            except AsrBusy as e:
                await self.write_event(Error(text=f"busy: {e}; try again", code="busy").event())
                return True
            await self.write_event(Transcript(text=heard.text).event())
            log.info("wyoming: %.1f s → %r", heard.duration_s, heard.text)
        return True  # other events (ping, select-program, …) are ignored, as the protocol asks


class WyomingServer:
    """Receives what it uses: its config section, the speech desk and the `Info` to describe itself with."""

    name = "wyoming"

    def __init__(self, config: WyomingConfig, desk: Transcriber, info: Info) -> None:
        self.config, self.desk, self.info = config, desk, info
        self._server = AsyncTcpServer(config.host, config.port)

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS chose for port 0)."""
        sockets = getattr(self._server._server, "sockets", None)  # an asyncio.Server once started
        return int(sockets[0].getsockname()[1]) if sockets else self.config.port

    async def start(self) -> None:
        await self._server.start(partial(_Handler, config=self.config, desk=self.desk, info=self.info))
        log.info("Wyoming speech-to-text on tcp://%s:%d (stream %r)", self.config.host, self.port, self.config.stream)

    async def close(self) -> None:
        await self._server.stop()
