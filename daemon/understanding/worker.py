"""The model worker: one thread owns the LTU-AS model (feature encoder, TLTR, projector, LLaMA + LoRA) and runs
the scheduler's jobs. Results are protocol messages sent through each job's `reply` (to the event loop).
Cancellation and yielding to questions are checked between tokens.

A job that raises ends every question in its batch with an `internal` error carrying the question's id (and the
worker goes on); running out of accelerator memory ends them with `out_of_memory` and a retry hint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch

from ltu_as import GenerationOptions, LoadedModel, load_model
from ltu_as.model.generation import yes_probability
from ltu_as.model.processor import TextStreamer

from ..clock import SAMPLE_RATE, WINDOW_SAMPLES
from ..config import ModelConfig, SceneConfig
from ..delivery.events import (
    AnswerDelta,
    AnswerDone,
    AnswerStart,
    AnswerTimings,
    DigestEvent,
    ErrorEvent,
    Evidence,
    SceneEvent,
    SceneTimings,
    WindowRef,
)
from ..delivery.wire import ErrorCode
from ..memory.retrieval import evidence, fit, history_input
from .cache import FeatureCache
from .scheduler import Asked, Batch, CheckJob, CheckResult, DigestJob, HistoryJob, Job, QuestionJob, SceneJob, Scheduler

log = logging.getLogger(__name__)

OOM_RETRY_S = 5.0  # what an out-of-memory error suggests: let other work finish and memory come back


class WindowGone(Exception):
    """Neither the window's features nor its audio are available any more."""


def _ms(t: float) -> float:
    return round(t * 1000, 1)


