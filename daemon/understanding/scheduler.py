"""The one queue in front of the model worker.

- Priorities: questions, then scene descriptions. (ASR runs on its own worker; on a shared GPU its finals would
  come first, then questions.) A scene job being generated yields to a waiting question between tokens.
- Scene jobs coalesce per stream: at most one waits per stream. A newer one replaces it and counts it as skipped,
  so a stream that is behind gets its newest window described.
- Questions on the same window with the same generation options are taken together (up to `max_batch`), so they
  share one prefill of the audio and the common prompt prefix. Scene jobs of several streams are taken together
  too (one batched feature extraction and one batched decode).
- Bounded: at most `max_queue` questions wait. Beyond that `submit` raises `Busy` with a retry hint instead of
  growing. Jobs past their deadline when they reach the front are failed, not run; cancelled ones end at once.

Thread-safe: the event loop submits and cancels, the worker thread pops. `cancel` is the only writer of a job's
`cancelled` flag; the worker reads it between tokens.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..delivery.events import Answer, SceneEvent
from ..delivery.wire import MessageId
from ..reply import Reply
from .windows import Window

if TYPE_CHECKING:
    from ltu_as import GenerationOptions


class Busy(Exception):
    def __init__(self, retry_after_s: float, depth: int) -> None:
        super().__init__(f"the model queue is full ({depth} questions waiting); retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


_ids = itertools.count(1)


@dataclass(eq=False, kw_only=True)
class _Job:
    """Work on one `window`; `audio` is its `[WINDOW_SAMPLES]` float32, or None when its features are cached.
    `deadline` and `submitted` are time.monotonic() values."""

    window: Window
    audio: np.ndarray | None
    deadline: float
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # written only by Scheduler.cancel
    seq: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False, kw_only=True)
class SceneJob(_Job):
    """Describe the window; the `SceneEvent` goes to `reply` (the bus)."""

    reply: Reply[SceneEvent]
    skipped: int = 0  # scene jobs of this stream this one replaced


@dataclass(eq=False, kw_only=True)
class QuestionJob(_Job):
    """Answer `question` about the window for the client `owner`, which named it `tag`; every answer event
    (start, deltas, done, or an error) goes to `reply`."""

    question: str
    options: GenerationOptions
    owner: object
    tag: MessageId
    reply: Reply[Answer]
    ended: bool = False  # written by the worker once it sent answer.done or an error


Job = SceneJob | QuestionJob


class Scheduler:
    def __init__(self, max_queue: int, max_batch: int, retry_after_s: float) -> None:
        self.max_queue, self.max_batch, self.retry_after_s = max_queue, max_batch, retry_after_s
        self._questions: collections.deque[QuestionJob] = collections.deque()
        self._scenes: dict[str, SceneJob] = {}  # stream → the one waiting scene job
        self._cv = threading.Condition()
        self._closed = False
        self.expired: list[Job] = []  # cancelled or past their deadline before they ran; the worker reports them
        self.skipped_scenes = 0

    @property
    def depth(self) -> dict[str, int]:
        with self._cv:
            return {"questions": len(self._questions), "scenes": len(self._scenes)}

    def has_questions(self) -> bool:
        with self._cv:
            return any(not j.cancelled for j in self._questions)

    def submit(self, job: Job) -> None:
        """Queue `job`. Raises `Busy` when `max_queue` questions already wait, or once closed."""
        with self._cv:
            if self._closed:
                raise Busy(self.retry_after_s, 0)
            if isinstance(job, QuestionJob):
                live = sum(not j.cancelled for j in self._questions)
                if live >= self.max_queue:
                    raise Busy(self.retry_after_s, live)
                self._questions.append(job)
            else:
                old = self._scenes.get(job.window.stream)
                if old is not None:
                    job.skipped = old.skipped + 1
                    self.skipped_scenes += 1
                self._scenes[job.window.stream] = job
            self._cv.notify()

    def requeue_scene(self, job: SceneJob) -> None:
        """Put back a scene job that yielded to a question, unless a newer one for its stream is waiting."""
        with self._cv:
            if job.window.stream not in self._scenes and not self._closed:
                self._scenes[job.window.stream] = job
                self._cv.notify()

    def cancel(self, jobs: Iterable[QuestionJob]) -> int:
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

    def pop(self, timeout: float | None = None) -> list[QuestionJob] | list[SceneJob] | None:
        """The next batch: questions on one window (same options), else the oldest waiting scene jobs of several
        streams (batched feature extraction). None when closed, [] on timeout or when jobs expired."""
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._expire():
                    return []  # let the worker report them now
                if self._questions:
                    head = self._questions.popleft()
                    batch = [head]
                    for j in list(self._questions):
                        if len(batch) >= self.max_batch:
                            break
                        if j.window.id == head.window.id and j.options == head.options:
                            self._questions.remove(j)
                            batch.append(j)
                    return batch
                if self._scenes:
                    jobs = sorted(self._scenes.values(), key=lambda j: j.seq)[: self.max_batch]
                    for s in jobs:
                        del self._scenes[s.window.stream]
                    return jobs
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
        for j in [j for j in self._questions if j.cancelled or j.deadline < now]:
            self._questions.remove(j)
            self.expired.append(j)
        for stream, s in list(self._scenes.items()):
            if s.deadline < now:
                del self._scenes[stream]
                self.expired.append(s)
        return len(self.expired) > n

    def take_expired(self) -> list[Job]:
        with self._cv:
            out, self.expired = self.expired, []
            return out
