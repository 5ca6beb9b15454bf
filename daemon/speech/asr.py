"""The ASR worker: a pool of lanes (threads) that share one faster-whisper model and decode utterances for every
stream.

Lanes: `asr.lanes` threads each run one decode at a time on the shared model (CTranslate2 `inter_threads`). On a
CPU two lanes decode 1.5x the utterances per second of one lane with twice the threads (bench/asr_lanes.py,
docs/performance.md), and a lane stays free for finals while another runs a partial. On a GPU one lane batches.

Queues (all bounded, policies here because this is where they are enforced):

- finals: FIFO of at most `asr.final_queue` jobs. `offer_final` refuses when full and the stream awaits room
  (backpressure up to its source queue), so a final is never dropped.
- speculative finals (decoded when silence begins, before the hangover confirms the end): at most one pending per
  stream, latest wins; `promote` moves a pending one into the finals queue when the end is confirmed.
- partials: at most one pending job per stream; a newer partial replaces the pending one (latest wins).

Finals first, always: finals, then speculative finals, then partials; a partial starts only when no final or
speculative final waits, while fewer than `lanes - 1` partials run (one lane is always free for a final), and
within the partials' budget (`asr.partial_share` of the lanes' time, `daemon.speech.load`). When finals wait longer
than `asr.overload_lag_s` the worker degrades step by step (partials off, beam 1, no speculation; see
`daemon.speech.load`) and recovers on its own. A partial whose utterance already has its final queued or done is
skipped, so a partial never arrives after its final. Each result goes back through its job's `reply` (to the
event loop). Every final (offered or promoted) gets exactly one reply: a decode that raises, and a final still
queued when `stop`'s deadline passes, reply with `failed` set and no text.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ltu_as.serving.transcribe import AsrOptions, load_asr, transcribe_batch, transcribe_detailed

from ..capture.vad import SpeechEnd
from ..clock import SAMPLE_RATE
from ..config import AsrConfig
from ..reply import Reply
from .load import LEVELS, Overload, PartialBudget, partial_interval_s

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

LAST_DECODE_S = 60.0  # at shutdown, how long the decode in progress may still take
WATCH_S = 0.25  # an idle lane looks at the finals' lag and the partials' budget this often, s
SPEAKING_S = 3.0  # a stream that asked for a partial this recently counts as speaking (for the partials' cadence)


@dataclass(frozen=True, eq=False)  # compared by identity: which decode stands for an utterance
class AsrJob:
    """Decode `audio` ([n] float32 on the stream clock) = samples [start, stop) of utterance `index` of `stream`.
    A final carries the VAD's `end` (what closed the utterance); a partial carries None."""

    stream: str
    index: int
    start: int
    stop: int
    audio: np.ndarray
    end: SpeechEnd | None
    submitted: float  # time.monotonic()
    reply: Reply[AsrResult]
    speculative: bool = False  # decoded when silence began; the stream keeps it only if the end is confirmed
    # somebody waits for it in real time (a live stream, a speech request); a faster-than-real-time file's backlog
    # is its normal state, so its finals do not count towards the overload lag
    live: bool = True

    @property
    def final(self) -> bool:
        return self.end is not None


@dataclass(frozen=True)
class AsrResult:
    job: AsrJob
    text: str
    dropped_segments: int
    decode_s: float
    wait_s: float
    failed: bool = False  # the decode raised, or the daemon stopped before it ran: no text, not "no speech"


def outcome(r: AsrResult) -> Literal["speech", "no_speech", "failed"]:
    """What a final's `outcome` says of its result: text, no speech (the defences kept nothing), or failed."""
    return "failed" if r.failed else "speech" if r.text else "no_speech"


