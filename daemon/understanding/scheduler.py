"""The one queue in front of the model worker.

- Priorities: a model swap (a learned checkpoint), then questions (about a live window, or about the past), then
  alert checks (the yes/no rules asked of each
  window), then scene descriptions, then digests. (ASR runs on its own worker; on a shared GPU its finals would
  come first.) The worker moves jobs into the decode engine's running batch, where questions take free slots
  first and preempt scene rows when none is free.
- Scene jobs coalesce per stream: at most one waits per stream. A newer one replaces it and counts it as skipped,
  so a stream that is behind gets its newest window described.
- Questions on the same window with the same generation options are taken together (up to `max_batch`), so they
  share one prefill of the audio and the common prompt prefix. Scene jobs of several streams are taken together
  too (one batched feature extraction and one batched decode).
- Bounded: at most `max_queue` questions wait; beyond that `submit` raises `Busy` with a retry hint instead of
  growing. At most `max_queue` checks wait; beyond that the oldest is dropped and counted (a newer window is the
  better one to check). At most one digest per stream waits. Jobs past their deadline when they reach the front
  are failed, not run; cancelled ones end at once.

Thread-safe: the event loop submits and cancels, the worker thread pops. `cancel` is the only writer of a job's
`cancelled` flag; the worker reads it between tokens.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..delivery.events import Answer, DigestEvent, Evidence, HistoryHit, SceneEvent
from ..delivery.wire import MessageId
from ..reply import Reply
from .windows import Window

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ltu_as import GenerationOptions


class Busy(Exception):
    def __init__(self, retry_after_s: float, depth: int) -> None:
        super().__init__(f"the model queue is full ({depth} questions waiting); retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


_ids = itertools.count(1)


@dataclass(eq=False, kw_only=True)
class _Job:
    """`deadline` and `submitted` are time.monotonic() values."""

    deadline: float
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # written only by Scheduler.cancel
    seq: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False, kw_only=True)
class _WindowJob(_Job):
    """Work on one `window`; `audio` is its `[WINDOW_SAMPLES]` float32, or None when its features are cached."""

    window: Window
    audio: np.ndarray | None

    def describe(self) -> str:
        return self.window.id


@dataclass(eq=False, kw_only=True)
class SceneJob(_WindowJob):
    """Describe the window; the `SceneEvent` goes to `reply` (the bus)."""

    reply: Reply[SceneEvent]
    skipped: int = 0  # scene jobs of this stream this one replaced


@dataclass(eq=False, kw_only=True)
class QuestionJob(_WindowJob):
    """Answer `question` about the window for the client `owner`, which named it `tag`; every answer event
    (start, deltas, done, or an error) goes to `reply`."""

    question: str
    options: GenerationOptions
    owner: object
    tag: MessageId
    reply: Reply[Answer]
    ended: bool = False  # written by the worker once it sent answer.done or an error


@dataclass(frozen=True)
class CheckResult:
    """The yes/no rules' answers for one window: rule name → P(yes)."""

    stream: str
    window: Evidence
    wall: float
    scores: dict[str, float]


@dataclass(eq=False, kw_only=True)
class CheckJob(_WindowJob):
    """Ask the window each of `questions` (rule name → yes/no question), one prefill each, no decoding."""

    questions: dict[str, str]
    reply: Reply[CheckResult]


@dataclass(eq=False, kw_only=True)
class HistoryJob(_Job):
    """Answer `question` from stored windows (`hits`, best-ranked first): text only, no audio."""

    question: str
    hits: list[HistoryHit]
    options: GenerationOptions
    owner: object
    tag: MessageId
    reply: Reply[Answer]
    ended: bool = False

    def describe(self) -> str:
        return f"history ({len(self.hits)} windows)"


@dataclass(eq=False, kw_only=True)
class DigestJob(_Job):
    """Summarise a stream's stored windows of [since, until) with `prompt`: text only."""

    id: str
    stream: str
    since: float
    until: float
    prompt: str
    hits: list[HistoryHit]
    options: GenerationOptions
    reply: Reply[DigestEvent]

    def describe(self) -> str:
        return f"digest {self.id}"


@dataclass(eq=False, kw_only=True)
class SwapJob(_Job):
    """Load the trainable weights of `checkpoint` into the running model (a learned checkpoint, or back to an
    older one), once the rows decoding now have finished; `reply` gets None when done, else the reason."""

    checkpoint: str
    reply: Reply[str | None]

    def describe(self) -> str:
        return f"swap to {self.checkpoint}"


Asked = QuestionJob | HistoryJob
Job = SceneJob | QuestionJob | CheckJob | HistoryJob | DigestJob | SwapJob
Batch = list[QuestionJob] | list[HistoryJob] | list[CheckJob] | list[SceneJob] | list[DigestJob] | list[SwapJob]


