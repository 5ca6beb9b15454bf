"""One stream's live pipeline: source items → ring, level meter, VAD → ASR jobs → events on the bus.

The pipeline owns the stream clock: sample i of the stream is at i / 16000 s. Sources put `AudioChunk`, `Gap` and
`Status` items (and `END`) on its input queue of `audio.source_queue` items. Overflow policy of that queue: file and
remote sources wait for room (nothing is lost; a remote client's socket is simply read more slowly); the microphone
cannot wait, so its callback drops the chunk and the loss is reported as a `stream.gap` event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from .asr import AsrJob, AsrResult, AsrWorker
from .audio import AudioChunk, Gap, Status
from .bus import EventBus
from .config import SAMPLE_RATE, DaemonConfig
from .level import LevelMeter
from .ring import AudioRing
from .vad import Segmenter, SpeechEnd, SpeechStart
from .windows import Window, Windower

log = logging.getLogger(__name__)

END = object()  # a source's last item: flush the open utterance and stop


def seconds(samples: int) -> float:
    return round(samples / SAMPLE_RATE, 4)


class StreamPipeline:
    def __init__(self, name: str, kind: str, config: DaemonConfig, bus: EventBus, asr: AsrWorker,
                 on_window: Callable[[StreamPipeline, Window], None] | None = None) -> None:
        self.name, self.kind = name, kind
        self.on_window = on_window
        self.config, self.bus, self.asr = config, bus, asr
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize=config.audio.source_queue)
        self.ring = AudioRing(int(config.audio.ring_seconds * SAMPLE_RATE))
        self.level = LevelMeter(config.audio.level_interval_ms * SAMPLE_RATE // 1000, config.audio.level_interval_ms / 1000)
        self.vad = Segmenter(config.vad)
        v = config.vad
        self.windower = Windower(name, int(config.windows.hop_s * SAMPLE_RATE),
                                 int(config.windows.settle_max_s * SAMPLE_RATE),
                                 (v.pre_roll_ms + v.start_ms + v.min_speech_ms + v.frame_ms) * SAMPLE_RATE // 1000)
        self.windows: collections.OrderedDict[str, Window] = collections.OrderedDict()  # newest last, bounded
        self._unresolved: dict[int, int] = {}  # utterance index → start, until its final result is back
        self.state = "starting"
        # (first sample index, wall time) of recent chunks, to put wall-clock times on stream positions
        self._anchors: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._partial_at = 0  # stream index at which the next partial is due
        self._partial_text: dict[int, str] = {}
        self._revision: dict[int, int] = {}
        self.finals = 0
        self.utterances = 0
        self.last_latency_s: float | None = None

    def wall_at(self, index: int) -> float | None:
        """Wall-clock time (s) of stream sample `index`, from the nearest earlier chunk's capture time."""
        for first, wall in reversed(self._anchors):
            if first <= index:
                return round(wall + (index - first) / SAMPLE_RATE, 6)
        return None

    def publish(self, type_: str, **fields: object) -> None:
        self.bus.publish({"type": type_, "stream": self.name, **fields})

    async def run(self) -> None:
        """Consume the input queue until `END`."""
        while True:
            item = await self.queue.get()
            if item is END:
                await self._flush()
                return
            if isinstance(item, AudioChunk):
                await self._audio(item)
            elif isinstance(item, Gap):
                self.publish("stream.gap", at=seconds(self.ring.end), duration_s=round(item.duration_s, 3),
                             reason=item.reason)
            elif isinstance(item, Status):
                if item.state in ("lost", "closed", "error"):
                    await self._flush()  # a gap or an end cuts the utterance: its final goes out now
                self.state = item.state
                self.publish("stream.status", state=item.state, detail=item.detail)

    async def _audio(self, chunk: AudioChunk) -> None:
        first = self.ring.write(chunk.samples)
        self._anchors.append((first, chunk.wall))
        level = self.level.push(chunk.samples, first, time.time())
        if level is not None:
            self.publish("level", start=seconds(level.start), end=seconds(level.stop),
                         rms_dbfs=round(level.rms_dbfs, 2), peak_dbfs=round(level.peak_dbfs, 2))
        for ev in self.vad.push(chunk.samples):
            await self._vad_event(ev)
        self._maybe_partial()
        self._close_windows()

    def _close_windows(self) -> None:
        starts = list(self._unresolved.values())
        if self.vad.open_start is not None:
            starts.append(self.vad.open_start)
        for w in self.windower.ready(self.ring.end, min(starts) if starts else None):
            self.windows[w.id] = w
            while len(self.windows) > self.config.windows.keep:
                self.windows.popitem(last=False)
            self.publish("window", id=w.id, start=seconds(w.start), end=seconds(w.end),
                         wall_start=self.wall_at(w.start), wall_end=self.wall_at(w.end), transcript=w.transcript)
            if self.on_window is not None:
                self.on_window(self, w)

    def window_audio(self, w: Window):  # noqa: ANN201
        """[160000] float32 of the window, or None once the ring has overwritten it."""
        try:
            return self.ring.read(w.start, w.end)
        except IndexError:
            return None

    def window_at(self, t: float) -> Window | None:
        """The newest window whose range holds stream time `t` (s)."""
        i = int(t * SAMPLE_RATE)
        return next((w for w in reversed(self.windows.values()) if w.start <= i < w.end), None)

    async def _vad_event(self, ev: SpeechStart | SpeechEnd) -> None:
        if isinstance(ev, SpeechStart):
            self._unresolved[ev.index] = ev.start
            self.utterances += 1
            self._partial_at = ev.start + self.config.asr.partial_interval_ms * SAMPLE_RATE // 1000
            self.publish("speech.start", id=self.utterance_id(ev.index), start=seconds(ev.start),
                         wall=self.wall_at(ev.start))
            return
        job = AsrJob(self.name, ev.index, ev.start, ev.end, self.ring.read(ev.start, ev.end), True,
                     time.monotonic(), ev)
        while not self.asr.offer_final(job):
            await asyncio.sleep(0.02)  # full: wait for room, never drop a final (module docstring of asr)

    def _maybe_partial(self) -> None:
        index, start = self.vad.open_index, self.vad.open_start
        if not self.config.asr.partials or index is None or start is None or self.ring.end < self._partial_at:
            return
        self._partial_at = self.ring.end + self.config.asr.partial_interval_ms * SAMPLE_RATE // 1000
        self.asr.offer_partial(AsrJob(self.name, index, start, self.ring.end, self.ring.read(start, self.ring.end),
                                      False, time.monotonic()))

    async def _flush(self) -> None:
        for ev in self.vad.flush():
            await self._vad_event(ev)

    def utterance_id(self, index: int) -> str:
        return f"{self.name}/{index}"

    def on_result(self, r: AsrResult) -> None:
        """An ASR result for this stream (called on the event loop)."""
        job = r.job
        uid = self.utterance_id(job.index)
        if not job.final:
            if self._partial_text.get(job.index) == r.text:
                return  # nothing new: never re-send unchanged text
            self._partial_text[job.index] = r.text
            self._revision[job.index] = self._revision.get(job.index, 0) + 1
            self.publish("transcript.partial", id=uid, start=seconds(job.start), end=seconds(job.stop),
                         text=r.text, revision=self._revision[job.index])
            return
        self._partial_text.pop(job.index, None)
        self._revision.pop(job.index, None)
        ev = job.context
        assert isinstance(ev, SpeechEnd)
        self._unresolved.pop(job.index, None)
        self.windower.add_final(ev.start, ev.end, r.text)
        wall_end = self.wall_at(ev.speech_end)
        self.finals += 1
        if wall_end is not None:
            self.last_latency_s = round(time.time() - wall_end, 4)
        self.publish("transcript.final", id=uid, start=seconds(ev.start), end=seconds(ev.end),
                     speech_end=seconds(ev.speech_end), text=r.text, reason=ev.reason,
                     wall_start=self.wall_at(ev.start), wall_end=wall_end,
                     dropped_segments=r.dropped_segments,
                     asr_ms=round(r.decode_s * 1000, 1), queue_ms=round(r.wait_s * 1000, 1))
        self._close_windows()  # a window may have waited for this final

    def health(self) -> dict[str, object]:
        return {"kind": self.kind, "state": self.state, "seconds": seconds(self.ring.end),
                "utterances": self.utterances, "finals": self.finals, "queue": self.queue.qsize(),
                "last_final_latency_s": self.last_latency_s, "windows": self.windower.index}
