"""The model worker: one thread owns the LTU-AS model (feature encoder, TLTR, projector, LLaMA + LoRA) and runs
the scheduler's jobs. Tokens and results go out through each job's `on_event` (called in this thread; the
service hops them onto the event loop). Cancellation and yielding to questions are checked between tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ltu_as import GenerationOptions, load_model
from ltu_as.processor import TextStreamer

from .cache import FeatureCache
from .config import DaemonConfig
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)


class WindowGone(Exception):
    """Neither the window's features nor its audio are available any more."""


class ModelWorker:
    def __init__(self, config: DaemonConfig, scheduler: Scheduler, cache: FeatureCache,
                 on_scene: Callable[[Job, dict[str, Any]], None]) -> None:
        self.config = config
        self.scheduler = scheduler
        self.cache = cache
        self.on_scene = on_scene
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.loaded: Any = None
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        # per-stage timings (ms) of the latest job, for logs and /healthz
        self.stats: dict[str, float] = {}
        self.counts = {"scenes": 0, "answers": 0, "preempted": 0, "expired": 0, "feature_batches": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.scheduler.close()
        self._thread.join(timeout)

    # --- thread ---

    def _run(self) -> None:
        m = self.config.model
        try:
            t0 = time.monotonic()
            log.info("loading LTU-AS (checkpoint %s) on %s", m.checkpoint, m.device)
            self.loaded = load_model(m.checkpoint, whisper=m.whisper, llm=m.llm, device=m.device, dtype=m.dtype,
                                     progress=True)
            # warm-up: one window's features and one token
            feats = self.loaded.model.audio_features(self.loaded.processor.mel(np.zeros(16000, np.float32))[None])
            self.loaded.model.generate(feats, [self.loaded.processor.encode("warm up")],
                                       GenerationOptions(max_new_tokens=1).greedy())
            log.info("LTU-AS ready in %.1f s", time.monotonic() - t0)
        except Exception as e:  # reported by the service, which exits with a clear message
            self.error = e
            log.error("LTU-AS failed to load: %s", e)
            self.ready.set()
            return
        self.ready.set()
        while (batch := self.scheduler.pop()) is not None:
            self._report_expired()
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    if batch[0].kind == "question":
                        self._questions(batch)
                    else:
                        self._scenes(batch)
            except Exception as e:  # one failed job must not take the worker down
                log.exception("model job failed")
                for job in batch:
                    self._emit(job, {"type": "error", "code": "internal", "message": f"model job failed: {e}"})

    def _emit(self, job: Job, event: dict[str, Any]) -> None:
        if job.on_event is not None:
            job.on_event(event)

    def _report_expired(self) -> None:
        expired, self.scheduler.expired = self.scheduler.expired, []
        for job in expired:
            if job.cancelled:  # cancelled while waiting: it ends like any cancelled answer
                self._emit(job, {"type": "answer.done", "re": job.tag, "text": "", "tokens": 0, "token_ids": [],
                                 "reason": "cancelled", "window": _window_ref(job),
                                 "timings": {"queue_ms": round((time.monotonic() - job.submitted) * 1000, 1),
                                             "ttft_ms": None, "tokens_per_s": None, "total_ms": None}})
                continue
            self.counts["expired"] += 1
            if job.kind == "question":
                self._emit(job, {"type": "error", "code": "deadline_exceeded", "re": job.tag,
                                 "message": "the question waited past its deadline; ask again"})
            else:
                log.warning("scene job for %s expired in the queue", job.window.id)

    def features(self, jobs: list[Job]) -> torch.Tensor:
        """`[B, L, T, D]` features of the jobs' windows: from the cache, the rest computed in one batch."""
        model, processor = self.loaded.model, self.loaded.processor
        have = {j.window.id: self.cache.get(j.window.id) for j in jobs}
        todo = list({j.window.id: j for j in jobs if have[j.window.id] is None}.values())  # one per window
        if todo:
            if any(j.audio is None for j in todo):
                raise WindowGone("the window's audio left the ring buffer and its features the cache")
            t0 = time.monotonic()
            mel = torch.stack([processor.mel(j.audio) for j in todo])  # [B, n_mels, 1000]
            out = model.audio_features(mel)  # [B, L, T, D]
            for j, f in zip(todo, out, strict=True):
                have[j.window.id] = f.clone()
                self.cache.put(j.window.id, have[j.window.id])
            self.counts["feature_batches"] += 1
            self.stats["features_ms"] = round((time.monotonic() - t0) * 1000, 1)
            self.stats["features_batch"] = len(todo)
        return torch.stack([have[j.window.id] for j in jobs])

    def _scenes(self, jobs: list[Job]) -> None:
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        feats = self.features(jobs)
        rows = [processor.encode(self.config.scene.prompt, j.window.transcript) for j in jobs]
        options = GenerationOptions(max_new_tokens=self.config.scene.max_new_tokens).greedy()
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
            self.on_scene(j, {
                "text": processor.decode(toks).strip(), "tokens": len(toks), "skipped": j.skipped,
                "timings": {"queue_ms": round((t0 - j.submitted) * 1000, 1),
                            "features_ms": round((t_gen - t0) * 1000, 1),
                            "generate_ms": round((t1 - t_gen) * 1000, 1), "batch": len(jobs)}})
        self.stats["scene_ms"] = round((t1 - t0) * 1000, 1)
        log.info("described %s in %.0f ms (features %.0f, generate %.0f; batch %d; queue %s)",
                 ", ".join(j.window.id for j in jobs), (t1 - t0) * 1000, (t_gen - t0) * 1000, (t1 - t_gen) * 1000,
                 len(jobs), self.scheduler.depth)

    def _questions(self, jobs: list[Job]) -> None:
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        try:
            feats = self.features(jobs[:1])  # one window for the whole batch
        except WindowGone as e:
            for j in jobs:
                self._emit(j, {"type": "error", "code": "window_expired", "re": j.tag, "message": str(e)})
            return
        rows = [processor.encode(j.question, j.window.transcript) for j in jobs]
        for j in jobs:
            self._emit(j, {"type": "answer.start", "re": j.tag, "window": _window_ref(j),
                           "batch": len(jobs), "queue_ms": round((t0 - j.submitted) * 1000, 1)})
        streamers = [TextStreamer(processor.decode) for _ in jobs]
        texts: list[list[str]] = [[] for _ in jobs]
        first: list[float | None] = [None] * len(jobs)
        last: list[float] = [t0] * len(jobs)
        finished = [False] * len(jobs)
        options: GenerationOptions = jobs[0].options
        steps = model.stream_shared(feats, rows, options, eos_token_id=processor.eos_token_id)
        n_steps = 0
        for step in steps:
            n_steps += 1
            now = time.monotonic()
            for i, (j, tok) in enumerate(zip(jobs, step, strict=True)):
                if finished[i]:
                    continue
                if j.cancelled or tok is None:
                    finished[i] = True
                    self._done(j, streamers[i], texts[i], first[i], last[i], "cancelled" if j.cancelled else "eos", t0)
                    continue
                first[i] = first[i] or now
                last[i] = now
                if piece := streamers[i].push(tok):
                    texts[i].append(piece)
                    self._emit(j, {"type": "answer.delta", "re": j.tag, "text": piece})
            if all(finished):
                steps.close()
                break
        for i, j in enumerate(jobs):
            if not finished[i]:
                reason = "length" if n_steps >= options.max_new_tokens else "eos"
                self._done(j, streamers[i], texts[i], first[i], last[i], reason, t0)

    def _done(self, job: Job, streamer: TextStreamer, text: list[str], first: float | None, last: float,
              reason: str, t0: float) -> None:
        if piece := streamer.finish():
            text.append(piece)
            self._emit(job, {"type": "answer.delta", "re": job.tag, "text": piece})
        n = len(streamer.ids)
        ttft = (first - job.submitted) * 1000 if first else None
        rate = (n - 1) / (last - first) if first and n > 1 and last > first else None
        self.counts["answers"] += 1
        timings = {"queue_ms": round((t0 - job.submitted) * 1000, 1),
                   "ttft_ms": round(ttft, 1) if ttft is not None else None,
                   "tokens_per_s": round(rate, 2) if rate else None,
                   "total_ms": round((time.monotonic() - job.submitted) * 1000, 1)}
        self.stats.update({k: v for k, v in timings.items() if v is not None})
        log.info("answered %r on %s: %d tokens (%s), queue %s ms, first token %s ms, %s tokens/s", job.tag,
                 job.window.id, n, reason, timings["queue_ms"], timings["ttft_ms"], timings["tokens_per_s"])
        self._emit(job, {"type": "answer.done", "re": job.tag, "text": "".join(text),
                         "tokens": n, "token_ids": list(streamer.ids), "reason": reason, "window": _window_ref(job),
                         "timings": timings})


def _window_ref(job: Job) -> dict[str, Any]:
    w = job.window
    return {"id": w.id, "stream": w.stream, "start": w.start / 16000, "end": w.end / 16000,
            "transcript": w.transcript}