class Scheduler:
    def __init__(self, max_queue: int, max_batch: int, retry_after_s: float) -> None:
        self.max_queue, self.max_batch, self.retry_after_s = max_queue, max_batch, retry_after_s
        self._questions: collections.deque[Asked] = collections.deque()
        self._checks: collections.deque[CheckJob] = collections.deque()
        self._scenes: dict[str, SceneJob] = {}  # stream → the one waiting scene job
        self._digests: dict[str, DigestJob] = {}  # stream → the one waiting digest
        self._swaps: collections.deque[SwapJob] = collections.deque()  # before anything else
        self._cv = threading.Condition()
        self._closed = False
        self.expired: list[Job] = []  # cancelled or past their deadline before they ran; the worker reports them
        self.skipped_scenes = 0
        self.skipped_checks = 0

    @property
    def depth(self) -> dict[str, int]:
        with self._cv:
            return {
                "questions": len(self._questions),
                "checks": len(self._checks),
                "scenes": len(self._scenes),
                "digests": len(self._digests),
            }

    def has_questions(self) -> bool:
        with self._cv:
            return any(not j.cancelled for j in self._questions)

    def submit(self, job: Job) -> None:
        """Queue `job`. Raises `Busy` when `max_queue` questions already wait, or once closed."""
        with self._cv:
            if self._closed:
                raise Busy(self.retry_after_s, 0)
            if isinstance(job, QuestionJob | HistoryJob):
                live = sum(not j.cancelled for j in self._questions)
                if live >= self.max_queue:
                    raise Busy(self.retry_after_s, live)
                self._questions.append(job)
            elif isinstance(job, CheckJob):
                if len(self._checks) >= self.max_queue:
                    self._checks.popleft()
                    self.skipped_checks += 1
                self._checks.append(job)
            elif isinstance(job, DigestJob):
                self._digests[job.stream] = job
            elif isinstance(job, SwapJob):
                self._swaps.append(job)
            else:
                old = self._scenes.get(job.window.stream)
                if old is not None:
                    job.skipped = old.skipped + 1
                    self.skipped_scenes += 1
                self._scenes[job.window.stream] = job
            self._cv.notify()

    def cancel(self, jobs: Iterable[Asked]) -> int:
        """Cancel questions, waiting or running: a waiting one ends when it reaches the front, a running one
        between two tokens. Returns how many were not cancelled already."""
        with self._cv:
            n = 0
            for j in jobs:
                if not j.cancelled:
                    j.cancelled = True
                    n += 1
            self._cv.notify()
            return n

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def pop(self, timeout: float | None = None, limit: int | None = None) -> Batch | None:
        """The next batch (one kind of job): questions on one window (same options) or one history question,
        else one window's check, else the oldest waiting scene jobs of several streams (batched feature
        extraction), else one digest; at most `limit` (and `max_batch`) jobs. None when closed, [] on timeout or
        when jobs expired."""
        most = self.max_batch if limit is None else max(1, min(limit, self.max_batch))
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._expire():
                    return []  # let the worker report them now
                if self._swaps:
                    return [self._swaps.popleft()]
                if self._questions:
                    head = self._questions.popleft()
                    if isinstance(head, HistoryJob):
                        return [head]
                    batch = [head]
                    for j in list(self._questions):
                        if len(batch) >= most:
                            break
                        if isinstance(j, QuestionJob) and j.window.id == head.window.id and j.options == head.options:
                            self._questions.remove(j)
                            batch.append(j)
                    return batch
                if self._checks:
                    return [self._checks.popleft()]
                if self._scenes:
                    jobs = sorted(self._scenes.values(), key=lambda j: j.seq)[:most]
                    for s in jobs:
                        del self._scenes[s.window.stream]
                    return jobs
                if self._digests:
                    first = min(self._digests.values(), key=lambda j: j.seq)
                    del self._digests[first.stream]
                    return [first]
                if self._closed:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._cv.wait(left)

    def _expire(self) -> bool:
        """Move cancelled and overdue jobs to `expired` (the worker ends each with the right event)."""
        now = time.monotonic()
        n = len(self.expired)
        for q in [q for q in self._questions if q.cancelled or q.deadline < now]:
            self._questions.remove(q)
            self.expired.append(q)
        for c in [c for c in self._checks if c.deadline < now]:
            self._checks.remove(c)
            self.expired.append(c)
        for stream, sj in list(self._scenes.items()):
            if sj.deadline < now:
                del self._scenes[stream]
                self.expired.append(sj)
        for stream, dj in list(self._digests.items()):
            if dj.deadline < now:
                del self._digests[stream]
                self.expired.append(dj)
        return len(self.expired) > n

    def take_expired(self) -> list[Job]:
        with self._cv:
            out, self.expired = self.expired, []
            return out
