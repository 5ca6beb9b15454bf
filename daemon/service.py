"""The composition root: builds sources, stream pipelines, the ASR worker, the model worker, the question desk,
the event bus and the websocket server, hands each part only what it uses, runs them on one event loop and shuts
them down in order.

Threads: one per file or microphone source (plus PortAudio's callback thread), one ASR worker and one model
worker, each owning its model. Everything else runs on the loop. Results cross back through `Reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np

from . import __version__
from .capture.sources import FileSource, MicSource, RemoteSource, RemoteStreams
from .config import DaemonConfig, FileStream, MicStream
from .delivery.bus import EventBus
from .delivery.events import SceneEvent
from .delivery.server import Identity, WebsocketServer
from .reply import Reply
from .speech.asr import AsrWorker
from .stream import StreamPipeline
from .understanding.scheduler import Busy, SceneJob
from .understanding.windows import Window

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN_S = 10.0  # how long shutdown waits for the last finals to be decoded and delivered


class ModelLoadError(RuntimeError):
    """A model the service needs could not be loaded (the message says which and why)."""


class Service:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.bus = EventBus()
        self.asr = AsrWorker(config.asr)
        self.pipelines: dict[str, StreamPipeline] = {}
        self.sources: dict[str, FileSource | MicSource | RemoteSource] = {}
        remotes: dict[str, RemoteSource] = {}
        model_on = config.model.enabled
        for s in config.streams:
            self.pipelines[s.name] = StreamPipeline(
                s.name,
                s.source,
                audio=config.audio,
                vad=config.vad,
                asr=config.asr,
                windows=config.windows,
                publish=self.bus.publish,
                asr_worker=self.asr,
                on_window=self._on_window if model_on else None,
            )
            if isinstance(s, FileStream):
                self.sources[s.name] = FileSource(s)
            elif isinstance(s, MicStream):
                self.sources[s.name] = MicSource(s)
            else:
                self.sources[s.name] = remotes[s.name] = RemoteSource(s.name)
        self.understanding = _Understanding(config, self.pipelines) if model_on else None
        self.server = WebsocketServer(
            config.server,
            self.bus,
            RemoteStreams(remotes),
            self.understanding.desk if self.understanding else None,
            streams=lambda: [p.info() for p in self.pipelines.values()],
            identity=Identity(demo=config.demo.enabled, model=model_on),
            health=self.health,
        )
        self.started = time.time()
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []
        self._scene_reply: Reply[SceneEvent] | None = None

    # --- lifecycle ---

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down in order. Raises `ModelLoadError` if a model cannot load."""
        loop = asyncio.get_running_loop()
        self._scene_reply = Reply(loop, self.bus.publish)
        self.asr.start()
        if self.understanding is not None:
            self.understanding.worker.start()
        await self.server.start()  # /healthz answers (not ready) while the models load
        log.info("listening on ws://%s:%d (health: /healthz)", self.config.server.host, self.server.port)
        ready = asyncio.ensure_future(asyncio.to_thread(self._wait_models))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        error = self.asr.error or (self.understanding.worker.error if self.understanding else None)
        if error is not None:
            stopper.cancel()
            await self.server.close()
            raise ModelLoadError(str(error))
        if not stop.is_set():
            for name, pipeline in self.pipelines.items():
                self._tasks.append(asyncio.create_task(pipeline.run(), name=f"stream-{name}"))
                self.sources[name].start(loop, pipeline.queue)
            self.ready = True
            log.info("ready: %d stream(s): %s", len(self.pipelines), ", ".join(self.pipelines) or "none")
        await stopper
        await self.shutdown()

    def _wait_models(self) -> None:
        self.asr.ready.wait()
        if self.understanding is not None and self.asr.error is None:
            self.understanding.worker.ready.wait()

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
        if self.understanding is not None:  # answers in flight end as cancelled; waiting work is dropped
            self.understanding.desk.cancel_all()
            await asyncio.to_thread(self.understanding.worker.stop, max(0.1, deadline - time.monotonic()))
        await asyncio.sleep(0)  # run the replies the workers scheduled before they ended
        while any(self.bus.pending()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # let writers hand the last finals to their clients
        await self.server.close()
        for source in self.sources.values():
            source.join(1.0)
        log.info("stopped")

    # --- understanding: a scene job per window ---

    def _on_window(self, w: Window, audio: np.ndarray | None) -> None:
        sc = self.config.scene
        if self.understanding is None or not sc.enabled or (w.index - 1) % sc.every or self._scene_reply is None:
            return
        job = SceneJob(
            window=w,
            audio=audio,
            deadline=time.monotonic() + self.config.scheduler.scene_deadline_s,
            reply=self._scene_reply,
        )
        with contextlib.suppress(Busy):  # only once closed for shutdown: nothing left to describe
            self.understanding.scheduler.submit(job)

    # --- what operators see ---

    def health(self) -> dict[str, Any]:
        return {
            "live": True,
            "ready": self.ready,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "demo": self.config.demo.enabled,
            "asr": {
                "model": self.config.asr.model,
                "loaded": self.asr.ready.is_set() and self.asr.error is None,
                "error": str(self.asr.error) if self.asr.error else None,
                "queue": self.asr.depth,
                "decoded": self.asr.decoded,
                "busy_s": round(self.asr.busy_s, 3),
            },
            "streams": {name: p.health() for name, p in self.pipelines.items()},
            "model": self.understanding.health() if self.understanding else {"enabled": False},
            **self.server.stats(),
            "events": dict(self.bus.published),
        }


class _Understanding:
    """The model side, present only with `model.enabled`: scheduler, feature cache, model worker, question desk.
    (Importing it loads torch and ltu_as, which a transcripts-only daemon never needs.)"""

    def __init__(self, config: DaemonConfig, pipelines: dict[str, StreamPipeline]) -> None:
        from .understanding.cache import FeatureCache
        from .understanding.desk import QuestionDesk
        from .understanding.scheduler import Scheduler
        from .understanding.worker import ModelWorker

        sc = config.scheduler
        self.checkpoint = config.model.checkpoint
        self.scheduler = Scheduler(sc.max_queue, sc.max_batch, sc.retry_after_s)
        self.cache = FeatureCache(config.features.cache_windows, int(config.features.cache_mb * 2**20))
        self.worker = ModelWorker(config.model, config.scene, self.scheduler, self.cache)
        self.desk = QuestionDesk(
            self.scheduler,
            self.cache,
            {n: p.windows for n, p in pipelines.items()},
            config.questions,
            sc.question_deadline_s,
        )

    def health(self) -> dict[str, Any]:
        w, c = self.worker, self.cache
        return {
            "enabled": True,
            "checkpoint": self.checkpoint,
            "loaded": w.ready.is_set() and w.error is None,
            "error": str(w.error) if w.error else None,
            "queue": self.scheduler.depth,
            "counts": dict(w.counts),
            "latest_ms": dict(w.stats),
            "skipped_scenes": self.scheduler.skipped_scenes,
            "open_questions": self.desk.open_questions,
            "feature_cache": {"entries": len(c), "mb": round(c.bytes / 2**20, 2), "hits": c.hits, "misses": c.misses},
        }
