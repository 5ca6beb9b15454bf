"""The ASR worker: one thread owns the faster-whisper model and decodes utterances for every stream.

Queues (all bounded, policies here because this is where they are enforced):

- finals: FIFO of at most `asr.final_queue` jobs. `offer_final` refuses when full and the stream awaits room
  (backpressure up to its source queue), so a final is never dropped.
- speculative finals (decoded when silence begins, before the hangover confirms the end): at most one pending per
  stream, latest wins; `promote` moves a pending one into the finals queue when the end is confirmed.
- partials: at most one pending job per stream; a newer partial replaces the pending one (latest wins).

Finals always go first, then speculative finals, then partials. A partial whose utterance already has its final
queued or done is skipped, so a partial never arrives after its final. Each result goes back through its job's
`reply` (to the event loop). Every final (offered or promoted) gets exactly one reply: a decode that raises, and a
final still queued when `stop`'s deadline passes, reply with `failed` set and no text.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ltu_as.serving.transcribe import AsrOptions, load_asr, transcribe_batch, transcribe_detailed

from ..capture.vad import SpeechEnd
from ..clock import SAMPLE_RATE
from ..config import AsrConfig
from ..reply import Reply

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

LAST_DECODE_S = 60.0  # at shutdown, how long the decode in progress may still take


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
        self._finals: collections.deque[AsrJob] = collections.deque()
        self._partials: dict[str, AsrJob] = {}
        self._speculative: dict[str, AsrJob] = {}
        self._finalized: dict[str, int] = {}  # stream → highest utterance index with a final queued
        self._cv = threading.Condition()
        self._stop = False
        self._ended = False  # the thread took its last job: nothing queued from now on would run
        self._thread = threading.Thread(target=self._run, name="asr", daemon=True)
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.decoded = 0
        self.batches = 0
        self.busy_s = 0.0

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
            self._partials.pop(job.stream, None)
            self._cv.notify()
            return True

    def offer_speculative(self, job: AsrJob) -> bool:
        """Queue a speculative final, replacing the stream's pending one (latest wins). False when refused (its
        utterance already has a final queued, or the worker is stopping): nothing will come back for it."""
        with self._cv:
            if self._stop or job.index <= self._finalized.get(job.stream, 0):
                return False
            self._speculative[job.stream] = job
            self._partials.pop(job.stream, None)  # silence began: the utterance's text is what this decodes
            self._cv.notify()
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
            self._partials.pop(job.stream, None)
            if self._speculative.get(job.stream) is job:
                del self._speculative[job.stream]
                if self._ended:
                    _fail(job)
                else:
                    self._finals.append(job)
                    self._cv.notify()

    def offer_partial(self, job: AsrJob) -> None:
        """Queue a partial, replacing the stream's pending one (latest wins)."""
        with self._cv:
            if job.index <= self._finalized.get(job.stream, 0):
                return
            self._partials[job.stream] = job
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> int:
        """Finish the queued finals within `timeout` (pending partials are dropped), then end the thread. Finals
        still queued after `timeout` are not decoded: each replies failed, without text (and the log counts them);
        the decode in progress is waited for, so the process never exits in the middle of CTranslate2. Returns how
        many finals were not decoded."""
        with self._cv:
            self._stop = True
            self._partials.clear()  # pending speculative finals stay: a confirmed end may still promote one
            self._cv.notify()
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
        """Up to `limit` jobs to decode together, without waiting: finals, then speculative finals, then
        partials, each oldest first (only finals once stopping)."""
        with self._cv:
            jobs: list[AsrJob] = []
            while self._finals and len(jobs) < limit:
                jobs.append(self._finals.popleft())
            if not self._stop:
                for pending in (self._speculative, self._partials):
                    while pending and len(jobs) < limit:
                        job = pending.pop(_oldest(pending))
                        if job.speculative or job.index > self._finalized.get(job.stream, 0):
                            jobs.append(job)
            return jobs

    def deliver(self, job: AsrJob, text: str, dropped: int, decode_s: float, t0: float, failed: bool = False) -> None:
        """Send `job`'s result (decoded from monotonic time `t0`) to its stream, unless it is a partial whose
        utterance has its final queued by now."""
        with self._cv:
            stale = not job.final and job.index <= self._finalized.get(job.stream, 0)
        if not stale:
            job.reply(AsrResult(job, text, dropped, decode_s, t0 - job.submitted, failed))

    def _next(self, limit: int) -> list[AsrJob]:
        """`take`, waiting for a job; empty once stopped and the finals are done."""
        with self._cv:
            while not (jobs := self.take(limit)) and not self._stop:
                self._cv.wait()
            self._ended = not jobs
            return jobs

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            log.info(
                "loading ASR model %s on %s (a hub model downloads once, with progress bars)",
                self.config.model,
                self.config.device,
            )
            model = load_asr(self.config.model, self.config.device, self.config.compute_type, self.config.cpu_threads)
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
        log.info("ASR decodes up to %d utterance(s) at a time", limit)
        self.ready.set()
        while jobs := self._next(limit):
            t0 = time.monotonic()
            outs = self._decode(model, jobs)
            t1 = time.monotonic()
            self.decoded += len(jobs)
            self.batches += 1
            self.busy_s += t1 - t0
            for job, (text, dropped, failed) in zip(jobs, outs, strict=True):
                self.deliver(job, text, dropped, t1 - t0, t0, failed)

    def _decode(self, model: WhisperModel, jobs: list[AsrJob]) -> list[tuple[str, int, bool]]:
        """(text, dropped segments, failed) per job. One bad decode must not kill the stream: a failed job's final
        still goes out, marked failed (a failed batch is retried job by job, so one bad clip does not fail the
        others)."""
        if len(jobs) > 1:
            try:
                outs = transcribe_batch(model, [j.audio for j in jobs], self.options)
                return [(t.text, t.dropped, False) for t in outs]
            except Exception:
                log.exception("ASR failed on a batch of %d; decoding them one by one", len(jobs))
        result: list[tuple[str, int, bool]] = []
        for job in jobs:
            try:
                out = transcribe_detailed(model, job.audio, self.options)
                result.append((out.text, out.dropped, False))
            except Exception:
                log.exception("ASR failed on %s utterance %d", job.stream, job.index)
                result.append(("", 0, True))
        return result


def _fail(job: AsrJob) -> None:
    """Reply to a final that will not be decoded (the worker ended first): failed, without text."""
    job.reply(AsrResult(job, "", 0, 0.0, time.monotonic() - job.submitted, failed=True))


def _oldest(pending: dict[str, AsrJob]) -> str:
    """The stream whose pending job was submitted first."""
    return min(pending, key=lambda stream: pending[stream].submitted)
