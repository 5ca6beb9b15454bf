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
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from ltu_as import GenerationOptions, LoadedModel, load_model
from ltu_as.model.processor import TextStreamer

from ..clock import SAMPLE_RATE, WINDOW_SAMPLES
from ..config import ModelConfig, SceneConfig
from ..delivery.events import AnswerDelta, AnswerDone, AnswerStart, AnswerTimings, ErrorEvent, SceneEvent, SceneTimings
from ..delivery.wire import ErrorCode
from .cache import FeatureCache
from .scheduler import Job, QuestionJob, SceneJob, Scheduler

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
        }

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

    def _run_batch(self, batch: list[QuestionJob] | list[SceneJob]) -> None:
        try:
            if self.before_batch is not None:
                self.before_batch(list(batch))
            with torch.inference_mode():
                if isinstance(batch[0], QuestionJob):
                    self._questions(batch)
                else:
                    self._scenes(batch)
        except torch.OutOfMemoryError as e:
            self.counts["out_of_memory"] += 1
            log.error(
                "out of memory on a batch of %d %s job(s) on %s: %s",
                len(batch),
                _kind(batch),
                batch[0].window.id,
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
            log.exception("model job failed (%d %s job(s) on %s)", len(batch), _kind(batch), batch[0].window.id)
            self._fail(batch, ErrorCode.INTERNAL, f"model job failed: {type(e).__name__}: {e}", None)

    def _fail(
        self, batch: list[QuestionJob] | list[SceneJob], code: ErrorCode, message: str, retry_after_s: float | None
    ) -> None:
        for job in batch:
            if isinstance(job, QuestionJob) and not job.ended:
                job.ended = True
                job.reply(ErrorEvent(code=code, message=message, re=job.tag, retry_after_s=retry_after_s))

    def _report_expired(self) -> None:
        for job in self.scheduler.take_expired():
            if isinstance(job, SceneJob):
                self.counts["expired"] += 1
                log.warning("scene job for %s expired in the queue", job.window.id)
            elif job.cancelled:  # cancelled while waiting: it ends like any cancelled answer
                job.reply(
                    AnswerDone(
                        re=job.tag,
                        text="",
                        tokens=0,
                        token_ids=[],
                        reason="cancelled",
                        window=job.window.ref(),
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
                job.reply(
                    ErrorEvent(
                        code=ErrorCode.DEADLINE_EXCEEDED,
                        re=job.tag,
                        message="the question waited past its deadline; ask again",
                    )
                )

    def features(self, jobs: list[QuestionJob] | list[SceneJob]) -> torch.Tensor:
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
            j.reply(AnswerStart(re=j.tag, window=j.window.ref(), batch=len(jobs), queue_ms=_ms(t0 - j.submitted)))
        answers = [_Answer(j, TextStreamer(processor.decode), t0) for j in jobs]
        options = jobs[0].options
        steps = model.stream_shared(feats, rows, options, eos_token_id=processor.eos_token_id)
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
                steps.close()
                break
        for a in answers:
            if not a.finished:
                self._done(a, "length" if n_steps >= options.max_new_tokens else "eos")

    def _done(self, a: _Answer, reason: Literal["eos", "length", "cancelled"]) -> None:
        done = a.finish(reason)
        self.counts["answers"] += 1
        t = done.timings
        self.stats.update({k: v for k, v in t.model_dump().items() if v is not None})
        log.info(
            "answered %r on %s: %d tokens (%s), queue %s ms, first token %s ms, %s tokens/s",
            a.job.tag,
            a.job.window.id,
            done.tokens,
            reason,
            t.queue_ms,
            t.ttft_ms,
            t.tokens_per_s,
        )


class _Answer:
    """One question's answer while it is generated: streamed text, timings, and its final `answer.done`."""

    def __init__(self, job: QuestionJob, streamer: TextStreamer, t0: float) -> None:
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
        done = AnswerDone(
            re=job.tag,
            text="".join(self.text),
            tokens=n,
            token_ids=list(self.streamer.ids),
            reason=reason,
            window=job.window.ref(),
            timings=timings,
        )
        job.ended = True
        job.reply(done)
        return done


def _kind(batch: list[QuestionJob] | list[SceneJob]) -> str:
    return "question" if isinstance(batch[0], QuestionJob) else "scene"
