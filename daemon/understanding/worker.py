"""The model worker: one thread owns the LTU-AS model (feature encoder, TLTR, projector, LLaMA + LoRA merged) and
drives the decode engine (`ltu_as.serving.engine`): scenes and questions of every stream and client share one
running batch, joining after their prefill and leaving on EOS, their token cap or cancel, at step boundaries.

The loop: take the scheduler's next batch when the engine has room (questions always; scenes only when nothing
waits for a slot), compute the windows' features, submit one engine row per job, run one engine step, deliver what
it produced. Results are protocol messages sent through each job's `reply` (to the event loop). Questions get the
free slots first and preempt scene rows when the slots run out; a preempted scene resumes later with what it had.

A job that raises ends every question in its batch with an `internal` error carrying the question's id (and the
worker goes on); running out of accelerator memory ends them with `out_of_memory` and a retry hint. A failing engine
step ends every row in the engine the same way and starts the engine afresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ltu_as import GenerationOptions, LoadedModel, load_model
from ltu_as.model.generation import yes_probability
from ltu_as.model.processor import TextStreamer
from ltu_as.serving.engine import (
    CHECK,
    QUESTION,
    SCENE,
    TEXT,
    DecodeEngine,
    Output,
    PromptTooLong,
    Request,
    Row,
    auto_slots,
)

from ..clock import SAMPLE_RATE, WINDOW_SAMPLES
from ..config import DEFAULT_SCENE_PROMPT, EngineConfig, LlmConfig, ModelConfig, SceneConfig
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
from .scheduler import (
    Asked,
    Batch,
    CheckJob,
    CheckResult,
    DigestJob,
    HistoryJob,
    Job,
    QuestionJob,
    SceneJob,
    Scheduler,
    SwapJob,
)
from .vllm_engine import LlmUnavailable, VllmEngine

log = logging.getLogger(__name__)

OOM_RETRY_S = 5.0  # what an out-of-memory error suggests: let other work finish and memory come back
LLM_RETRY_S = 5.0  # what llm_unavailable suggests: a restarting vLLM server is back in seconds

Engine = DecodeEngine | VllmEngine


class WindowGone(Exception):
    """Neither the window's features nor its audio are available any more."""


def _ms(t: float) -> float:
    return round(t * 1000, 1)


@dataclass(eq=False)
class _Live:
    """What an engine row is for: its job, the answer being streamed (questions), and scene timings."""

    job: Job
    answer: _Answer | None = None
    popped: float = 0.0
    features_ms: float = 0.0
    batch: int = 1
    expired: bool = False  # cancelled by the worker because its deadline passed while it waited for a slot


