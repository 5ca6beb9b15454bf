"""The question desk: where a client's `ask` becomes a model job and its answer events find their way back.

It resolves what a question is about: one live window (its audio and transcript), or, for a question about the
past (`scope` history, or auto and the question asks about the past), the stored windows that retrieval ranks
best. It queues the job, relays the answer events to the asking client only, records finished answers, and
cancels questions on `cancel`, on disconnect and at shutdown (always through the scheduler's locked API).
It receives what it uses: the scheduler, the feature cache, each stream's recent windows, a `search` over the
history store (None without one), a `record` for finished answers, and its settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

from ltu_as import GenerationOptions

from ..config import HistoryConfig, QuestionsConfig
from ..delivery.events import Answer, AnswerDone, ErrorEvent, HistoryHit
from ..delivery.protocol import Ask, ProtocolError
from ..delivery.wire import ErrorCode, MessageId
from ..memory.retrieval import wants_history
from ..reply import Reply
from .cache import FeatureCache
from .scheduler import Asked, Busy, HistoryJob, QuestionJob, Scheduler
from .windows import StreamWindows, Window

# Search the history: (query, since, until, streams, limit) → hits, best first (blocking: run in a thread).
Search = Callable[[str, float | None, float | None, Sequence[str], int], list[HistoryHit]]


class QuestionDesk:
    def __init__(
        self,
        scheduler: Scheduler,
        cache: FeatureCache,
        windows: Mapping[str, StreamWindows],
        config: QuestionsConfig,
        deadline_s: float,
        *,
        history: HistoryConfig | None = None,
        search: Search | None = None,
        record: Callable[[str, AnswerDone], None] | None = None,
    ) -> None:
        self.scheduler, self.cache, self.windows = scheduler, cache, windows
        self.config, self.deadline_s = config, deadline_s
        self.history, self.search, self.record = history or HistoryConfig(), search, record
        self._open: dict[object, set[Asked]] = {}  # client → its questions not yet ended

    def resolve(self, msg: Ask) -> Window:
        """The window a question is about: `window` id, else `at` on `stream`, else the stream's latest.
        Raises `ProtocolError` (unknown_stream, unknown_window, no_window)."""
        if msg.window is not None:
            stream = msg.window.split(":w", 1)[0]
            found = self.windows[stream].get(msg.window) if stream in self.windows else None
            if found is None:
                keep = next(iter(self.windows.values())).keep if self.windows else 0
                raise ProtocolError(
                    ErrorCode.UNKNOWN_WINDOW,
                    f"no window {msg.window!r} (ids come in window events; the newest {keep} per stream are kept)",
                    msg.id,
                )
            return found
        if msg.stream is not None:
            windows = self.windows.get(msg.stream)
            if windows is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_STREAM,
                    f"no stream {msg.stream!r}; streams: {', '.join(self.windows) or 'none'}",
                    msg.id,
                )
        else:
            windows = next((w for w in self.windows.values() if len(w)), None)
            if windows is None:
                raise ProtocolError(ErrorCode.NO_WINDOW, "no stream has a complete 10 s window yet", msg.id)
        w = windows.at(msg.at) if msg.at is not None else windows.latest()
        if w is None:
            what = f"at {msg.at:g} s" if msg.at is not None else "yet"
            raise ProtocolError(ErrorCode.NO_WINDOW, f"stream {windows.name!r} has no window {what}", msg.id)
        return w

    async def ask(self, owner: object, send: Callable[[Answer], None], msg: Ask) -> None:
        """Queue `msg` for `owner`; its answer events go to `send` on the loop (call on the loop).
        Raises `ProtocolError` when the question cannot be queued."""
        if any(j.tag == msg.id for j in self._open.get(owner, ())):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"question {msg.id!r} is still being answered", msg.id)
        past = msg.since is not None or msg.until is not None
        if msg.scope == "history" or (msg.scope == "auto" and (past or wants_history(msg.question))):
            job: Asked = await self._history_job(owner, send, msg)
        else:
            job = self._live_job(owner, send, msg)
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise ProtocolError(ErrorCode.BUSY, str(e), msg.id, retry_after_s=e.retry_after_s) from None
        self._open.setdefault(owner, set()).add(job)

    def _options(self, msg: Ask, default_tokens: int) -> GenerationOptions:
        q = self.config
        return GenerationOptions(
            max_new_tokens=min(msg.max_new_tokens or default_tokens, q.max_new_tokens_limit),
            do_sample=not msg.greedy,
            temperature=msg.temperature,
            top_p=msg.top_p,
            top_k=msg.top_k,
            repetition_penalty=msg.repetition_penalty,
            seed=msg.seed,
        )

    def _live_job(self, owner: object, send: Callable[[Answer], None], msg: Ask) -> QuestionJob:
        w = self.resolve(msg)
        audio = None
        if w.id not in self.cache:
            audio = self.windows[w.stream].audio(w)
            if audio is None:
                raise ProtocolError(ErrorCode.WINDOW_EXPIRED, f"window {w.id} is no longer in memory", msg.id)
        job = QuestionJob(
            window=w,
            audio=audio,
            deadline=time.monotonic() + self.deadline_s,
            question=msg.question,
            options=self._options(msg, self.config.max_new_tokens),
            owner=owner,
            tag=msg.id,
            reply=Reply.here(lambda e: self._relay(job, msg.question, send, e)),
        )
        return job

    async def _history_job(self, owner: object, send: Callable[[Answer], None], msg: Ask) -> HistoryJob:
        if self.search is None:
            raise ProtocolError(
                ErrorCode.HISTORY_DISABLED, "this daemon keeps no history (store.enabled = false)", msg.id
            )
        if msg.stream is not None and msg.stream not in self.windows:
            raise ProtocolError(
                ErrorCode.UNKNOWN_STREAM,
                f"no stream {msg.stream!r}; streams: {', '.join(self.windows) or 'none'}",
                msg.id,
            )
        until = msg.until
        since = msg.since if msg.since is not None else (until or time.time()) - self.history.since_h * 3600
        streams = [msg.stream] if msg.stream else ["*"]
        hits = await asyncio.to_thread(self.search, msg.question, since, until, streams, self.history.max_windows)
        job = HistoryJob(
            deadline=time.monotonic() + self.deadline_s,
            question=msg.question,
            hits=hits,
            options=self._options(msg, self.history.max_new_tokens),
            owner=owner,
            tag=msg.id,
            reply=Reply.here(lambda e: self._relay(job, msg.question, send, e)),
        )
        return job

    def _relay(self, job: Asked, question: str, send: Callable[[Answer], None], event: Answer) -> None:
        if isinstance(event, AnswerDone | ErrorEvent):
            jobs = self._open.get(job.owner)
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del self._open[job.owner]
        if isinstance(event, AnswerDone) and self.record is not None:
            self.record(question, event)
        send(event)

    def cancel(self, owner: object, tag: MessageId) -> bool:
        """Cancel `owner`'s question `tag` (waiting or running). False if there is no such question."""
        jobs = [j for j in self._open.get(owner, ()) if j.tag == tag]
        self.scheduler.cancel(jobs)
        return bool(jobs)

    def disconnected(self, owner: object) -> None:
        """A client left: its questions are cancelled (their answers go nowhere)."""
        self.scheduler.cancel(self._open.pop(owner, set()))

    def cancel_all(self) -> None:
        """Shutdown: every open question ends as cancelled."""
        self.scheduler.cancel([j for jobs in self._open.values() for j in jobs])

    @property
    def open_questions(self) -> int:
        return sum(len(jobs) for jobs in self._open.values())
