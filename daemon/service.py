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
from .protocol import EVENT_TYPES, PROTOCOL_VERSION, Hello
from .server import WebsocketServer
from .sources import FileSource, MicSource, RemoteSource
from .stream import StreamPipeline

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
        for s in config.streams:
            self.pipelines[s.name] = StreamPipeline(s.name, s.source, config, self.bus, self.asr)
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
        await self.server.start()  # /healthz answers (not ready) while the model loads
        log.info("listening on ws://%s:%d (health: /healthz)", self.config.server.host, self.server.port)
        ready = asyncio.ensure_future(asyncio.to_thread(self.asr.ready.wait))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if self.asr.error is not None:
            stopper.cancel()
            await self.server.close()
            raise ModelLoadError(str(self.asr.error))
        if not stop.is_set():
            for name, pipeline in self.pipelines.items():
                self._tasks.append(asyncio.create_task(pipeline.run(), name=f"stream-{name}"))
                self.sources[name].start(self._loop, pipeline.queue)
            self.ready = True
            log.info("ready: %d stream(s): %s", len(self.pipelines), ", ".join(self.pipelines) or "none")
        await stopper
        await self.shutdown()

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

    # --- what clients and operators see ---

    def welcome(self, hello: Hello) -> dict[str, Any]:
        return {"type": "welcome", "re": hello.id, "protocol": PROTOCOL_VERSION, "server": f"ltu-daemon {__version__}",
                "streams": [{"name": p.name, "kind": p.kind} for p in self.pipelines.values()],
                "events": list(EVENT_TYPES), "subscribe": hello.subscribe.model_dump(), "demo": self.config.demo.enabled}

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
            "clients": len(self.server.connections),
            "events": dict(self.bus.published),
        }