class ModelWorker:
    def __init__(
        self,
        model: ModelConfig,
        scene: SceneConfig,
        scheduler: Scheduler,
        cache: FeatureCache,
        engine: EngineConfig | None = None,
        llm: LlmConfig | None = None,
        slots: int | None = None,
    ) -> None:
        """`slots`: the memory plan's KV slots (`daemon.understanding.memory`), used when `engine.slots` is auto."""
        self.model_config, self.scene = model, scene
        self.engine_config = engine or EngineConfig()
        self.llm_config = llm or LlmConfig()
        self.planned_slots = slots
        self.scheduler = scheduler
        self.cache = cache
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self._live: dict[Row, _Live] = {}
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
            "llm_unavailable": 0,
        }
        self._yes_no: dict[str, tuple[list[int], list[int]]] = {}  # question → first-token ids of yes / no
        # what scenes ask, and the answers a closed-set scene scores: settled once the checkpoint is loaded
        self.scene_prompt = scene.prompt or DEFAULT_SCENE_PROMPT
        self.scene_answers: tuple[str, ...] = ()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.scheduler.close()
        self._thread.join(timeout)
        if isinstance(self.engine, VllmEngine):
            self.engine.close()

    def engine_stats(self) -> dict[str, object]:
        """The engine's slots and counters (for /healthz)."""
        e = self.engine
        if e is None:
            return {}
        return {
            "backend": "vllm" if isinstance(e, VllmEngine) else "local",
            "slots": e.slots,
            "used": e.used,
            "running": len(e.running),
            "waiting": len(e.waiting),
            "max_positions": e.max_positions,
            "prefix_cache": len(e.prefixes),
            **e.counts,
            **(
                {}
                if isinstance(e, VllmEngine)
                else {"graphs_enabled": e.graphs, "graph_buckets": len(e.buckets()), "graph_error": e.graph_error}
            ),
        }

    # --- thread ---

    def _load(self) -> LoadedModel:
        m = self.model_config
        t0 = time.monotonic()
        remote = self.llm_config.backend == "vllm"
        log.info("loading LTU-AS (checkpoint %s) on %s", m.checkpoint, m.device)
        loaded = load_model(
            m.checkpoint,
            whisper=m.whisper,
            llm=m.llm,
            device=m.device,
            dtype=m.dtype,
            quantization=m.quantization,
            encoder_quantization=m.encoder_quantization,
            int8_kernel=m.int8_kernel,
            llm_weights="embeddings" if remote else "all",
            progress=True,
        )
        self._settle_scenes(loaded, remote)
        arch = loaded.model.config
        if (arch.sampling_rate, arch.clip_samples) != (SAMPLE_RATE, WINDOW_SAMPLES):
            raise ValueError(
                f"the checkpoint reads {arch.clip_samples} samples at {arch.sampling_rate} Hz; the "
                f"daemon's windows are {WINDOW_SAMPLES} samples at {SAMPLE_RATE} Hz"
            )
        if remote:
            self.engine = self._remote_engine(loaded)
            return loaded
        loaded.model.merge_lora()  # inference only: a decode step then reads the base weights, nothing more
        self.engine = engine = self._engine(loaded)
        # warm-up: one window's features and one token through the engine
        feats = loaded.model.audio_features(loaded.processor.mel(np.zeros(SAMPLE_RATE, np.float32))[None])
        audio = loaded.model.audio_embeddings(feats)[0]
        warm = GenerationOptions(max_new_tokens=1).greedy()
        engine.run([Request(loaded.processor.encode("warm up"), warm, prefix_embeds=audio)])
        log.info(
            "LTU-AS ready in %.1f s (engine: %d slots of %d positions)",
            time.monotonic() - t0,
            engine.slots,
            engine.max_positions,
        )
        return loaded

    def _remote_engine(self, loaded: LoadedModel) -> VllmEngine:
        """The vLLM backend: prompts go out as embeddings; a server that is down now only fails questions."""
        c, model = self.llm_config, loaded.model
        table = model.llm.get_input_embeddings()
        engine = VllmEngine(
            url=c.url,
            embed=lambda ids: table(torch.tensor(list(ids), dtype=torch.long, device=model.device)),
            eos_token_id=loaded.processor.eos_token_id,
            hidden_size=model.config.d_llm,
            vocab_size=int(model.config.llm["vocab_size"]),
            max_positions=c.max_positions,
            max_concurrency=c.max_concurrency,
            api_key=c.api_key.get_secret_value() if c.api_key else None,
            served_model=c.served_model,
            connect_timeout_s=c.connect_timeout_s,
            token_timeout_s=c.token_timeout_s,
        )
        try:
            log.info("LLM on the vLLM server at %s (model %s)", c.url, engine.model_name())
        except LlmUnavailable as e:
            log.warning("%s; questions get llm_unavailable until it answers", e)
        return engine

    def _engine(self, loaded: LoadedModel) -> DecodeEngine:
        c, llm = self.engine_config, loaded.model.llm
        p = next(llm.parameters())
        positions = min(c.max_positions, int(loaded.model.config.llm["max_position_embeddings"]))
        if c.slots == "auto" and self.planned_slots:
            slots = self.planned_slots
        elif c.slots == "auto":
            slots = min(c.max_slots, auto_slots(llm.config, positions, p.dtype, p.device, c.memory_fraction))
        else:
            slots = c.slots
        engine = DecodeEngine(
            llm,
            slots=slots,
            max_positions=positions,
            eos_token_id=loaded.processor.eos_token_id,
            prefill_chunk=c.prefill_chunk,
            prefix_cache=c.prefix_cache,
        )
        # on CUDA: every (rows, span) graph bucket captured now, at load, rather than inside the first answers
        t0 = time.monotonic()
        if engine.warm():
            log.info("decode engine: %d CUDA graphs captured in %.1f s", engine.counts["graphs"], time.monotonic() - t0)
        return engine

    def _settle_scenes(self, loaded: LoadedModel, remote: bool) -> None:
        """The scene question: `scene.prompt`, else the one the checkpoint was trained on (a small fine-tune
        answers only that one well), else the default. The closed answer set when `scene.answers = "closed"`."""
        trained = loaded.trained
        self.scene_prompt = self.scene.prompt or (trained.question if trained else DEFAULT_SCENE_PROMPT)
        if self.scene.prompt and trained and self.scene.prompt not in trained.questions:
            log.warning(
                "scene.prompt %r is not a question the checkpoint was trained on (%s): its scenes may be poor; "
                "leave scene.prompt unset to ask the trained one",
                self.scene.prompt,
                " / ".join(repr(q) for q in trained.questions[:3]),
            )
        if self.scene.answers == "closed":
            if trained is None or not trained.answers:
                log.warning(
                    'scene.answers = "closed" needs a checkpoint trained on a set of answers (ltu-as train writes '
                    "them to ltu_as_trained.json); %s has none: scenes are generated text",
                    self.model_config.checkpoint,
                )
            elif remote:
                log.warning(
                    'scene.answers = "closed" scores answers in this process; with llm.backend = "vllm" '
                    "scenes are generated text"
                )
            else:
                self.scene_answers = trained.answers
        log.info(
            "scenes ask %r%s",
            self.scene_prompt,
            f" and choose among {len(self.scene_answers)} answers" if self.scene_answers else "",
        )

    def _run(self) -> None:
        try:
            self.loaded = self._load()
        except Exception as e:  # reported by the service, which exits with a clear message
            self.error = e
            log.error("LTU-AS failed to load: %s", e)
            self.ready.set()
            return
        self.ready.set()
        engine = self.engine
        assert engine is not None
        while True:
            if not engine.has_work():
                batch = self.scheduler.pop()  # idle: wait for work
            elif room := self._room(engine):
                batch = self.scheduler.pop(timeout=0, limit=room)
            else:
                batch = []
            if batch is None:
                break
            self._report_expired()
            if batch:
                self._start(batch)
            if engine.has_work():
                self._step(engine)
        for row in engine.abort():  # closing: end what is left
            self._live.pop(row, None)

    def _room(self, engine: Engine) -> int:
        """How many jobs to take from the scheduler now (0: none). Questions are taken while fewer than `slots`
        wait in the engine for a slot (they may preempt scenes); anything else only into a slot free right now.
        So the engine's waiting list stays bounded, the scheduler's own bound (`max_queue`, then `busy`) applies
        beyond it, and scenes of a stream that falls behind coalesce in the scheduler (newest window wins)."""
        if self.scheduler.has_questions():
            return max(0, engine.slots - len(engine.waiting))
        return max(0, engine.slots - engine.used - len(engine.waiting))

    def _start(self, batch: Batch) -> None:
        """Features and engine rows for a batch (checks run here at once: one prefill, no decoding)."""
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
                elif isinstance(first, SwapJob):
                    self._swap(first)
                else:
                    self._scenes(batch)  # type: ignore[arg-type]
        except Exception as e:
            self._failed(batch, e)

    def _failed(self, batch: Batch | list[Job], e: Exception) -> None:
        first = batch[0]
        if isinstance(e, torch.OutOfMemoryError):
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
                batch,  # type: ignore[arg-type]
                ErrorCode.OUT_OF_MEMORY,
                "the model ran out of memory on this question; retry, or ask for fewer tokens",
                OOM_RETRY_S,
            )
        elif isinstance(e, LlmUnavailable):
            self._unavailable(list(batch), e)
        elif isinstance(e, PromptTooLong):
            self._fail(batch, ErrorCode.TOO_LARGE, str(e), None)  # type: ignore[arg-type]
        else:  # one failed job must not take the worker down
            self.counts["failed"] += 1
            log.error("model job failed (%d %s job(s): %s)", len(batch), _kind(first), first.describe(), exc_info=e)
            self._fail(batch, ErrorCode.INTERNAL, f"model job failed: {type(e).__name__}: {e}", None)  # type: ignore[arg-type]

    def _step(self, engine: Engine) -> None:
        """Cancel what was cancelled or waited past its deadline, run one engine step, deliver its outputs."""
        now = time.monotonic()
        for row, live in self._live.items():
            job = live.job
            if isinstance(job, QuestionJob | HistoryJob) and not row.cancelled:
                if job.cancelled:
                    engine.cancel(row)
                elif row.state == "waiting" and not row.generated and job.deadline < now:
                    live.expired = True
                    engine.cancel(row)
        try:
            with torch.inference_mode():
                outputs = engine.step()
        except Exception as e:  # the engine's state is unknown: end every row in it and start afresh
            rows = engine.abort()
            jobs = [self._live.pop(r).job for r in rows if r in self._live]
            if jobs:
                self._failed(jobs, e)
            else:
                log.exception("engine step failed with no rows to fail")
            return
        self.counts["preempted"] = engine.counts["preempted"]
        now = time.monotonic()
        for out in outputs:
            self._deliver(out, now)

    def _deliver(self, out: Output, now: float) -> None:
        live = self._live.get(out.row)
        if live is None:
            return
        if out.error is not None:  # a remote row that failed: the server is down, slow or refused it
            del self._live[out.row]
            self._unavailable([live.job], out.error)
            return
        a = live.answer
        if a is not None:
            if out.token is not None:
                a.push(out.token, now)
            if out.finished is not None:
                del self._live[out.row]
                if live.expired:
                    self.counts["expired"] += 1
                    a.job.ended = True
                    a.job.reply(
                        ErrorEvent(
                            code=ErrorCode.DEADLINE_EXCEEDED,
                            re=a.job.tag,
                            message="the question waited past its deadline; ask again",
                        )
                    )
                else:
                    self._done(a, out.finished)
            return
        if out.finished is None:
            return
        del self._live[out.row]
        job = live.job
        if isinstance(job, SceneJob):
            self._scene_done(job, live, out.row.generated, now)
        elif isinstance(job, DigestJob):
            self._digest_done(job, out.row.generated)

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

    def _window_request(
        self, ids: list[int], audio: torch.Tensor, window_id: str, options: GenerationOptions, priority: int
    ) -> Request:
        """An engine row about a window: its audio tokens and the template's start are a prefix shared (and
        cached) across every question about that window."""
        assert self.loaded is not None
        shared = self.loaded.processor.shared_prefix_len(ids)
        return Request(ids, options, prefix_embeds=audio, prefix_key=window_id, shared=shared, priority=priority)

    def _submit(self, request: Request, live: _Live) -> None:
        assert self.engine is not None
        self._live[self.engine.submit(request)] = live

    def _scenes(self, jobs: list[SceneJob]) -> None:
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        try:
            audio = model.audio_embeddings(self.features(jobs))  # [B, T, d]
        except WindowGone as e:
            log.warning("scene skipped: %s", e)
            return
        t1 = time.monotonic()
        if self.scene_answers:
            self._closed_scenes(jobs, audio, t0, _ms(t1 - t0))
            return
        options = GenerationOptions(max_new_tokens=self.scene.max_new_tokens).greedy()
        for j, a in zip(jobs, audio, strict=True):
            ids = processor.encode(self.scene_prompt, j.window.transcript)
            live = _Live(j, popped=t0, features_ms=_ms(t1 - t0), batch=len(jobs))
            self._submit(self._window_request(ids, a, j.window.id, options, SCENE), live)

    def _swap(self, job: SwapJob) -> None:
        """Finish every row in the engine (they were started with the old weights), then load the checkpoint's
        TLTR, projector and LoRA into the model: LoRA unmerged, replaced, merged again; the frozen Whisper and LLM
        stay. Cached prefixes (KV computed with the old LoRA) are dropped, and scenes settle on the checkpoint's
        question and answers. A checkpoint that does not fit the model changes nothing (`load_trainable` checks
        every tensor first)."""
        from pathlib import Path

        from ltu_as.loading.card import TrainedOn
        from ltu_as.loading.checkpoint import load_official_checkpoint
        from ltu_as.loading.load import load_trainable
        from ltu_as.loading.sources import resolve
        from ltu_as.model.modeling import WEIGHTS_NAME

        assert self.loaded is not None and self.engine is not None
        engine, model = self.engine, self.loaded.model
        if isinstance(engine, VllmEngine):
            job.reply('the LLM runs on the vLLM server (llm.backend = "vllm"): export the checkpoint and restart it')
            return
        if model.quantization != "none":
            job.reply(f"the LLM is quantized ({model.quantization}): LoRA cannot be swapped; restart to load it")
            return
        while engine.has_work():
            self._step(engine)
        folder = Path(job.checkpoint)
        try:
            trained = TrainedOn.load(folder) if folder.is_dir() else None
            official = None if folder.is_dir() else resolve(job.checkpoint, "LTU-AS checkpoint")
            model.unmerge_lora()
            try:
                if official is None:
                    load_trainable(model, folder / WEIGHTS_NAME)
                else:  # back to an authors'-layout .bin (model.checkpoint)
                    load_official_checkpoint(model, official)
            finally:
                model.merge_lora()
        except Exception as e:  # a bad checkpoint: the model keeps its weights (nothing was copied)
            job.reply(f"{folder} cannot be loaded: {e}")
            return
        engine.prefixes.clear()
        self.loaded.trained = trained
        self._settle_scenes(self.loaded, remote=False)
        self.counts["swaps"] = self.counts.get("swaps", 0) + 1
        log.info("model swapped to %s", folder)
        job.reply(None)

    def _closed_scenes(self, jobs: list[SceneJob], audio: torch.Tensor, t0: float, features_ms: float) -> None:
        """Scenes as the most probable of the checkpoint's answers: each answer's log-likelihood after the prompt
        (teacher-forced, `answer_log_likelihoods`), normalised over the set into the event's `confidence`. Runs
        here, beside the engine: K short prefills per window and no decoding."""
        assert self.loaded is not None and self.loaded.trained is not None
        model, processor = self.loaded.model, self.loaded.processor
        eos = self.loaded.trained.eos
        for j, a in zip(jobs, audio, strict=True):
            rows = processor.answer_rows(self.scene_prompt, self.scene_answers, j.window.transcript, eos)
            probs = model.answer_log_likelihoods(a[None], rows).softmax(0)
            k = int(probs.argmax())
            label = self.scene_answers[k]
            live = _Live(j, popped=t0, features_ms=features_ms, batch=len(jobs))
            self._reply_scene(j, live, label, rows[k][1], time.monotonic(), label, round(float(probs[k]), 4))

    def _scene_done(self, job: SceneJob, live: _Live, tokens: list[int], now: float) -> None:
        assert self.loaded is not None
        self._reply_scene(job, live, self.loaded.processor.decode(tokens).strip(), len(tokens), now)

    def _reply_scene(
        self,
        job: SceneJob,
        live: _Live,
        text: str,
        tokens: int,
        now: float,
        label: str | None = None,
        confidence: float | None = None,
    ) -> None:
        self.counts["scenes"] += 1
        generate_ms = _ms(now - live.popped) - live.features_ms
        job.reply(
            SceneEvent(
                stream=job.window.stream,
                window=job.window.ref(),
                text=text,
                tokens=tokens,
                skipped=job.skipped,
                timings=SceneTimings(
                    queue_ms=_ms(live.popped - job.submitted),
                    features_ms=live.features_ms,
                    generate_ms=round(generate_ms, 1),
                    batch=live.batch,
                ),
                label=label,
                confidence=confidence,
            )
        )
        self.stats["scene_ms"] = _ms(now - live.popped)
        log.info(
            "described %s in %.0f ms (features %.0f, generate %.0f; %d tokens; queue %s)%s",
            job.window.id,
            (now - live.popped) * 1000,
            live.features_ms,
            generate_ms,
            tokens,
            self.scheduler.depth,
            f": {label!r} ({confidence:.2f})" if label is not None and confidence is not None else "",
        )

    def _questions(self, jobs: list[QuestionJob]) -> None:
        assert self.loaded is not None
        model, processor = self.loaded.model, self.loaded.processor
        t0 = time.monotonic()
        try:
            audio = model.audio_embeddings(self.features(jobs[:1]))[0]  # one window for the whole batch
        except WindowGone as e:
            self._fail(jobs, ErrorCode.WINDOW_EXPIRED, str(e), None)
            return
        for j in jobs:
            ids = processor.encode(j.question, j.window.transcript)
            request = self._window_request(ids, audio, j.window.id, j.options, QUESTION)
            self._start_answer(j, request, t0, scope="live", batch=len(jobs))

    def _start_answer(
        self, job: Asked, request: Request, t0: float, scope: Literal["live", "history"], batch: int = 1
    ) -> None:
        assert self.loaded is not None
        window, cited = _scope_of(job)
        job.reply(
            AnswerStart(
                re=job.tag,
                scope=scope,
                window=window,
                evidence=cited,
                batch=batch,
                queue_ms=_ms(t0 - job.submitted),
            )
        )
        answer = _Answer(job, TextStreamer(self.loaded.processor.decode), t0)
        request.tag = job.tag
        self._submit(request, _Live(job, answer=answer, popped=t0))

    def _history(self, job: HistoryJob) -> None:
        """A question about the past: the LLM reads the best-ranked stored windows that fit its context."""
        assert self.loaded is not None and self.engine is not None
        processor = self.loaded.processor
        t0 = time.monotonic()
        budget = self.engine.max_positions - job.options.max_new_tokens
        hits = fit(job.hits, lambda text: len(processor.encode(job.question, text)) <= budget)
        job.hits = hits
        if not hits:  # nothing stored in that time: say so rather than let the model make something up
            job.reply(
                AnswerStart(
                    re=job.tag, scope="history", window=None, evidence=[], batch=1, queue_ms=_ms(t0 - job.submitted)
                )
            )
            answer = _Answer(job, TextStreamer(processor.decode), t0)
            answer.text.append("Nothing was stored for that time.")
            self._done(answer, "eos")
            return
        ids = processor.encode(job.question, history_input(hits))
        self._start_answer(job, Request(ids, job.options, priority=QUESTION), t0, "history")
        self.counts["history_answers"] += 1

    def _unavailable(self, jobs: list[Job], e: Exception) -> None:
        self.counts["llm_unavailable"] += 1
        log.warning("LLM unavailable for %d %s job(s): %s", len(jobs), _kind(jobs[0]), e)
        self._fail(jobs, ErrorCode.LLM_UNAVAILABLE, str(e), LLM_RETRY_S)  # type: ignore[arg-type]

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
        for q in job.questions.values():
            if q not in self._yes_no:
                self._yes_no[q] = processor.yes_no_ids(q, job.window.transcript)
        pairs = [self._yes_no[job.questions[n]] for n in names]
        if isinstance(self.engine, VllmEngine):
            audio = model.audio_embeddings(feats)[0]
            requests = [
                Request(ids, GenerationOptions(max_new_tokens=1), prefix_embeds=audio, priority=CHECK) for ids in rows
            ]
            try:
                probs = self.engine.yes_no(requests, [y for y, _ in pairs], [n for _, n in pairs])
            except LlmUnavailable as e:
                log.warning("alert check skipped: %s", e)
                self.counts["llm_unavailable"] += 1
                return
            scores = dict(zip(names, probs, strict=True))
        else:
            logits = model.next_token_logits(feats.expand(len(rows), -1, -1, -1), rows)  # [Q, vocab]
            scores = {
                name: float(yes_probability(logits[i : i + 1], yes, no)[0])
                for i, (name, (yes, no)) in enumerate(zip(names, pairs, strict=True))
            }
        self.counts["checks"] += 1
        job.reply(CheckResult(job.window.stream, job.window.evidence(), job.window.wall_end or time.time(), scores))

    def _digest(self, job: DigestJob) -> None:
        """A stream's summary over stored windows (greedy, text only), delivered when its row finishes."""
        assert self.loaded is not None and self.engine is not None
        processor = self.loaded.processor
        budget = self.engine.max_positions - job.options.max_new_tokens
        job.hits = fit(job.hits, lambda text: len(processor.encode(job.prompt, text)) <= budget)
        ids = processor.encode(job.prompt, history_input(job.hits))
        self._submit(Request(ids, job.options, priority=TEXT), _Live(job, popped=time.monotonic()))

    def _digest_done(self, job: DigestJob, tokens: list[int]) -> None:
        assert self.loaded is not None
        self.counts["digests"] += 1
        job.reply(
            DigestEvent(
                stream=job.stream,
                id=job.id,
                since=job.since,
                until=job.until,
                text=self.loaded.processor.decode(tokens).strip(),
                windows=len(job.hits),
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
