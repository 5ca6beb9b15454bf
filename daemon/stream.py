"""One stream's live pipeline: source items → ring, level meter, VAD → ASR jobs → events on the bus, and 10 s
windows for the model.

The pipeline owns the stream clock (`daemon.clock`). Sources put `AudioChunk`, `Gap` and `Status` items (and
`END`) on its input queue of `audio.source_queue` items. Overflow policy of that queue: file and remote sources
wait for room (nothing is lost; a remote client's socket is simply read more slowly); the microphone cannot wait,
so its callback drops the chunk and the loss is reported as a `stream.gap` event. The pipeline yields to the event
loop after every item, so a backlog of queued audio never starves other clients.

Which decode stands for which utterance, and the order finals leave in, is `speech.utterances` (a pure state
machine). At `END` (a file source ran out, or the daemon stops) the open utterance is flushed to its final and,
once every final is in, the stream's last window closes: the 10 s up to the stream's end, so the audio after the
last full window is stored (with its transcript) and searchable too, and described when the model is still running
(a file source that ended; at shutdown the model stops first).
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
from .speech.asr import AsrJob, AsrResult, AsrWorker, outcome
from .speech.utterances import Utterances
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
        partials_read: Callable[[], bool] = lambda: True,
        live: bool = True,
    ) -> None:
        self.name, self.kind = name, kind
        self.publish, self.asr, self.on_window = publish, asr_worker, on_window
        self.partials, self.partial_interval_s = asr.partials and asr.partial_share > 0, asr.partial_interval_ms / 1000
        self.partials_read = partials_read  # whether any client reads this stream's partials now
        self.live = live  # real-time audio (not a file read as fast as it decodes): its finals' lag is overload
        self.partials_unread = 0  # partials that were due but not decoded: nobody subscribed to them
        self.queue: asyncio.Queue[SourceItem] = asyncio.Queue(maxsize=audio.source_queue)
        self.ring = AudioRing(s_to_samples(audio.ring_seconds))
        self.level = LevelMeter(ms_to_samples(audio.level_interval_ms), audio.level_interval_ms / 1000)
        self.vad = Segmenter(vad)
        # how far past a window's end the VAD may still confirm an utterance that began inside it
        margin = ms_to_samples(vad.pre_roll_ms + vad.start_ms + vad.min_speech_ms + vad.frame_ms)
        self.windower = Windower(name, s_to_samples(windows.hop_s), s_to_samples(windows.settle_max_s), margin)
        self.windows = StreamWindows(name, windows.keep, self.ring.read)
        self.open_utterances = Utterances()  # confirmed utterances whose final has not gone out
        self.ended = False  # END came: no more audio; the last window closes once every final is in
        self.state: StreamState = "starting"
        # (first sample index, wall time) of recent chunks, to put wall-clock times on stream positions
        self._anchors: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._partial_at = 0  # stream index at which the next partial is due
        self._partial_text: dict[int, str] = {}
        self._revision: dict[int, int] = {}
        self._on_result: Reply[AsrResult] | None = None
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
                self.ended = True
                self._close_windows()  # now, or when the last final comes back
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
            await asyncio.sleep(0)  # queue.get() does not yield while items wait: let other clients in

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
        starts = self.open_utterances.starts()
        if self.vad.open_start is not None:
            starts.append(self.vad.open_start)
        unresolved = min(starts) if starts else None
        windows = self.windower.ready(self.ring.end, unresolved, ended=self.ended)
        if self.ended and unresolved is None and (tail := self.windower.last(self.ring.end)) is not None:
            windows.append(tail)
        for w in windows:
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
            self.open_utterances.started(ev.index, ev.start)
            self.utterances += 1
            self._partial_at = ev.start + s_to_samples(self.asr.partial_interval_s(self.partial_interval_s))
            self.publish(
                SpeechStartEvent(
                    stream=self.name,
                    id=self.utterance_id(ev.index),
                    start=samples_to_s(ev.start),
                    wall=self.wall_at(ev.start),
                )
            )
            return
        ending = self.open_utterances.ended(ev)
        if ending.withdraw is not None:
            self.asr.withdraw(ending.withdraw)
        if ending.promote is not None:
            self.asr.promote(ending.promote)
            self._publish_finals()  # its result may be back already
            return
        job = self._job(ev.index, ev.start, ev.end, ev)
        self.open_utterances.decoding(job)
        while not self.asr.offer_final(job):
            await asyncio.sleep(0.02)  # full: wait for room, never drop a final (module docstring of asr)

    def _job(self, index: int, start: int, stop: int, end: SpeechEnd | None, speculative: bool = False) -> AsrJob:
        """A decode of samples [start, stop) of utterance `index`."""
        audio = self.ring.read(start, stop)
        return AsrJob(
            self.name, index, start, stop, audio, end, time.monotonic(), self._reply(), speculative, self.live
        )

    def _speculate(self, ev: SilenceBegins) -> None:
        """Decode the utterance up to the silence ([start, at)) while the hangover decides whether it ended."""
        guess = SpeechEnd(ev.index, ev.start, ev.at, ev.speech_end, "silence")
        job = self._job(ev.index, ev.start, ev.at, guess, speculative=True)
        if self.asr.offer_speculative(job):
            stale = self.open_utterances.speculating(job)
            if stale is not None:
                self.asr.withdraw(stale)

    def _reply(self) -> Reply[AsrResult]:
        if self._on_result is None:  # a pipeline driven without run() (tests)
            self._on_result = Reply.here(self.on_result)
        return self._on_result

    def _maybe_partial(self) -> None:
        """Ask for a partial when one is due: only while somebody reads them (MQTT and the store never do) and
        overload has not turned them off. The interval stretches with the ASR's load
        (`AsrWorker.partial_interval_s`)."""
        index, start = self.vad.open_index, self.vad.open_start
        if not self.partials or index is None or start is None or self.ring.end < self._partial_at:
            return
        if self.vad.in_silence:  # the speculative final covers what a partial would say
            return
        self._partial_at = self.ring.end + s_to_samples(self.asr.partial_interval_s(self.partial_interval_s))
        if not self.partials_read():
            self.partials_unread += 1
            return
        if self.asr.partials_allowed:
            self.asr.offer_partial(self._job(index, start, self.ring.end, None))

    async def _flush(self) -> None:
        for ev in self.vad.flush():
            await self._vad_event(ev)

    def utterance_id(self, index: int) -> str:
        return f"{self.name}/{index}"

    def on_result(self, r: AsrResult) -> None:
        """An ASR result for this stream (on the event loop)."""
        job = r.job
        if job.end is None:
            if r.failed or not self.open_utterances.wants_partial(job.index):
                return  # nothing to say, or its end is confirmed (a partial never follows its final)
            if self._partial_text.get(job.index, "") == r.text:
                return  # nothing new (an empty one goes out only to take back earlier text)
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
        self.open_utterances.result(r)
        self._publish_finals()

    def _publish_finals(self) -> None:
        """Publish the finals that are ready, in utterance order; then close the windows that waited for them."""
        ready = self.open_utterances.ready()
        for ev, r in ready:
            self._final(ev, r)
        if ready:
            self._close_windows()

    def _final(self, ev: SpeechEnd, r: AsrResult) -> None:
        """Publish utterance `ev`'s final with `r`'s text (decoded after its end, or speculatively before)."""
        self._partial_text.pop(ev.index, None)
        self._revision.pop(ev.index, None)
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
                outcome=outcome(r),
                reason=ev.reason,
                wall_start=self.wall_at(ev.start),
                wall_end=wall_end,
                dropped_segments=r.dropped_segments,
                asr_ms=round(r.decode_s * 1000, 1),
                queue_ms=round(r.wait_s * 1000, 1),
            )
        )

    def health(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "state": self.state,
            "seconds": samples_to_s(self.ring.end),
            "utterances": self.utterances,
            "finals": self.finals,
            "speculative": dataclasses.asdict(self.open_utterances.speculation),
            "partials_unread": self.partials_unread,
            "queue": self.queue.qsize(),
            "last_final_latency_s": self.last_latency_s,
            "windows": self.windower.index,
        }