class AsrWorker:
    def __init__(self, config: AsrConfig) -> None:
        self.config = config
        self.options = AsrOptions(
            beam_size=config.beam_size,
            temperature=0.0,
            language=config.language,
            no_speech_threshold=config.no_speech_threshold,
            logprob_threshold=config.logprob_threshold,
            compression_ratio_threshold=config.compression_ratio_threshold,
            max_new_tokens=config.max_new_tokens,
            lead_silence_s=config.lead_silence_ms / 1000,
        )
        self._fast = dataclasses.replace(self.options, beam_size=1)  # finals under overload (`fast_decode`)
        self._finals: collections.deque[AsrJob] = collections.deque()
        self._partials: dict[str, AsrJob] = {}
        self._speculative: dict[str, AsrJob] = {}
        self._finalized: dict[str, int] = {}  # stream → highest utterance index with a final queued
        self._cv = threading.Condition()
        self._stop = False
        self._ended = False  # the lanes took their last job: nothing queued from now on would run
        self._thread = threading.Thread(target=self._run, name="asr", daemon=True)
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.lanes = 1  # set once the model is loaded (`asr.lanes`, or auto)
        self._busy = 0  # lanes decoding now
        self._partials_running = 0
        self.budget = PartialBudget(config.partial_share, 1)
        self.overload = Overload(config.overload_lag_s, config.overload_escalate_s, config.overload_recover_s)
        # Told of every change of degradation level (from a lane's thread, under the worker's lock: it must only
        # hand the change on, e.g. a `Reply` to the event loop).
        self.on_overload: Callable[[LoadChange], None] | None = None
        self._speaking: dict[str, float] = {}  # stream → when it last asked for a partial (monotonic s)
        self._partial_cost = 0.0  # running mean of a partial's decode, s (0 until one ran)
        self.decoded = 0
        self.batches = 0
        self.busy_s = 0.0
        # decodes by kind (final, speculative, partial) and partials not decoded by why: superseded (a newer one
        # replaced it while it waited), shed (dropped by the overload level), stale (its final came first)
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def depth(self) -> dict[str, int]:
        with self._cv:
            return {"finals": len(self._finals), "speculative": len(self._speculative), "partials": len(self._partials)}

    def start(self) -> None:
        self._thread.start()

    def offer_final(self, job: AsrJob) -> bool:
        """Queue a final; False when the queue is full (the caller retries: a final is never dropped). Once the
        worker has ended (shutdown), the final replies at once, failed."""
        with self._cv:
            if self._ended:
                _fail(job)
                return True
            if len(self._finals) >= self.config.final_queue:
                return False
            self._finals.append(job)
            self._finalized[job.stream] = max(self._finalized.get(job.stream, 0), job.index)
            self._drop_partial(job.stream, "stale")
            self._cv.notify_all()
            return True

    def offer_speculative(self, job: AsrJob) -> bool:
        """Queue a speculative final, replacing the stream's pending one (latest wins). False when refused (its
        utterance already has a final queued, the worker is stopping, or overload turned speculation off):
        nothing will come back for it."""
        with self._cv:
            if self._stop or job.index <= self._finalized.get(job.stream, 0):
                return False
            if self.overload.mode == "no_speculation":
                self.counts["speculative_refused"] += 1
                return False
            self._speculative[job.stream] = job
            self._drop_partial(job.stream, "stale")  # silence began: the utterance's text is what this decodes
            self._cv.notify_all()
            return True

    def withdraw(self, job: AsrJob) -> None:
        """A speculative final that no longer stands for anything: drop it if it has not started."""
        with self._cv:
            if self._speculative.get(job.stream) is job:
                del self._speculative[job.stream]

    def promote(self, job: AsrJob) -> None:
        """The end `job` guessed is confirmed: if it still waits, it joins the finals (never dropped from here
        on; a running or finished one replies anyway); either way no partial of its utterance runs any more."""
        with self._cv:
            self._finalized[job.stream] = max(self._finalized.get(job.stream, 0), job.index)
            self._drop_partial(job.stream, "stale")
            if self._speculative.get(job.stream) is job:
                del self._speculative[job.stream]
                if self._ended:
                    _fail(job)
                else:
                    self._finals.append(job)
                    self._cv.notify_all()

    @property
    def partials_allowed(self) -> bool:
        """False while overload has turned partials off (a stream need not even cut the audio)."""
        return self.overload.level < LEVELS.index("no_partials")

    def partial_interval_s(self, base_s: float) -> float:
        """How often a speaking stream may ask for a partial now: `base_s` stretched by how many streams speak,
        what a partial costs and the partials' share (`daemon.speech.load.partial_interval_s`)."""
        with self._cv:
            now = time.monotonic()
            for stream in [s for s, at in self._speaking.items() if now - at > SPEAKING_S]:
                del self._speaking[stream]
            speaking = max(1, len(self._speaking))
            return partial_interval_s(base_s, speaking, self._partial_cost, self.config.partial_share, self.lanes)

    def offer_partial(self, job: AsrJob) -> None:
        """Queue a partial, replacing the stream's pending one (latest wins)."""
        with self._cv:
            self._speaking[job.stream] = time.monotonic()
            if job.index <= self._finalized.get(job.stream, 0):
                return
            if not self.partials_allowed:
                self.counts["partial_shed"] += 1
                return
            self._drop_partial(job.stream, "superseded")
            self._partials[job.stream] = job
            self._cv.notify_all()

    def _drop_partial(self, stream: str, why: str) -> None:
        if self._partials.pop(stream, None) is not None:
            self.counts[f"partial_{why}"] += 1

    def lag_s(self) -> float:
        """How long the oldest waiting live final (or speculative final) has waited, s; 0 when none waits."""
        with self._cv:
            return self._lag(time.monotonic())

    def _lag(self, now: float) -> float:
        waiting = itertools.chain(self._finals, self._speculative.values())
        oldest = min((j.submitted for j in waiting if j.live), default=now)
        return max(0.0, now - oldest)

    def stop(self, timeout: float | None = None) -> int:
        """Finish the queued finals within `timeout` (pending partials are dropped), then end the lanes. Finals
        still queued after `timeout` are not decoded: each replies failed, without text (and the log counts them);
        the decodes in progress are waited for, so the process never exits in the middle of CTranslate2. Returns
        how many finals were not decoded."""
        with self._cv:
            self._stop = True
            self._partials.clear()  # pending speculative finals stay: a confirmed end may still promote one
            self._cv.notify_all()
        self._thread.join(timeout)
        dropped: list[AsrJob] = []
        if self._thread.is_alive():
            with self._cv:
                dropped, self._finals = list(self._finals), collections.deque()
            log.warning(
                "ASR did not finish its queue within %.1f s: %d queued finals go out failed, without text",
                timeout or 0,
                len(dropped),
            )
        for job in dropped:  # a final is late or failed, never lost: its stream still closes the utterance
            _fail(job)
        if dropped:
            self._thread.join(LAST_DECODE_S)
        return len(dropped)

    def take(self, limit: int) -> list[AsrJob]:
        """Up to `limit` jobs to decode together, without waiting: finals, then speculative finals, each oldest
        first (only finals once stopping); partials only when neither waits (finals first, always), while a lane
        stays free for finals and the partials' budget allows."""
        with self._cv:
            jobs: list[AsrJob] = []
            while self._finals and len(jobs) < limit:
                jobs.append(self._finals.popleft())
            if self._stop:
                return jobs
            while self._speculative and len(jobs) < limit:
                job = self._speculative.pop(_oldest(self._speculative))
                if job.index > self._finalized.get(job.stream, 0) or job.speculative:
                    jobs.append(job)
            if jobs or not self._partials or not self._partial_may_start():
                return jobs
            while self._partials and len(jobs) < limit:
                job = self._partials.pop(_oldest(self._partials))
                if job.index > self._finalized.get(job.stream, 0):
                    jobs.append(job)
            self._partials_running += len(jobs)
            return jobs

    def _partial_may_start(self) -> bool:
        return (
            self.partials_allowed
            and self._partials_running < max(1, self.lanes - 1)
            and self.budget.allows(time.monotonic())
        )

    def deliver(self, job: AsrJob, text: str, dropped: int, decode_s: float, t0: float, failed: bool = False) -> None:
        """Send `job`'s result (decoded from monotonic time `t0`) to its stream, unless it is a partial whose
        utterance has its final queued by now."""
        with self._cv:
            stale = not job.final and job.index <= self._finalized.get(job.stream, 0)
        if not stale:
            job.reply(AsrResult(job, text, dropped, decode_s, t0 - job.submitted, failed))

    def _next(self, limit: int) -> list[AsrJob]:
        """`take`, waiting for a job (and watching the finals' lag meanwhile); empty once stopped, the finals
        are done and no lane is decoding (a busy lane may still be handed a final that comes late)."""
        with self._cv:
            while True:
                self._watch(time.monotonic())
                if jobs := self.take(limit):
                    self._busy += 1
                    return jobs
                if self._stop and not self._busy:
                    self._ended = True
                    self._cv.notify_all()
                    return []
                # a timeout: a partial held back by its budget may start once the budget refills
                self._cv.wait(WATCH_S)

    def _watch(self, now: float) -> None:
        """Feed the finals' lag to the overload state; log and report a change of level (under the lock)."""
        lag, before = self._lag(now), self.overload.level
        level = self.overload.observe(now, lag)
        if level is None:
            return
        change = LoadChange(level, round(lag, 3))
        if level > 0:  # partials are off from the first step: the pending ones would never start
            for stream in list(self._partials):
                self._drop_partial(stream, "shed")
        if level == 0:
            log.warning("ASR caught up (the oldest final waits %.1f s): back to normal", lag)
        elif level < before:
            log.warning("ASR is catching up (the oldest final waits %.1f s): one step back, to %s", lag, change.mode)
        else:
            log.warning(
                "ASR is behind: the oldest final has waited %.1f s (asr.overload_lag_s = %.1f): %s (step %d of %d)",
                lag, self.config.overload_lag_s, change.mode, level, len(LEVELS) - 1,
            )  # fmt: skip
        if self.on_overload is not None:
            self.on_overload(change)

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            log.info(
                "loading ASR model %s on %s (a hub model downloads once, with progress bars)",
                self.config.model,
                self.config.device,
            )
            device = asr_device(self.config.device)
            lanes = self.config.lanes or auto_lanes(device)
            model = load_asr(
                self.config.model, device, self.config.compute_type, self.config.cpu_threads, num_workers=lanes
            )
            # One decode of silence warms CTranslate2's kernels and allocator, so the first real final is not slow.
            transcribe_detailed(model, np.zeros(SAMPLE_RATE, dtype=np.float32), self.options)
            log.info("ASR model %s ready in %.1f s", self.config.model, time.monotonic() - t0)
        except Exception as e:  # reported to the service, which exits with a clear message
            self.error = e
            log.error("ASR model %s failed to load: %s", self.config.model, e)
            self.ready.set()
            return
        # On a GPU one encoder call for several utterances costs about as much as for one; on a CPU it costs the
        # sum (measured: 4 utterances 2.4 s together vs 4 x 0.5 s), and batching only delays the first result.
        limit = self.config.batch_size or (8 if model.model.device == "cuda" else 1)
        with self._cv:
            self.lanes = lanes
            self.budget = PartialBudget(self.config.partial_share, lanes)
        log.info("ASR decodes on %d lane(s), up to %d utterance(s) at a time each", lanes, limit)
        self.ready.set()
        others = [threading.Thread(target=self._lane, args=(model, limit), name=f"asr-{k}", daemon=True)
                  for k in range(1, lanes)]  # fmt: skip
        for t in others:
            t.start()
        self._lane(model, limit)
        for t in others:
            t.join()

    def _lane(self, model: WhisperModel, limit: int) -> None:
        while jobs := self._next(limit):
            fast = self.overload.mode in ("fast_decode", "no_speculation")
            t0 = time.monotonic()
            outs = self._decode(model, jobs, self._fast if fast else self.options)
            t1 = time.monotonic()
            with self._cv:
                self._busy -= 1
                self.decoded += len(jobs)
                self.batches += 1
                self.busy_s += t1 - t0
                partials = sum(not j.final for j in jobs)
                for j in jobs:
                    self.counts["speculative" if j.speculative else "final" if j.final else "partial"] += 1
                if partials:
                    self._partials_running -= partials
                    self.budget.spend(t1, t1 - t0)
                    cost = (t1 - t0) / len(jobs)
                    self._partial_cost = cost if not self._partial_cost else 0.8 * self._partial_cost + 0.2 * cost
                self._cv.notify_all()
            for job, (text, dropped, failed) in zip(jobs, outs, strict=True):
                self.deliver(job, text, dropped, t1 - t0, t0, failed)

    def _decode(self, model: WhisperModel, jobs: list[AsrJob], options: AsrOptions) -> list[tuple[str, int, bool]]:
        """(text, dropped segments, failed) per job. One bad decode must not kill the stream: a failed job's final
        still goes out, marked failed (a failed batch is retried job by job, so one bad clip does not fail the
        others)."""
        if len(jobs) > 1:
            try:
                outs = transcribe_batch(model, [j.audio for j in jobs], options)
                return [(t.text, t.dropped, False) for t in outs]
            except Exception:
                log.exception("ASR failed on a batch of %d; decoding them one by one", len(jobs))
        result: list[tuple[str, int, bool]] = []
        for job in jobs:
            try:
                out = transcribe_detailed(model, job.audio, options)
                result.append((out.text, out.dropped, False))
            except Exception:
                log.exception("ASR failed on %s utterance %d", job.stream, job.index)
                result.append(("", 0, True))
        return result


@dataclass(frozen=True)
class LoadChange:
    """The ASR's degradation `level` changed (0 = normal); `lag_s`: the finals' lag when it changed, s."""

    level: int
    lag_s: float

    @property
    def mode(self) -> str:
        """The level's name (`daemon.speech.load.LEVELS`)."""
        return LEVELS[self.level]


def asr_device(device: str) -> str:
    """`asr.device` resolved: "auto" is "cuda" when CTranslate2 sees a CUDA device, else "cpu"."""
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def auto_lanes(device: str) -> int:
    """`asr.lanes = 0`: one lane that batches on a GPU; on a CPU two lanes when there are two cores or more
    (measured on 2 cores: 2.6 decodes/s against 1.7 for one lane with both threads, docs/performance.md)."""
    if device.startswith("cuda"):
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _fail(job: AsrJob) -> None:
    """Reply to a final that will not be decoded (the worker ended first): failed, without text."""
    job.reply(AsrResult(job, "", 0, 0.0, time.monotonic() - job.submitted, failed=True))


def _oldest(pending: dict[str, AsrJob]) -> str:
    """The stream whose pending job was submitted first."""
    return min(pending, key=lambda stream: pending[stream].submitted)
