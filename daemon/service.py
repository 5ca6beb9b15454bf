"""The service: composes sources, stream pipelines, the ASR worker, the event bus and the websocket server on one
event loop, and shuts them down in order.

Threads: one per file or microphone source (plus PortAudio's callback thread), one ASR worker that owns the model.
Everything else runs on the loop. Results cross back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from . import __version__
from .asr import AsrResult, AsrWorker
from .bus import EventBus
from .config import DaemonConfig, FileStream, MicStream
from .protocol import EVENT_TYPES, PROTOCOL_VERSION, Ask, ErrorCode, Hello, ProtocolError
from .scheduler import Busy, Job, Scheduler
from .server import WebsocketServer
from .sources import FileSource, MicSource, RemoteSource
from .stream import StreamPipeline
from .windows import Window

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN_S = 10.0  # how long shutdown waits for the last finals to be decoded and delivered


class ModelLoadError(RuntimeError):
    """A model the service needs could not be loaded (the message says which and why)."""


class Service:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.bus = EventBus()
        self.asr = AsrWorker(config.asr, self._asr_result)
        self.pipelines: dict[str, StreamPipeline] = {}
        self.sources: dict[str, FileSource | MicSource | RemoteSource] = {}
        self.remotes: dict[str, RemoteSource] = {}
        self.scheduler: Scheduler | None = None
        self.worker: Any = None
        self._jobs: dict[object, set[Job]] = {}  # connection → its questions not yet done
        if config.model.enabled:
            from .cache import FeatureCache
            from .worker import ModelWorker  # imports torch and ltu_as: only when the model is on

            sc = config.scheduler
            self.scheduler = Scheduler(sc.max_queue, sc.max_batch, sc.retry_after_s)
            self.cache = FeatureCache(config.features.cache_windows, int(config.features.cache_mb * 2**20))
            self.worker = ModelWorker(config, self.scheduler, self.cache, self._scene_result)
        for s in config.streams:
            self.pipelines[s.name] = StreamPipeline(s.name, s.source, config, self.bus, self.asr,
                                                    self._on_window if self.scheduler else None)
            if isinstance(s, FileStream):
                self.sources[s.name] = FileSource(s)
            elif isinstance(s, MicStream):
                self.sources[s.name] = MicSource(s)
            else:
                self.sources[s.name] = self.remotes[s.name] = RemoteSource(s.name)
        self.server = WebsocketServer(config.server, self)
        self.started = time.time()
        self.ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down in order. Raises `ModelLoadError` if the ASR cannot load."""
        self._loop = asyncio.get_running_loop()
        self.asr.start()
        if self.worker is not None:
            self.worker.start()
        await self.server.start()  # /healthz answers (not ready) while the models load
        log.info("listening on ws://%s:%d (health: /healthz)", self.config.server.host, self.server.port)
        ready = asyncio.ensure_future(asyncio.to_thread(self._wait_models))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        error = self.asr.error or (self.worker.error if self.worker is not None else None)
        if error is not None:
            stopper.cancel()
            await self.server.close()
            raise ModelLoadError(str(error))
        if not stop.is_set():
            for name, pipeline in self.pipelines.items():
                self._tasks.append(asyncio.create_task(pipeline.run(), name=f"stream-{name}"))
                self.sources[name].start(self._loop, pipeline.queue)
            self.ready = True
            log.info("ready: %d stream(s): %s", len(self.pipelines), ", ".join(self.pipelines) or "none")
        await stopper
        await self.shutdown()

    def _wait_models(self) -> None:
        self.asr.ready.wait()
        if self.worker is not None and self.asr.error is None:
            self.worker.ready.wait()

    async def shutdown(self) -> None:
        """Stop sources, flush open utterances to finals, deliver them, close clients with 1001."""
        log.info("shutting down")
        self.ready = False
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        for source in self.sources.values():
            source.stop()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=max(0.1, deadline - time.monotonic()))
            for t in late:
                t.cancel()
        await asyncio.to_thread(self.asr.stop, max(0.1, deadline - time.monotonic()))
        if self.worker is not None:  # answers in flight end as cancelled; waiting work is dropped
            for jobs in self._jobs.values():
                for job in jobs:
                    job.cancelled = True
            await asyncio.to_thread(self.worker.stop, max(0.1, deadline - time.monotonic()))
        await asyncio.sleep(0)  # run the result callbacks the worker scheduled before it ended
        while any(self.bus.pending()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # let writers hand the last finals to their clients
        await self.server.close()
        for source in self.sources.values():
            source.join(1.0)
        log.info("stopped")

    def _asr_result(self, result: AsrResult) -> None:
        """Worker thread → loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self.pipelines[result.job.stream].on_result, result)
        except RuntimeError:  # the loop is gone (crash path); nothing left to deliver to
            pass

    # --- understanding: windows, scenes, questions ---

    def _on_window(self, pipeline: StreamPipeline, w: Window) -> None:
        sc = self.config.scene
        if self.scheduler is None or not sc.enabled or (w.index - 1) % sc.every:
            return
        self.scheduler.submit(Job("scene", w, pipeline.window_audio(w),
                                  time.monotonic() + self.config.scheduler.scene_deadline_s))

    def _scene_result(self, job: Job, result: dict[str, Any]) -> None:
        """Worker thread → loop."""
        assert self._loop is not None
        w = job.window
        ref = {"id": w.id, "stream": w.stream, "start": w.start / 16000, "end": w.end / 16000,
               "transcript": w.transcript}
        self._loop.call_soon_threadsafe(lambda: self.pipelines[w.stream].publish("scene", window=ref, **result))

    def resolve_window(self, msg: Ask) -> Window:
        """The window a question is about: `window` id, else `at` on `stream`, else the stream's latest."""
        if msg.window is not None:
            stream = msg.window.split(":w", 1)[0]
            w = self.pipelines[stream].windows.get(msg.window) if stream in self.pipelines else None
            if w is None:
                raise ProtocolError(ErrorCode.UNKNOWN_WINDOW, f"no window {msg.window!r} (ids come in window "
                                    f"events; the newest {self.config.windows.keep} per stream are kept)", msg.id)
            return w
        if msg.stream is not None:
            if msg.stream not in self.pipelines:
                raise ProtocolError(ErrorCode.UNKNOWN_STREAM, f"no stream {msg.stream!r}; streams: "
                                    f"{', '.join(self.pipelines)}", msg.id)
            pipeline = self.pipelines[msg.stream]
        else:
            pipeline = next((p for p in self.pipelines.values() if p.windows), None)
            if pipeline is None:
                raise ProtocolError(ErrorCode.NO_WINDOW, "no stream has a complete 10 s window yet", msg.id)
        w = pipeline.window_at(msg.at) if msg.at is not None else next(reversed(pipeline.windows.values()), None)
        if w is None:
            what = f"at {msg.at:g} s" if msg.at is not None else "yet"
            raise ProtocolError(ErrorCode.NO_WINDOW, f"stream {pipeline.name!r} has no window {what}", msg.id)
        return w

    def ask(self, owner: object, deliver: Any, msg: Ask) -> None:
        """Queue a question; its answer events go to `deliver(event)` on the loop. Raises `ProtocolError`."""
        from ltu_as import GenerationOptions

        if self.scheduler is None:
            raise ProtocolError(ErrorCode.MODEL_DISABLED, "LTU-AS is off in this daemon (model.enabled = false)",
                                msg.id)
        q = self.config.questions
        if len(msg.question) > q.max_question_chars:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"questions are limited to {q.max_question_chars} "
                                "characters", msg.id)
        if any(j.tag == msg.id for j in self._jobs.get(owner, ())):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"question {msg.id!r} is still being answered", msg.id)
        w = self.resolve_window(msg)
        cached = w.id in self.cache
        audio = None if cached else self.pipelines[w.stream].window_audio(w)
        if audio is None and not cached:
            raise ProtocolError(ErrorCode.WINDOW_EXPIRED, f"window {w.id} is no longer in memory", msg.id)
        options = GenerationOptions(
            max_new_tokens=min(msg.max_new_tokens or q.max_new_tokens, q.max_new_tokens_limit),
            do_sample=not msg.greedy, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
            repetition_penalty=msg.repetition_penalty, seed=msg.seed)
        assert self._loop is not None
        loop = self._loop
        job = Job("question", w, audio, time.monotonic() + self.config.scheduler.question_deadline_s,
                  question=msg.question, options=options, owner=owner, tag=msg.id)

        def on_event(event: dict[str, Any]) -> None:  # worker thread
            loop.call_soon_threadsafe(self._answer_event, job, deliver, event)

        job.on_event = on_event
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise ProtocolError(ErrorCode.BUSY, str(e), msg.id, retry_after_s=e.retry_after_s) from None
        self._jobs.setdefault(owner, set()).add(job)

    def _answer_event(self, job: Job, deliver: Any, event: dict[str, Any]) -> None:
        if event["type"] in ("answer.done", "error"):
            self._jobs.get(job.owner, set()).discard(job)
        deliver({**event, "time": time.time()})

    def cancel(self, owner: object, tag: object) -> bool:
        """Cancel `owner`'s question `tag` (waiting or running). False if there is no such question."""
        jobs = [j for j in self._jobs.get(owner, ()) if j.tag == tag]
        for j in jobs:
            j.cancelled = True
        return bool(jobs)

    def disconnected(self, owner: object) -> None:
        """A client left: its questions are cancelled."""
        for j in self._jobs.pop(owner, set()):
            j.cancelled = True

    # --- what clients and operators see ---

    def welcome(self, hello: Hello) -> dict[str, Any]:
        return {"type": "welcome", "re": hello.id, "protocol": PROTOCOL_VERSION, "server": f"ltu-daemon {__version__}",
                "streams": [{"name": p.name, "kind": p.kind} for p in self.pipelines.values()],
                "events": list(EVENT_TYPES), "subscribe": hello.subscribe.model_dump(), "demo": self.config.demo.enabled,
                "model": self.scheduler is not None}

    def health(self) -> dict[str, Any]:
        return {
            "live": True,
            "ready": self.ready,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "demo": self.config.demo.enabled,
            "asr": {"model": self.config.asr.model, "loaded": self.asr.ready.is_set() and self.asr.error is None,
                    "error": str(self.asr.error) if self.asr.error else None, "queue": self.asr.depth,
                    "decoded": self.asr.decoded, "busy_s": round(self.asr.busy_s, 3)},
            "streams": {name: p.health() for name, p in self.pipelines.items()},
            "model": self._model_health(),
            "clients": len(self.server.connections),
            "rejected_connections": self.server.rejected,  # bad tokens
            "events": dict(self.bus.published),
        }

    def _model_health(self) -> dict[str, Any]:
        if self.worker is None:
            return {"enabled": False}
        w = self.worker
        return {"enabled": True, "checkpoint": self.config.model.checkpoint,
                "loaded": w.ready.is_set() and w.error is None, "error": str(w.error) if w.error else None,
                "queue": self.scheduler.depth if self.scheduler else {}, "counts": dict(w.counts),
                "latest_ms": dict(w.stats), "skipped_scenes": self.scheduler.skipped_scenes if self.scheduler else 0,
                "feature_cache": {"entries": len(self.cache), "mb": round(self.cache.bytes / 2**20, 2),
                                  "hits": self.cache.hits, "misses": self.cache.misses}}
