"""Transcription on request, for the speech endpoints (Wyoming, the OpenAI-compatible HTTP API): whole clips go
through the one ASR worker like any stream's utterances, and each transcript is published as a `transcript.final`
of the endpoint's own stream, so the store, alerts, MQTT and websocket clients see it like any other. Each piece
with text is also published as a `window` of that stream (the clip, or one utterance of a long clip), so
`history.search` finds it and history answers can cite it like any window of a live stream.

An endpoint's stream has no capture behind it: its clock is the audio received on it, clip after clip, and its
utterance and window numbers continue after the last ones stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from ..capture.vad import Segmenter, SpeechEnd
from ..clock import SAMPLE_RATE, samples_to_s
from ..config import VadConfig
from ..delivery.events import FinalEvent, StreamEvent, WindowEvent
from ..delivery.transcriber import AsrBusy, Heard, Piece
from ..reply import Reply
from .asr import AsrJob, AsrResult, AsrWorker, outcome

WHOLE_CLIP_S = 30.0  # a clip up to this long is decoded in one piece (Whisper's window); longer ones by utterance
FULL_QUEUE_WAIT_S = 30.0  # how long a request waits for room in the ASR's final queue before it is refused


class SpeechDesk:
    """Receives what it uses: the ASR worker, where to `publish` finals and windows, the VAD settings for long
    clips, and `last_indices(stream)`: the last (window, utterance) numbers stored for a stream ((0, 0) without a
    store)."""

    def __init__(
        self,
        asr: AsrWorker,
        publish: Callable[[StreamEvent], object],
        vad: VadConfig,
        last_indices: Callable[[str], tuple[int, int]] = lambda _stream: (0, 0),
    ) -> None:
        self.asr, self.publish, self.vad = asr, publish, vad
        self._last_indices = last_indices
        self._index: dict[str, list[int]] = {}  # stream → [last window, last utterance] numbers
        self._clock: dict[str, int] = {}  # stream → samples received so far (its stream clock)

    async def transcribe(self, stream: str, audio: np.ndarray, wall_end: float | None = None) -> Heard:
        """Transcribe one clip ([n] float32 at 16 kHz) for `stream`; `wall_end`: when its last sample was heard
        (default now). Clips up to 30 s are one piece; longer ones are cut into utterances by the VAD (silence
        between them is not decoded). Raises `AsrBusy` when the ASR queue stays full."""
        wall_end = time.time() if wall_end is None else wall_end
        n = len(audio)
        base = self._clock.get(stream, 0)
        self._clock[stream] = base + n
        if n <= WHOLE_CLIP_S * SAMPLE_RATE:
            spans = [(0, n)] if n else []
        else:  # the VAD over a long clip is a client's cost: off the event loop
            spans = await asyncio.to_thread(_utterances, self.vad, audio)
        loop = asyncio.get_running_loop()
        pieces: list[Piece] = []
        for start, stop in spans:
            index = self._next(stream, 1)
            done: asyncio.Future[AsrResult] = loop.create_future()
            end = SpeechEnd(index, base + start, base + stop, base + stop, "flush")
            job = AsrJob(stream, index, base + start, base + stop, audio[start:stop], end, time.monotonic(),
                         Reply(loop, _resolver(done)))  # fmt: skip
            await self._offer(job)
            r = await done
            wall_start = wall_end - (n - start) / SAMPLE_RATE
            piece_wall_end = wall_end - (n - stop) / SAMPLE_RATE
            self.publish(
                FinalEvent(
                    stream=stream,
                    id=f"{stream}/{index}",
                    start=samples_to_s(base + start),
                    end=samples_to_s(base + stop),
                    speech_end=samples_to_s(base + stop),
                    text=r.text,
                    outcome=outcome(r),
                    reason="flush",
                    wall_start=round(wall_start, 6),
                    wall_end=round(piece_wall_end, 6),
                    dropped_segments=r.dropped_segments,
                    asr_ms=round(r.decode_s * 1000, 1),
                    queue_ms=round(r.wait_s * 1000, 1),
                )
            )
            if r.text:
                self.publish(
                    WindowEvent(
                        stream=stream,
                        id=f"{stream}:w{self._next(stream, 0)}",
                        start=samples_to_s(base + start),
                        end=samples_to_s(base + stop),
                        wall_start=round(wall_start, 6),
                        wall_end=round(piece_wall_end, 6),
                        transcript=r.text,
                    )
                )
                pieces.append(Piece(round(start / SAMPLE_RATE, 3), round(stop / SAMPLE_RATE, 3), r.text))
        return Heard(" ".join(p.text for p in pieces), pieces, round(n / SAMPLE_RATE, 3))

    def _next(self, stream: str, which: int) -> int:
        """The next window (`which` 0) or utterance (1) number of `stream`."""
        if stream not in self._index:
            self._index[stream] = list(self._last_indices(stream))
        self._index[stream][which] += 1
        return self._index[stream][which]

    async def _offer(self, job: AsrJob) -> None:
        deadline = time.monotonic() + FULL_QUEUE_WAIT_S
        while not self.asr.offer_final(job):  # a full queue: wait for room like a stream does, but not forever
            if time.monotonic() > deadline:
                raise AsrBusy(f"the ASR queue stayed full for {FULL_QUEUE_WAIT_S:.0f} s")
            await asyncio.sleep(0.02)


def _utterances(vad: VadConfig, audio: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each utterance the VAD finds in a whole clip."""
    seg = Segmenter(vad)
    return [(e.start, e.end) for e in seg.push(audio) + seg.flush() if isinstance(e, SpeechEnd)]


def _resolver(future: asyncio.Future[AsrResult]) -> Callable[[AsrResult], None]:
    def resolve(result: AsrResult) -> None:
        if not future.done():  # the request may have been cancelled (its client went away)
            future.set_result(result)

    return resolve