class ModelWorker:
    def __init__(self, model: ModelConfig, scene: SceneConfig, scheduler: Scheduler, cache: FeatureCache) -> None:
        self.model_config, self.scene = model, scene
        self.scheduler = scheduler
        self.cache = cache
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.loaded: LoadedModel | None = None
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        # Test hook: called with each batch before it runs; an exception it raises is handled like one from the
        # model (tests use it to simulate failures and torch.OutOfMemoryError without a GPU).
        self.before_batch: Callable[[list[Job]], None] | None = None
        # per-stage timings (ms) of the latest job, for logs and /healthz
        self.stats: dict[str, float] = {}
        self.counts = {
            "scenes": 0,
            "answers": 0,
            "preempted": 0,
            "expired": 0,
            "feature_batches": 0,
            "failed": 0,
            "out_of_memory": 0,
            "checks": 0,
            "history_answers": 0,
            "digests": 0,
        }
        self._yes_no: dict[str, tuple[list[int], list[int]]] = {}  # question → first-token ids of yes / no

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.scheduler.close()
        self._thread.join(timeout)

    # --- thread ---

    def _load(self) -> LoadedModel:
        m = self.model_config
        t0 = time.monotonic()
        log.info("loading LTU-AS (checkpoint %s) on %s", m.checkpoint, m.device)
        loaded = load_model(m.checkpoint, whisper=m.whisper, llm=m.llm, device=m.device, dtype=m.dtype, progress=True)
        arch = loaded.model.config
        if (arch.sampling_rate, arch.clip_samples) != (SAMPLE_RATE, WINDOW_SAMPLES):
            raise ValueError(
                f"the checkpoint reads {arch.clip_samples} samples at {arch.sampling_rate} Hz; the "
                f"daemon's windows are {WINDOW_SAMPLES} samples at {SAMPLE_RATE} Hz"
            )
        # warm-up: one window's features and one token
        feats = loaded.model.audio_features(loaded.processor.mel(np.zeros(SAMPLE_RATE, np.float32))[None])
        loaded.model.generate(feats, [loaded.processor.encode("warm up")], GenerationOptions(max_new_tokens=1).greedy())
        log.info("LTU-AS ready in %.1f s", time.monotonic() - t0)
        return loaded

    def _run(self) -> None:
        try:
            self.loaded = self._load()
        except Exception as e:  # reported by the service, which exits with a clear message
            self.error = e
            log.error("LTU-AS failed to load: %s", e)
            self.ready.set()
            return
        self.ready.set()
        while (batch := self.scheduler.pop()) is not None:
            self._report_expired()
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: Batch) -> None:
        first = batch[0]
        try:
            if self.before_batch is not None:
                self.before_batch(list(batch))
            with torch.inference_mode():
                if isinstance(first, QuestionJob):
                    self._questions(batch)  # type: ignore[arg-type]  # a batch holds one kind of job
                elif isinstance(first, HistoryJob):
                    self._history(first)
                elif isinstance(first, CheckJob):
                    self._check(first)
                elif isinstance(first, DigestJob):
                    self._digest(first)
                else:
                    self._scenes(batch)  # type: ignore[arg-type]
        except torch.OutOfMemoryError as e:
            self.counts["out_of_memory"] += 1
            log.error(
                "out of memory on %d %s job(s) (%s): %s",
                len(batch),
                _kind(first),
                first.describe(),
                str(e).splitlines()[0] if str(e) else "",
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._fail(
                batch,
                ErrorCode.OUT_OF_MEMORY,
                "the model ran out of memory on this question; retry, or ask for fewer tokens",
                OOM_RETRY_S,
            )
        except Exception as e:  # one failed job must not take the worker down
            self.counts["failed"] += 1
            log.exception("model job failed (%d %s job(s): %s)", len(batch), _kind(first), first.describe())
            self._fail(batch, ErrorCode.INTERNAL, f"model job failed: {type(e).__name__}: {e}", None)

    def _fail(self, batch: Batch, code: ErrorCode, message: str, retry_after_s: float | None) -> None:
        for job in batch:
            if isinstance(job, QuestionJob | HistoryJob) and not job.ended:
                job.ended = True
                job.reply(ErrorEvent(code=code, message=message, re=job.tag, retry_after_s=retry_after_s))

    def _report_expired(self) -> None:
        for job in self.scheduler.take_expired():
            if not isinstance(job, QuestionJob | HistoryJob):
                self.counts["expired"] += 1
                log.warning("%s job (%s) expired in the queue", _kind(job), job.describe())
            elif job.cancelled:  # cancelled while waiting: it ends like any cancelled answer
                window, cited = _scope_of(job)
                job.ended = True
                job.reply(
                    AnswerDone(
                        re=job.tag,
                        text="",
                        tokens=0,
                        token_ids=[],
                        reason="cancelled",
                        scope="live" if window else "history",
                        window=window,
                        evidence=cited,
                        timings=AnswerTimings(
                            queue_ms=_ms(time.monotonic() - job.submitted),
                            ttft_ms=None,
                            tokens_per_s=None,
                            total_ms=None,
                        ),
                    )
                )
            else:
                self.counts["expired"] += 1
                job.ended = True
                job.reply(
                    ErrorEvent(
                        code=ErrorCode.DEADLINE_EXCEEDED,
                        re=job.tag,
                        message="the question waited past its deadline; ask again",
                    )
                )

    def features(self, jobs: list[QuestionJob] | list[SceneJob] | list[CheckJob]) -> torch.Tensor:
        """`[B, L, T, D]` features of the jobs' windows: from the cache, the rest computed in one batch."""
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        have: dict[str, torch.Tensor | None] = {j.window.id: self.cache.get(j.window.id) for j in jobs}
        todo = list({j.window.id: j for j in jobs if have[j.window.id] is None}.values())  # one per window
        if todo:
            audio = [j.audio for j in todo]
            if any(a is None for a in audio):
                raise WindowGone("the window's audio left the ring buffer and its features the cache")
            t0 = time.monotonic()
            mel = torch.stack([processor.mel(a) for a in audio if a is not None])  # [B, n_mels, n_frames]
            out = model.audio_features(mel)  # [B, L, T, D]
            for j, f in zip(todo, out, strict=True):
                have[j.window.id] = f.clone()
                self.cache.put(j.window.id, f.clone())
            self.counts["feature_batches"] += 1
            self.stats["features_ms"] = _ms(time.monotonic() - t0)
            self.stats["features_batch"] = len(todo)
        return torch.stack([t for t in (have[j.window.id] for j in jobs) if t is not None])

    def _scenes(self, jobs: list[SceneJob]) -> None:
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        feats = self.features(jobs)
        rows = [processor.encode(self.scene.prompt, j.window.transcript) for j in jobs]
        options = GenerationOptions(max_new_tokens=self.scene.max_new_tokens).greedy()
        tokens: list[list[int]] = [[] for _ in jobs]
        steps = model.stream(feats, rows, options, eos_token_id=processor.eos_token_id)
        t_gen = time.monotonic()
        for step in steps:
            if self.scheduler.has_questions():  # questions go first: give the model up, describe later
                steps.close()
                self.counts["preempted"] += 1
                for j in jobs:
                    self.scheduler.requeue_scene(j)
                return
            for out, tok in zip(tokens, step, strict=True):
                if tok is not None:
                    out.append(tok)
        t1 = time.monotonic()
        for j, toks in zip(jobs, tokens, strict=True):
            self.counts["scenes"] += 1
            j.reply(
                SceneEvent(
                    stream=j.window.stream,
                    window=j.window.ref(),
                    text=processor.decode(toks).strip(),
                    tokens=len(toks),
                    skipped=j.skipped,
                    timings=SceneTimings(
                        queue_ms=_ms(t0 - j.submitted),
                        features_ms=_ms(t_gen - t0),
                        generate_ms=_ms(t1 - t_gen),
                        batch=len(jobs),
                    ),
                )
            )
        self.stats["scene_ms"] = _ms(t1 - t0)
        log.info(
            "described %s in %.0f ms (features %.0f, generate %.0f; batch %d; queue %s)",
            ", ".join(j.window.id for j in jobs),
            (t1 - t0) * 1000,
            (t_gen - t0) * 1000,
            (t1 - t_gen) * 1000,
            len(jobs),
            self.scheduler.depth,
        )

    def _questions(self, jobs: list[QuestionJob]) -> None:
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        try:
            feats = self.features(jobs[:1])  # one window for the whole batch
        except WindowGone as e:
            self._fail(jobs, ErrorCode.WINDOW_EXPIRED, str(e), None)
            return
        rows = [processor.encode(j.question, j.window.transcript) for j in jobs]
        for j in jobs:
            j.reply(
                AnswerStart(
                    re=j.tag,
                    scope="live",
                    window=j.window.ref(),
                    evidence=[j.window.evidence()],
                    batch=len(jobs),
                    queue_ms=_ms(t0 - j.submitted),
                )
            )
        answers = [_Answer(j, TextStreamer(processor.decode), t0) for j in jobs]
        self._decode(
            answers,
            model.stream_shared(feats, rows, jobs[0].options, eos_token_id=processor.eos_token_id),
            jobs[0].options.max_new_tokens,
        )

    def _history(self, job: HistoryJob) -> None:
        """A question about the past: the LLM reads the best-ranked stored windows that fit its context."""
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        budget = int(model.config.llm["max_position_embeddings"]) - job.options.max_new_tokens
        hits = fit(job.hits, lambda text: len(processor.encode(job.question, text)) <= budget)
        cited = evidence(hits)
        job.reply(
            AnswerStart(
                re=job.tag, scope="history", window=None, evidence=cited, batch=1, queue_ms=_ms(t0 - job.submitted)
            )
        )
        answer = _Answer(job, TextStreamer(processor.decode), t0)
        if not hits:  # nothing stored in that time: say so rather than let the model make something up
            answer.text.append("Nothing was stored for that time.")
            self._done(answer, "eos")
            return
        ids = processor.encode(job.question, history_input(hits))
        self._decode(
            [answer],
            model.stream_text([ids], job.options, eos_token_id=processor.eos_token_id),
            job.options.max_new_tokens,
        )
        self.counts["history_answers"] += 1

    def _decode(self, answers: list[_Answer], steps: Iterator[list[int | None]], max_new_tokens: int) -> None:
        n_steps = 0
        for step in steps:
            n_steps += 1
            now = time.monotonic()
            for a, tok in zip(answers, step, strict=True):
                if a.finished:
                    continue
                if a.job.cancelled or tok is None:
                    self._done(a, "cancelled" if a.job.cancelled else "eos")
                else:
                    a.push(tok, now)
            if all(a.finished for a in answers):
                steps.close()  # type: ignore[attr-defined]  # a generator
                break
        for a in answers:
            if not a.finished:
                self._done(a, "length" if n_steps >= max_new_tokens else "eos")

    def _done(self, a: _Answer, reason: Literal["eos", "length", "cancelled"]) -> None:
        done = a.finish(reason)
        self.counts["answers"] += 1
        t = done.timings
        self.stats.update({k: v for k, v in t.model_dump().items() if v is not None})
        log.info(
            "answered %r (%s): %d tokens (%s), queue %s ms, first token %s ms, %s tokens/s",
            a.job.tag,
            a.job.describe(),
            done.tokens,
            reason,
            t.queue_ms,
            t.ttft_ms,
            t.tokens_per_s,
        )

    def _check(self, job: CheckJob) -> None:
        """The window's yes/no rules: one prefill per question (batched), P(yes) from the first-token logits."""
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        try:
            feats = self.features([job])  # [1, L, T, D]
        except WindowGone:
            log.warning("alert check skipped: %s is no longer in memory", job.window.id)
            return
        names = list(job.questions)
        rows = [processor.encode(job.questions[n], job.window.transcript) for n in names]
        logits = model.next_token_logits(feats.expand(len(rows), -1, -1, -1), rows)  # [Q, vocab]
        scores = {}
        for i, name in enumerate(names):
            q = job.questions[name]
            if q not in self._yes_no:
                self._yes_no[q] = processor.yes_no_ids(q, job.window.transcript)
            yes, no = self._yes_no[q]
            scores[name] = float(yes_probability(logits[i : i + 1], yes, no)[0])
        self.counts["checks"] += 1
        job.reply(CheckResult(job.window.stream, job.window.evidence(), job.window.wall_end or time.time(), scores))

    def _digest(self, job: DigestJob) -> None:
        """A stream's summary over stored windows (greedy, text only)."""
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        budget = int(model.config.llm["max_position_embeddings"]) - job.options.max_new_tokens
        hits = fit(job.hits, lambda text: len(processor.encode(job.prompt, text)) <= budget)
        ids = processor.encode(job.prompt, history_input(hits))
        tokens: list[int] = []
        for step in model.stream_text([ids], job.options, eos_token_id=processor.eos_token_id):
            if step[0] is not None:
                tokens.append(step[0])
        self.counts["digests"] += 1
        job.reply(
            DigestEvent(
                stream=job.stream,
                id=job.id,
                since=job.since,
                until=job.until,
                text=processor.decode(tokens).strip(),
                windows=len(hits),
            )
        )


class _Answer:
    """One question's answer while it is generated: streamed text, timings, and its final `answer.done`."""

    def __init__(self, job: Asked, streamer: TextStreamer, t0: float) -> None:
        self.job, self.streamer, self.t0 = job, streamer, t0
        self.text: list[str] = []
        self.first: float | None = None
        self.last = t0
        self.finished = False

    def push(self, token: int, now: float) -> None:
        self.first = self.first or now
        self.last = now
        if piece := self.streamer.push(token):
            self.text.append(piece)
            self.job.reply(AnswerDelta(re=self.job.tag, text=piece))

    def finish(self, reason: Literal["eos", "length", "cancelled"]) -> AnswerDone:
        self.finished = True
        job = self.job
        if piece := self.streamer.finish():
            self.text.append(piece)
            job.reply(AnswerDelta(re=job.tag, text=piece))
        n = len(self.streamer.ids)
        first, last = self.first, self.last
        rate = (n - 1) / (last - first) if first is not None and n > 1 and last > first else None
        timings = AnswerTimings(
            queue_ms=_ms(self.t0 - job.submitted),
            ttft_ms=_ms(first - job.submitted) if first is not None else None,
            tokens_per_s=round(rate, 2) if rate else None,
            total_ms=_ms(time.monotonic() - job.submitted),
        )
        window, cited = _scope_of(job)
        done = AnswerDone(
            re=job.tag,
            text="".join(self.text),
            tokens=n,
            token_ids=list(self.streamer.ids),
            reason=reason,
            scope="live" if window else "history",
            window=window,
            evidence=cited,
            timings=timings,
        )
        job.ended = True
        job.reply(done)
        return done


def _scope_of(job: Asked) -> tuple[WindowRef | None, list[Evidence]]:
    """(window, evidence) of an answer: a live question's window, or the stored windows a history answer cites."""
    if isinstance(job, QuestionJob):
        return job.window.ref(), [job.window.evidence()]
    return None, evidence(job.hits)


def _kind(job: Job) -> str:
    return {
        QuestionJob: "question",
        HistoryJob: "history question",
        CheckJob: "alert check",
        DigestJob: "digest",
        SceneJob: "scene",
    }[type(job)]
