"""The composition root: builds sources, stream pipelines, the ASR worker, the model worker, the question and
memory desks, the history store, the alert rules, the event bus with its taps (store, alerts, MQTT, metrics) and
the websocket server; hands each part only what it uses, runs them on one event loop and shuts them down in order.

Threads: one per file or microphone source (plus PortAudio's callback thread), one ASR worker, one model worker
and one store writer, each owning its resource, and paho's MQTT network thread. Everything else runs on the loop.
Results cross back through `Reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import __version__
from .capture.sources import FileSource, MicSource, RemoteSource, RemoteStreams, RtspSource
from .clock import SAMPLE_RATE, s_to_samples
from .config import ConfigError, DaemonConfig, FileStream, MicStream, RemoteStream, RtspStream
from .delivery.bus import EventBus
from .delivery.events import AlertEvent, AnswerDone, DigestEvent, HistoryHit, SceneEvent, StatusEvent
from .delivery.server import Identity, WebsocketServer
from .memory.alerts import AlertEngine
from .memory.desk import MemoryDesk
from .memory.store import AnswerRecord, Clip, Store
from .reload import ReloadPlan, in_effect, plan
from .reply import Reply
from .rules import AlertRule
from .speech.asr import AsrWorker, LoadChange
from .speech.load import ASR_MODE_DETAIL
from .stream import StreamPipeline
from .understanding.scheduler import Busy, CheckJob, CheckResult, SceneJob
from .understanding.windows import StreamWindows, Window

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN_S = 10.0  # how long shutdown waits for the last finals to be decoded and delivered
CLIP_S = 10.0  # audio kept with an alert that has no window: this much around the moment it was seen


class ModelLoadError(RuntimeError):
    """A model the service needs could not be loaded (the message says which and why)."""


class Service:
    def __init__(self, config: DaemonConfig) -> None:
        """Raises `StoreError` when the history store cannot be opened."""
        self.config = config
        model_on = config.model.enabled
        self.bus = EventBus()
        self.asr = AsrWorker(config.asr_effective())
        self.pipelines: dict[str, StreamPipeline] = {}
        self.sources: dict[str, FileSource | MicSource | RtspSource | RemoteSource] = {}
        # live views the server and the question desk read: a reload adds and removes streams in them
        self._remotes: dict[str, RemoteSource] = {}
        self._windows: dict[str, StreamWindows] = {}
        for s in config.streams:
            self._add_stream(s)

        # memory: the store (numbering continues after the last stored window and utterance) and the alert rules
        self.store: Store | None = None
        if config.store.enabled:
            from ltu_as.serving.embedding import Embedder

            device = config.store.embed_device
            self.store = Store(config.store, lambda: Embedder(device))
            self.store.open()
            for name, pipeline in self.pipelines.items():
                pipeline.continue_from(*self.store.last_indices(name))
        self._rowid_at_start = self.store.last_rowid() if self.store else 0  # digests cover what comes after
        self.alerts = AlertEngine(
            config.alerts.rules,
            self.store.rules() if self.store else [],
            self.bus.publish,
            clip=self._clip,
            counts=self.store.alert_counts() if self.store else None,  # alert ids continue after a restart
            max_runtime=config.alerts.max_runtime_rules,
        )
        if self.store is not None:
            self.bus.tap(self.store.record)
        self.bus.tap(self.alerts.on_event)

        # delivery beyond websockets
        self.metrics = None
        if config.metrics.enabled:
            from .delivery.metrics import Metrics

            self.metrics = Metrics(*self._live_metrics())
            self.bus.tap(self.metrics.on_event)
        self.mqtt = None
        if config.mqtt.enabled:
            from .delivery.mqtt import MqttBridge

            self.mqtt = MqttBridge(config.mqtt, list(self.pipelines), self.alerts.info, __version__)
        self.bus.tap(self._to_mqtt)  # through the service: a reload may replace the bridge

        # learning: a learned checkpoint in use (learn/active.json) replaces model.checkpoint for the model only;
        # the config itself stays as written, so a reload compares like with like
        self.learning = None
        model_config = config
        if config.learn.enabled and model_on:
            from .learning.active import Active

            learned = Active.load(config.learn.folder(config.store)).usable()
            if learned is not None:
                log.info("starting on the learned checkpoint %s (learn.rollback goes back)", learned)
                model_config = config.model_copy(
                    update={"model": config.model.model_copy(update={"checkpoint": learned})}
                )
        self.understanding = _Understanding(model_config, self._windows, self.store, self._record) if model_on else None
        if config.learn.enabled and self.understanding is not None:
            from .learning.desk import LearnDesk

            self.learning = LearnDesk(
                config.learn,
                config.learn.folder(config.store),
                config.learn.base or config.model.checkpoint,
                (config.model.whisper, config.model.llm),
                self._window_audio,
                self.understanding.swap,
                self.bus.publish,
            )
        self.memory = MemoryDesk(self.store, self.alerts, changed=self._rules_changed)
        self.server = WebsocketServer(
            config.server,
            self.bus,
            RemoteStreams(self._remotes),
            self.understanding.desk if self.understanding else None,
            self.memory,
            streams=lambda: [p.info() for p in self.pipelines.values()],
            identity=Identity(demo=config.demo.enabled, model=model_on),
            health=self.health,
            extra_routes={"/metrics": self.metrics.render} if self.metrics else None,
            clips=self.store.clip_bytes if self.store else None,
            learning=self.learning,
        )
        # speech endpoints: whole clips through the same ASR, published as finals of their own streams
        self.endpoints: list[Any] = []
        if config.wyoming.enabled or config.api.enabled:
            from .speech.desk import SpeechDesk

            store = self.store
            speech = SpeechDesk(
                self.asr, self.bus.publish, config.vad, lambda s: store.last_indices(s) if store else (0, 0)
            )
            if config.wyoming.enabled:
                from .delivery.wyoming_stt import WyomingServer, describe

                info = describe(config.asr.model, config.asr.language, __version__)
                self.endpoints.append(WyomingServer(config.wyoming, speech, info))
            if config.api.enabled:
                from .delivery.transcriptions import TranscriptionApi

                token = config.server.resolved_token()
                self.endpoints.append(
                    TranscriptionApi(
                        config.api, token, speech, config.asr.model, config.asr.language, config.server.allowed_hosts
                    )
                )
        self.started = time.time()
        self.ready = False
        self._tasks: dict[str, asyncio.Task[None]] = {}  # each stream's pipeline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_lock = asyncio.Lock()
        self.reloads: dict[str, Any] = {"count": 0, "refused": 0, "last": None}
        self._background: list[asyncio.Task[None]] = []
        self._stop_background = asyncio.Event()
        self._scene_reply: Reply[SceneEvent] | None = None
        self._check_reply: Reply[CheckResult] | None = None

    # --- streams: built at start, added and removed by a reload ---

    def _add_stream(self, s: MicStream | FileStream | RtspStream | RemoteStream) -> StreamPipeline:
        config = self.config
        pipeline = StreamPipeline(
            s.name,
            s.source,
            audio=config.audio,
            vad=config.vad,
            asr=config.asr,
            windows=config.windows,
            publish=self.bus.publish,
            asr_worker=self.asr,
            on_window=self._on_window if config.model.enabled else None,
            partials_read=functools.partial(self.bus.wants, "transcript.partial", s.name),
            live=not (isinstance(s, FileStream) and not s.realtime),
        )
        self.pipelines[s.name] = pipeline
        self._windows[s.name] = pipeline.windows
        if isinstance(s, FileStream):
            self.sources[s.name] = FileSource(s)
        elif isinstance(s, MicStream):
            self.sources[s.name] = MicSource(s)
        elif isinstance(s, RtspStream):
            self.sources[s.name] = RtspSource(s)
        else:
            self.sources[s.name] = self._remotes[s.name] = RemoteSource(s.name, config.server.max_audio_ahead_s)
        return pipeline

    def _start_stream(self, name: str) -> None:
        assert self._loop is not None, "streams start once the service runs"
        pipeline = self.pipelines[name]
        self._tasks[name] = asyncio.create_task(pipeline.run(), name=f"stream-{name}")
        self.sources[name].start(self._loop, pipeline.queue)

    async def _remove_stream(self, name: str, why: str) -> tuple[int, int]:
        """Stop a stream's source and let its pipeline flush: its last utterance goes out as a final, as at
        shutdown. Returns its (window, utterance) numbering, which a changed stream of that name continues."""
        pipeline, source = self.pipelines.pop(name), self.sources.pop(name)
        self._windows.pop(name, None)
        self._remotes.pop(name, None)  # a satellite feeding it is told so at its next frame
        source.stop()
        task = self._tasks.pop(name, None)
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_DRAIN_S)
            if not done:
                task.cancel()
        await asyncio.to_thread(source.join, 1.0)
        self.bus.publish(StatusEvent(stream=name, state="closed", detail=why))
        return pipeline.windower.index, pipeline.vad.index

    # --- reload (SIGHUP) ---

    async def reload_from(self, read: Callable[[], DaemonConfig]) -> ReloadPlan | None:
        """Read the config again with `read` (in a thread) and apply it (`reload`). A config that cannot be read
        or applied is refused: the reason is logged and counted in /healthz, and the running config stays."""
        try:
            new = await asyncio.to_thread(read)
            return await self.reload(new)
        except ConfigError as e:
            self.reloads["refused"] += 1
            self.reloads["last"] = {"at": round(time.time(), 3), "ok": False, "error": str(e)}
            log.error("config reload refused; the running config stays: %s", e)
            return None

    async def reload(self, new: DaemonConfig) -> ReloadPlan:
        """Apply `new`'s live parts (see `daemon.reload`) without dropping clients or other streams' windows.
        Raises `ConfigError`, having changed nothing, when `new` cannot apply to the running daemon."""
        async with self._reload_lock:
            if not self.ready:
                raise ConfigError("the daemon is still starting: reload once /healthz says ready")
            p = plan(self.config, new)
            effective = in_effect(self.config, new)
            bridge = None
            if p.mqtt and effective.mqtt.enabled:  # built first: a bad password file refuses the whole reload
                from .delivery.mqtt import MqttBridge

                bridge = MqttBridge(effective.mqtt, [s.name for s in effective.streams], self.alerts.info, __version__)
            numbering = {}
            for name in p.removed + p.changed:
                why = "removed from the config" if name in p.removed else "restarting: its config changed"
                numbering[name] = await self._remove_stream(name, why)
            self.config = effective
            for name in p.changed + p.added:
                pipeline = self._add_stream(effective.stream(name))
                pipeline.continue_from(*numbering.get(name, (0, 0)))
                if self.store is not None:
                    pipeline.continue_from(*await asyncio.to_thread(self.store.last_indices, name))
                self._start_stream(name)
            if p.rules:
                runtime = await asyncio.to_thread(self.store.rules) if self.store else []
                self.alerts.set_config_rules(effective.alerts.rules, runtime)
            if p.mqtt:
                old, self.mqtt = self.mqtt, bridge
                if old is not None:
                    await asyncio.to_thread(old.stop)
                if bridge is not None:
                    bridge.start()
            elif (p.added or p.removed) and self.mqtt is not None:
                self.mqtt.set_streams(list(self.pipelines))
            if p.rules and not p.mqtt:
                self._rules_changed()
            if p.retention and self.store is not None:
                st = effective.store
                self.store.set_retention(st.retention_days, st.max_mb, st.clip_retention_days)
            if p.log_level:
                logging.getLogger().setLevel(effective.log.level.upper())
            self.reloads["count"] += 1
            self.reloads["last"] = {
                "at": round(time.time(), 3),
                "ok": True,
                "applied": p.live,
                "restart_needed": list(p.restart),
            }
            log.info("config reloaded: %s", ", ".join(p.live) or "nothing to apply")
            if p.restart:
                log.warning("config reload: these keys changed but apply only on restart: %s", ", ".join(p.restart))
            return p

    def _to_mqtt(self, event: object) -> None:
        if self.mqtt is not None:
            self.mqtt.on_event(event)

    def _window_audio(self, window_id: str) -> Any:
        """A window's `[WINDOW_SAMPLES]` float32 audio for a label; None once the ring dropped it; False when no
        stream has that window."""
        windows = self._windows.get(window_id.split(":w")[0])
        w = windows.get(window_id) if windows is not None else None
        if windows is None or w is None:
            return False
        return windows.audio(w)

    def _rules_changed(self) -> None:
        if self.mqtt is not None:
            self.mqtt.rules_changed()

    # --- lifecycle ---

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down in order. Raises `ModelLoadError` if a model cannot load."""
        loop = self._loop = asyncio.get_running_loop()
        self._scene_reply = Reply(loop, self.bus.publish)
        self._check_reply = Reply(loop, lambda r: self.alerts.on_check(r.stream, r.window, r.wall, r.scores))
        if self.store is not None:
            self.store.start()
        self.asr.on_overload = Reply(loop, self._on_asr_load)
        self.asr.start()
        if self.understanding is not None:
            self.understanding.worker.start()
        if self.mqtt is not None:
            self.mqtt.start()
        await self.server.start()  # /healthz answers (not ready) while the models load
        log.info("listening on ws://%s:%d (health: /healthz)", self.config.server.host, self.server.port)
        ready = asyncio.ensure_future(asyncio.to_thread(self._wait_models))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        error = self.asr.error or (self.understanding.worker.error if self.understanding else None)
        if error is not None:
            stopper.cancel()
            await self.server.close()
            self._close_memory()
            raise ModelLoadError(str(error))
        if not stop.is_set():
            for name in self.pipelines:
                self._start_stream(name)
            for endpoint in self.endpoints:
                await endpoint.start()
            self._background.append(asyncio.create_task(self._tick_alerts(), name="alerts"))
            digests = self._digests()
            if digests is not None:
                self._background.append(asyncio.create_task(digests.run(self._stop_background), name="digests"))
            if self.learning is not None:
                self._background.append(
                    asyncio.create_task(self.learning.run_daily(self._stop_background), name="learn")
                )
            self.ready = True
            log.info("ready: %d stream(s): %s", len(self.pipelines), ", ".join(self.pipelines) or "none")
        await stopper
        await self.shutdown()

    def _on_asr_load(self, change: LoadChange) -> None:
        """The ASR changed how it works under load (on the loop): every stream's clients hear it, because the one
        ASR serves them all."""
        if change.level == 0:
            detail = f"speech recognition caught up: back to normal (finals wait {change.lag_s:.1f} s)"
        else:
            detail = f"speech recognition is behind by {change.lag_s:.1f} s: {ASR_MODE_DETAIL[change.mode]}"
        for name, pipeline in self.pipelines.items():
            self.bus.publish(
                StatusEvent(
                    stream=name, state=pipeline.state, detail=detail, asr_mode=change.mode, asr_lag_s=change.lag_s
                )
            )

    def _wait_models(self) -> None:
        self.asr.ready.wait()
        if self.understanding is not None and self.asr.error is None:
            self.understanding.worker.ready.wait()

    async def shutdown(self) -> None:
        """Stop sources, flush open utterances to finals, deliver them, close clients with 1001, write the store."""
        log.info("shutting down")
        self.ready = False
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        for source in self.sources.values():
            source.stop()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks.values(), timeout=max(0.1, deadline - time.monotonic()))
            for t in late:
                t.cancel()
        for endpoint in self.endpoints:  # no new requests; those in flight are cut off (their clients retry)
            await endpoint.close()
        await asyncio.to_thread(self.asr.stop, max(0.1, deadline - time.monotonic()))
        if self.learning is not None:  # a job in progress is cut off: its run folder stays, nothing is swapped
            await self.learning.close()
        if self.understanding is not None:  # answers in flight end as cancelled; waiting work is dropped
            self.understanding.desk.cancel_all()
            await asyncio.to_thread(self.understanding.worker.stop, max(0.1, deadline - time.monotonic()))
        self._stop_background.set()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        await asyncio.sleep(0)  # run the replies the workers scheduled before they ended
        while any(self.bus.pending()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # let writers hand the last finals to their clients
        await self.server.close()
        for source in self.sources.values():
            source.join(1.0)
        await asyncio.to_thread(self._close_memory)
        log.info("stopped")

    def _close_memory(self) -> None:
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.store is not None:
            self.store.stop(10.0)

    async def _tick_alerts(self) -> None:
        while not self._stop_background.is_set():
            self.alerts.tick(time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_background.wait(), self.config.alerts.tick_s)

    # --- understanding: a scene job and an alert check per window ---

    def _on_window(self, w: Window, audio: np.ndarray | None) -> None:
        if self.understanding is None or self._scene_reply is None or self._check_reply is None:
            return
        deadline = time.monotonic() + self.config.scheduler.scene_deadline_s
        questions = {r.name: r.question or "" for r in self.alerts.questions(w.stream)}
        with contextlib.suppress(Busy):  # only once closed for shutdown: nothing left to describe
            if questions:
                self.understanding.scheduler.submit(
                    CheckJob(window=w, audio=audio, deadline=deadline, questions=questions, reply=self._check_reply)
                )
            sc = self.config.scene
            if sc.enabled and not (w.index - 1) % sc.every:
                self.understanding.scheduler.submit(
                    SceneJob(window=w, audio=audio, deadline=deadline, reply=self._scene_reply)
                )

    def _digests(self) -> Any:
        if not self.config.digests.enabled or self.store is None or self.understanding is None:
            return None
        from ltu_as import GenerationOptions

        from .memory.digests import Digests
        from .understanding.scheduler import DigestJob

        cfg, store, scheduler = self.config.digests, self.store, self.understanding.scheduler
        reply: Reply[DigestEvent] = Reply.here(self.bus.publish)

        def submit(stream: str, since: float, until: float, hits: list[HistoryHit]) -> None:
            job = DigestJob(
                deadline=time.monotonic() + cfg.every_s,
                id=f"{stream}/digest/{int(until)}",
                stream=stream,
                since=since,
                until=until,
                prompt=cfg.prompt,
                hits=list(reversed(hits)),
                options=GenerationOptions(max_new_tokens=cfg.max_new_tokens).greedy(),
                reply=reply,
            )
            with contextlib.suppress(Busy):
                scheduler.submit(job)

        return Digests(cfg, lambda: list(self.pipelines), store.windows_after, submit, after=self._rowid_at_start)

    # --- memory: answers kept, clips of alerts ---

    def _record(self, question: str, done: AnswerDone) -> None:
        if self.store is not None:
            self.store.put(AnswerRecord(question, done))
        if self.metrics is not None:
            self.metrics.on_answer(done)

    def _clip(self, alert: AlertEvent, rule: AlertRule) -> str | None:
        """Keep the alert's audio (its window, or `CLIP_S` around the moment) if clips are on and allowed."""
        store, pipeline = self.store, self.pipelines.get(alert.stream)
        if store is None or pipeline is None or not store.config.clips:
            return None
        w = pipeline.windows.get(alert.window.id) if alert.window else None
        speech = bool(w.transcript) if w else alert.kind in ("phrase", "regex")
        if speech and not store.config.clips_with_speech:
            return None
        if w is not None:
            audio = pipeline.windows.audio(w)
        else:
            mid = s_to_samples(alert.at)
            start = max(pipeline.ring.start, mid - s_to_samples(CLIP_S / 2))
            try:
                audio = pipeline.ring.read(start, min(pipeline.ring.end, start + s_to_samples(CLIP_S)))
            except IndexError:
                audio = None
        if audio is None or not len(audio):
            return None
        name = alert.id.replace("/", "_") + ".wav"
        store.put(Clip(alert.id, name, audio, SAMPLE_RATE))
        return name

    # --- what operators see ---

    def _live_metrics(self) -> tuple[Any, Any]:
        """(gauges, counters) read at scrape time."""
        from .delivery.metrics import per_key

        def queues() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {("asr", k): float(v) for k, v in self.asr.depth.items()}
            if self.understanding is not None:
                out.update({("model", k): float(v) for k, v in self.understanding.scheduler.depth.items()})
            if self.store is not None:
                out[("store", "writes")] = float(self.store.stats()["queue"])
            if self.mqtt is not None:
                out[("mqtt", "messages")] = float(self.mqtt.stats()["queue"])
            out[("clients", "messages")] = float(sum(self.bus.pending()))
            return out

        def dropped() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {(t,): float(n) for t, n in self.bus.shed.items()}
            out[("slow_client_disconnect",)] = float(self.bus.overflowed)
            if self.store is not None:
                out[("store_queue_full",)] = float(self.store.dropped)
            if self.mqtt is not None:
                out[("mqtt_queue_full",)] = float(self.mqtt.dropped)
            if self.understanding is not None:
                out[("scene_skipped",)] = float(self.understanding.scheduler.skipped_scenes)
                out[("check_skipped",)] = float(self.understanding.scheduler.skipped_checks)
            return out

        return {
            "ltu_stream_audio_seconds": (
                "Audio heard per stream, s (this run)",
                lambda: per_key({n: p.ring.end / SAMPLE_RATE for n, p in self.pipelines.items()}),
                ("stream",),
            ),
            "ltu_queue_depth": ("Items waiting, by queue", queues, ("queue", "kind")),
            "ltu_asr_lag_seconds": (
                "How long the oldest final waiting for the ASR has waited, s",
                lambda: {(): self.asr.lag_s()},
                (),
            ),
            "ltu_asr_degraded_level": (
                "The ASR's overload step: 0 normal, 1 no partials, 2 beam 1, 3 no speculative finals",
                lambda: {(): float(self.asr.overload.level)},
                (),
            ),
            "ltu_clients": ("Websocket clients past their hello", lambda: {(): float(self.server.clients)}, ()),
            "ltu_store_bytes": (
                "History store size in use, bytes",
                lambda: {(): float(self.store.size_bytes())} if self.store else {},
                (),
            ),
            "ltu_store_degraded": (
                "1 while the history store cannot write (full disk, I/O error)",
                lambda: {(): float(bool(self.store.degraded))} if self.store else {},
                (),
            ),
            "ltu_alerts_active": ("Active alerts", lambda: {(): float(len(self.alerts.active()))}, ()),
            "ltu_mqtt_connected": (
                "1 while connected to the MQTT broker",
                lambda: {(): float(self.mqtt.connected)} if self.mqtt else {},
                (),
            ),
        }, {
            "ltu_dropped_total": ("Events and work dropped, by reason", dropped, ("reason",)),
            "ltu_asr_decodes_total": (
                "ASR decodes, by kind (final, speculative, partial)",
                lambda: {(k,): float(self.asr.counts[k]) for k in ("final", "speculative", "partial")},
                ("kind",),
            ),
            "ltu_asr_partials_skipped_total": (
                "Partial transcripts not decoded, by reason (unread, superseded, shed, stale)",
                lambda: per_key(self._partials_skipped()),
                ("reason",),
            ),
        }

    def _partials_skipped(self) -> dict[str, int]:
        """Partials not decoded, by why: unread (nobody subscribed), superseded (a newer one replaced it while it
        waited), shed (overload), stale (its final came first)."""
        c = self.asr.counts
        return {
            "unread": sum(p.partials_unread for p in self.pipelines.values()),
            **{why: c[f"partial_{why}"] for why in ("superseded", "shed", "stale")},
        }

    def health(self) -> dict[str, Any]:
        return {
            "live": True,
            "ready": self.ready,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "demo": self.config.demo.enabled,
            "degraded": [
                what
                for what, bad in (
                    ("store", self.store is not None and self.store.degraded),
                    ("mqtt", self.mqtt is not None and not self.mqtt.connected),
                )
                if bad
            ],
            "asr": {
                "model": self.config.asr.model,
                "loaded": self.asr.ready.is_set() and self.asr.error is None,
                "error": str(self.asr.error) if self.asr.error else None,
                "queue": self.asr.depth,
                "decoded": self.asr.decoded,
                "batches": self.asr.batches,
                "busy_s": round(self.asr.busy_s, 3),
                "lanes": self.asr.lanes,
                "mode": self.asr.overload.mode,
                "lag_s": round(self.asr.lag_s(), 3),
                "decodes": {k: self.asr.counts[k] for k in ("final", "speculative", "partial")},
                "partials_skipped": self._partials_skipped(),
            },
            "streams": {name: p.health() for name, p in self.pipelines.items()},
            "endpoints": {e.name: {"port": e.port, "stream": e.config.stream, **e.stats()} for e in self.endpoints},
            "model": self.understanding.health() if self.understanding else {"enabled": False},
            "store": self.store.stats() if self.store else {"enabled": False},
            "alerts": {
                "rules": len(self.alerts.info()),
                "active": len(self.alerts.active()),
                "fired": self.alerts.fired,
                "cleared": self.alerts.cleared,
            },
            "mqtt": self.mqtt.stats() if self.mqtt else {"enabled": False},
            **self.server.stats(),
            "events": dict(self.bus.published),
            "reloads": self.reloads,
            "learn": self.learning.health() if self.learning else {"enabled": False},
        }


class _Understanding:
    """The model side, present only with `model.enabled`: scheduler, feature cache, model worker, question desk.
    (Importing it loads torch and ltu_as, which a transcripts-only daemon never needs.)"""

    def __init__(
        self, config: DaemonConfig, windows: dict[str, StreamWindows], store: Store | None, record: Any
    ) -> None:
        from ltu_as.errors import ModelNotFoundError

        from .understanding.cache import FeatureCache
        from .understanding.desk import QuestionDesk
        from .understanding.memory import memory_plan
        from .understanding.scheduler import Scheduler
        from .understanding.worker import ModelWorker

        try:
            plan = memory_plan(config)
        except ModelNotFoundError as e:
            raise ModelLoadError(str(e)) from None
        if not plan.fits:
            raise ModelLoadError(
                f"LTU-AS does not fit in memory: {plan.problem}\n  `ltu-daemon check --memory` prints the whole plan"
            )
        log.info(
            "memory plan on %s: %.2f GiB of weights, %d KV slots, %.2f GiB free",
            plan.device,
            plan.weights / 2**30,
            plan.slots,
            plan.available / 2**30,
        )
        sc = config.scheduler
        self.checkpoint = config.model.checkpoint
        self.scheduler = Scheduler(sc.max_queue, sc.max_batch, sc.retry_after_s)
        self.cache = FeatureCache(config.features.cache_windows, int(config.features.cache_mb * 2**20))
        self.worker = ModelWorker(
            config.model, config.scene, self.scheduler, self.cache, config.engine, config.llm, slots=plan.slots or None
        )
        search = None
        if store is not None:

            def search(query: str, since: float | None, until: float | None, streams: Any, limit: int) -> Any:
                return store.search(query, since=since, until=until, streams=streams, limit=limit)[0]

        self.desk = QuestionDesk(
            self.scheduler,
            self.cache,
            windows,
            config.questions,
            sc.question_deadline_s,
            history=config.history,
            search=search,
            record=record,
        )

    async def swap(self, checkpoint: str) -> str | None:
        """Load `checkpoint`'s trainable weights into the running model (between batches); None when it is in
        use, else why not."""
        from .reply import Reply
        from .understanding.scheduler import SwapJob

        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.scheduler.submit(SwapJob(checkpoint=checkpoint, reply=Reply.here(done.set_result), deadline=float("inf")))
        why = await done
        if why is None:
            self.checkpoint = checkpoint
        return why

    def health(self) -> dict[str, Any]:
        w, c = self.worker, self.cache
        return {
            "enabled": True,
            "checkpoint": self.checkpoint,
            "loaded": w.ready.is_set() and w.error is None,
            "error": str(w.error) if w.error else None,
            "queue": self.scheduler.depth,
            "counts": dict(w.counts),
            "engine": w.engine_stats(),
            "latest_ms": dict(w.stats),
            "skipped_scenes": self.scheduler.skipped_scenes,
            "skipped_checks": self.scheduler.skipped_checks,
            "open_questions": self.desk.open_questions,
            "feature_cache": {"entries": len(c), "mb": round(c.bytes / 2**20, 2), "hits": c.hits, "misses": c.misses},
        }
