"""One stream's live pipeline: source items → ring, level meter, VAD → ASR jobs → events on the bus, and 10 s
windows for the model.

The pipeline owns the stream clock (`daemon.clock`). Sources put `AudioChunk`, `Gap` and `Status` items (and
`END`) on its input queue of `audio.source_queue` items. Overflow policy of that queue: file and remote sources
wait for room (nothing is lost; a remote client's socket is simply read more slowly); the microphone cannot wait,
so its callback drops the chunk and the loss is reported as a `stream.gap` event.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from .capture.audio import AudioChunk, End, Gap, SourceItem, Status
from .capture.level import LevelMeter
from .capture.ring import AudioRing
from .capture.vad import Segmenter, SilenceBegins, SpeechEnd, SpeechStart
from .clock import SAMPLE_RATE, ms_to_samples, s_to_samples, samples_to_s
from .config import AsrConfig, AudioConfig, VadConfig, WindowsConfig
from .delivery.events import (
    FinalEvent,
    GapEvent,
    LevelEvent,
    PartialEvent,
    SpeechStartEvent,
    StatusEvent,
    StreamEvent,
    StreamInfo,
    StreamKind,
    StreamState,
    WindowEvent,
)
from .reply import Reply
from .speech.asr import AsrJob, AsrResult, AsrWorker
from .understanding.windows import StreamWindows, Window, Windower

log = logging.getLogger(__name__)


class StreamPipeline:
    """Turns one stream's source items into events. Receives what it uses: its config sections, where to
    `publish` events, the ASR worker to `offer` utterances to, and `on_window` for each closed window."""

    def __init__(
        self,
        name: str,
        kind: StreamKind,
        *,
        audio: AudioConfig,
        vad: VadConfig,
        asr: AsrConfig,
        windows: WindowsConfig,
        publish: Callable[[StreamEvent], object],
        asr_worker: AsrWorker,
        on_window: Callable[[Window, np.ndarray | None], None] | None = None,
    ) -> None:
        self.name, self.kind = name, kind
        self.publish, self.asr, self.on_window = publish, asr_worker, on_window
        self.partials, self.partial_interval = asr.partials, ms_to_samples(asr.partial_interval_ms)
        self.queue: asyncio.Queue[SourceItem] = asyncio.Queue(maxsize=audio.source_queue)
        self.ring = AudioRing(s_to_samples(audio.ring_seconds))
        self.level = LevelMeter(ms_to_samples(audio.level_interval_ms), audio.level_interval_ms / 1000)
        self.vad = Segmenter(vad)
        # how far past a window's end the VAD may still confirm an utterance that began inside it
        margin = ms_to_samples(vad.pre_roll_ms + vad.start_ms + vad.min_speech_ms + vad.frame_ms)
        self.windower = Windower(name, s_to_samples(windows.hop_s), s_to_samples(windows.settle_max_s), margin)
        self.windows = StreamWindows(name, windows.keep, self.ring.read)
        self._unresolved: dict[int, int] = {}  # utterance index → start, until its final result is back
        self.state: StreamState = "starting"
        # (first sample index, wall time) of recent chunks, to put wall-clock times on stream positions
        self._anchors: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._partial_at = 0  # stream index at which the next partial is due
        self._partial_text: dict[int, str] = {}
        self._revision: dict[int, int] = {}
        self._on_result: Reply[AsrResult] | None = None
        # utterance index → its speculative decode (job, result once back); `_awaiting`: ends confirmed for
        # speculative decodes still running (their final goes out when the result comes back)
        self._speculative: dict[int, tuple[AsrJob, AsrResult | None]] = {}
        self._awaiting: dict[int, SpeechEnd] = {}
        self.speculation = {"started": 0, "used": 0, "wasted": 0}
        self.finals = 0
        self.utterances = 0
        self.last_latency_s: float | None = None

    def continue_from(self, windows: int, utterances: int) -> None:
        """Number this run's windows and utterances after the last ones stored (ids stay unique across restarts)."""
        self.windower.index = max(self.windower.index, windows)
        self.vad.index = max(self.vad.index, utterances)

    def info(self) -> StreamInfo:
        return StreamInfo(name=self.name, kind=self.kind, state=self.state)

    def wall_at(self, index: int) -> float | None:
        """Wall-clock time (s) of stream sample `index`, from the nearest earlier chunk's capture time."""
        for first, wall in reversed(self._anchors):
            if first <= index:
                return round(wall + (index - first) / SAMPLE_RATE, 6)
        return None

    async def run(self) -> None:
        """Consume the input queue until `END`."""
        self._on_result = Reply.here(self.on_result)
        while True:
            item = await self.queue.get()
            if isinstance(item, End):
                await self._flush()
                return
            if isinstance(item, AudioChunk):
                await self._audio(item)
            elif isinstance(item, Gap):
                self.publish(
                    GapEvent(
                        stream=self.name,
                        at=samples_to_s(self.ring.end),
                        duration_s=round(item.duration_s, 3),
                        reason=item.reason,
                    )
                )
            elif isinstance(item, Status):
                if item.state in ("lost", "closed", "error"):
                    await self._flush()  # a gap or an end cuts the utterance: its final goes out now
                self.state = item.state
                self.publish(StatusEvent(stream=self.name, state=item.state, detail=item.detail))

    async def _audio(self, chunk: AudioChunk) -> None:
        first = self.ring.write(chunk.samples)
        self._anchors.append((first, chunk.wall))
        level = self.level.push(chunk.samples, first, time.time())
        if level is not None:
            self.publish(
                LevelEvent(
                    stream=self.name,
                    start=samples_to_s(level.start),
                    end=samples_to_s(level.stop),
                    rms_dbfs=round(level.rms_dbfs, 2),
                    peak_dbfs=round(level.peak_dbfs, 2),
                )
            )
        for ev in self.vad.push(chunk.samples):
            await self._vad_event(ev)
        self._maybe_partial()
        self._close_windows()

    def _close_windows(self) -> None:
        starts = list(self._unresolved.values())
        if self.vad.open_start is not None:
            starts.append(self.vad.open_start)
        for w in self.windower.ready(self.ring.end, min(starts) if starts else None):
            w = dataclasses.replace(w, wall_start=self.wall_at(w.start), wall_end=self.wall_at(w.end))
            self.windows.add(w)
            self.publish(
                WindowEvent(
                    stream=self.name,
                    id=w.id,
                    start=samples_to_s(w.start),
                    end=samples_to_s(w.end),
                    wall_start=w.wall_start,
                    wall_end=w.wall_end,
                    transcript=w.transcript,
                )
            )
            if self.on_window is not None:
                self.on_window(w, self.windows.audio(w))

    async def _vad_event(self, ev: SpeechStart | SpeechEnd | SilenceBegins) -> None:
        if isinstance(ev, SilenceBegins):
            self._speculate(ev)
            return
        if isinstance(ev, SpeechStart):
            self._unresolved[ev.index] = ev.start
            self.utterances += 1
            self._partial_at = ev.start + self.partial_interval
            self.publish(
                SpeechStartEvent(
                    stream=self.name,
                    id=self.utterance_id(ev.index),
                    start=samples_to_s(ev.start),
                    wall=self.wall_at(ev.start),
                )
            )
            return
        guess = self._speculative.pop(ev.index, None)
        if guess is not None and _same_end(guess[0], ev):
            self.speculation["used"] += 1
            self.asr.promote(guess[0])
            if guess[1] is not None:
                self._final(ev, guess[1])
            else:
                self._awaiting[ev.index] = ev
            return
        if guess is not None:
            self.speculation["wasted"] += 1
        job = AsrJob(
            self.name, ev.index, ev.start, ev.end, self.ring.read(ev.start, ev.end), ev, time.monotonic(), self._reply()
        )
        while not self.asr.offer_final(job):
            await asyncio.sleep(0.02)  # full: wait for room, never drop a final (module docstring of asr)

    def _speculate(self, ev: SilenceBegins) -> None:
        """Decode the utterance up to the silence ([start, at)) while the hangover decides whether it ended."""
        old = self._speculative.pop(ev.index, None)
        if old is not None:  # speech resumed after an earlier silence: that guess is stale
            self.speculation["wasted"] += 1
        end = ev.at
        guess = SpeechEnd(ev.index, ev.start, end, ev.speech_end, "silence")
        job = AsrJob(self.name, ev.index, ev.start, end, self.ring.read(ev.start, end), guess, time.monotonic(),
                     self._reply(), speculative=True)  # fmt: skip
        self._speculative[ev.index] = (job, None)
        self.speculation["started"] += 1
        self.asr.offer_speculative(job)

    def _reply(self) -> Reply[AsrResult]:
        if self._on_result is None:  # a pipeline driven without run() (tests)
            self._on_result = Reply.here(self.on_result)
        return self._on_result

    def _maybe_partial(self) -> None:
        index, start = self.vad.open_index, self.vad.open_start
        if not self.partials or index is None or start is None or self.ring.end < self._partial_at:
            return
        if self.vad.in_silence:  # the speculative final covers what a partial would say
            return
        self._partial_at = self.ring.end + self.partial_interval
        self.asr.offer_partial(
            AsrJob(
                self.name,
                index,
                start,
                self.ring.end,
                self.ring.read(start, self.ring.end),
                None,
                time.monotonic(),
                self._reply(),
            )
        )

    async def _flush(self) -> None:
        for ev in self.vad.flush():
            await self._vad_event(ev)

    def utterance_id(self, index: int) -> str:
        return f"{self.name}/{index}"

    def on_result(self, r: AsrResult) -> None:
        """An ASR result for this stream (on the event loop)."""
        job = r.job
        if job.end is None:
            if self._partial_text.get(job.index) == r.text:
                return  # nothing new: never re-send unchanged text
            self._partial_text[job.index] = r.text
            self._revision[job.index] = self._revision.get(job.index, 0) + 1
            self.publish(
                PartialEvent(
                    stream=self.name,
                    id=self.utterance_id(job.index),
                    start=samples_to_s(job.start),
                    end=samples_to_s(job.stop),
                    text=r.text,
                    revision=self._revision[job.index],
                )
            )
            return
        if job.speculative:
            current = self._speculative.get(job.index)
            if current is not None and current[0] is job:
                self._speculative[job.index] = (job, r)  # kept until the end is confirmed or speech resumes
            awaiting = self._awaiting.pop(job.index, None)
            if awaiting is not None and _same_end(job, awaiting):
                self._final(awaiting, r)
            return
        self._final(job.end, r)

    def _final(self, ev: SpeechEnd, r: AsrResult) -> None:
        """Publish utterance `ev`'s final with `r`'s text (decoded after its end, or speculatively before)."""
        self._partial_text.pop(ev.index, None)
        self._revision.pop(ev.index, None)
        self._unresolved.pop(ev.index, None)
        uid = self.utterance_id(ev.index)
        self.windower.add_final(ev.start, ev.end, r.text)
        wall_end = self.wall_at(ev.speech_end)
        self.finals += 1
        if wall_end is not None:
            self.last_latency_s = round(time.time() - wall_end, 4)
        self.publish(
            FinalEvent(
                stream=self.name,
                id=uid,
                start=samples_to_s(ev.start),
                end=samples_to_s(ev.end),
                speech_end=samples_to_s(ev.speech_end),
                text=r.text,
                reason=ev.reason,
                wall_start=self.wall_at(ev.start),
                wall_end=wall_end,
                dropped_segments=r.dropped_segments,
                asr_ms=round(r.decode_s * 1000, 1),
                queue_ms=round(r.wait_s * 1000, 1),
            )
        )
        self._close_windows()  # a window may have waited for this final

    def health(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "state": self.state,
            "seconds": samples_to_s(self.ring.end),
            "utterances": self.utterances,
            "finals": self.finals,
            "speculative": dict(self.speculation),
            "queue": self.queue.qsize(),
            "last_final_latency_s": self.last_latency_s,
            "windows": self.windower.index,
        }


def _same_end(guess: AsrJob, end: SpeechEnd) -> bool:
    """A speculative decode stands for the confirmed end when nothing was voiced after the silence it saw
    began (same last voiced frame) and it decoded no audio past the utterance's end."""
    return guess.end is not None and guess.end.speech_end == end.speech_end and guess.stop <= end.end
