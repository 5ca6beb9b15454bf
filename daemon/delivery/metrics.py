"""Prometheus metrics (prometheus-client), served as text at `GET /metrics` on the daemon's port.

Counters and histograms are fed by a bus tap (what the daemon publishes) and by the question desk (answers go to
one client, not the bus); gauges (queue depths, store size, connections, stream seconds) are read from their
owners at scrape time, and so are the counts the owners keep themselves (what was dropped), typed as counters.
Every metric has its own registry: no global state.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import (
    AlertClearedEvent,
    AlertEvent,
    AnswerDone,
    DigestEvent,
    FinalEvent,
    GapEvent,
    SceneEvent,
    SpeechStartEvent,
    WindowEvent,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# Read at scrape time: name → (help, reader giving {labels tuple: value}, label names). A counter's name ends in
# `_total`; its reader gives counts that only grow.
Gauges = dict[str, tuple[str, Callable[[], dict[tuple[str, ...], float]], tuple[str, ...]]]


class _Live(Collector):
    def __init__(self, gauges: Gauges, counters: Gauges) -> None:
        self.families = [(GaugeMetricFamily, gauges), (CounterMetricFamily, counters)]

    def describe(self) -> Iterator[Metric]:  # the names, without reading anything (at registration)
        for family, metrics in self.families:
            for name, (doc, _, labels) in metrics.items():
                yield family(name, doc, labels=list(labels))

    def collect(self) -> Iterator[Metric]:
        for family, metrics in self.families:
            for name, (doc, read, labels) in metrics.items():
                m = family(name, doc, labels=list(labels))
                for key, value in read().items():
                    m.add_metric(list(key), value)
                yield m


class Metrics:
    def __init__(self, gauges: Gauges, counters: Gauges | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.utterances = Counter("ltu_utterances_total", "Utterances the VAD confirmed", ["stream"], registry=r)
        self.finals = Counter("ltu_finals_total", "Final transcripts", ["stream"], registry=r)
        self.windows = Counter("ltu_windows_total", "10 s windows closed", ["stream"], registry=r)
        self.scenes = Counter("ltu_scenes_total", "Scene descriptions", ["stream"], registry=r)
        self.alerts = Counter("ltu_alerts_total", "Alerts fired", ["stream", "rule"], registry=r)
        self.alerts_cleared = Counter("ltu_alerts_cleared_total", "Alerts cleared", ["stream", "rule"], registry=r)
        self.digests = Counter("ltu_digests_total", "Digests", ["stream"], registry=r)
        self.gaps = Counter("ltu_gap_seconds_total", "Audio that never arrived, s", ["stream"], registry=r)
        self.answers = Counter("ltu_answers_total", "Answers", ["scope", "reason"], registry=r)
        self.final_latency = Histogram(
            "ltu_final_latency_seconds",
            "End of speech to its final transcript",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.scene_latency = Histogram(
            "ltu_scene_latency_seconds",
            "Window closed to its scene description",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ltu_question_ttft_seconds",
            "Question received to its first answer token",
            ["scope"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_Live(gauges, counters or {}))
        self._window_at: collections.OrderedDict[str, float] = collections.OrderedDict()  # window id → closed at

    def on_event(self, event: object) -> None:
        """A bus tap."""
        if isinstance(event, SpeechStartEvent):
            self.utterances.labels(event.stream).inc()
        elif isinstance(event, FinalEvent):
            self.finals.labels(event.stream).inc()
            if event.wall_end is not None:
                self.final_latency.labels(event.stream).observe(max(0.0, event.time - event.wall_end))
        elif isinstance(event, WindowEvent):
            self.windows.labels(event.stream).inc()
            self._window_at[event.id] = event.time
            while len(self._window_at) > 1000:
                self._window_at.popitem(last=False)
        elif isinstance(event, SceneEvent):
            self.scenes.labels(event.stream).inc()
            closed = self._window_at.pop(event.window.id, None)
            if closed is not None:
                self.scene_latency.labels(event.stream).observe(max(0.0, event.time - closed))
        elif isinstance(event, AlertEvent):
            self.alerts.labels(event.stream, event.rule).inc()
        elif isinstance(event, AlertClearedEvent):
            self.alerts_cleared.labels(event.stream, event.rule).inc()
        elif isinstance(event, DigestEvent):
            self.digests.labels(event.stream).inc()
        elif isinstance(event, GapEvent):
            self.gaps.labels(event.stream).inc(event.duration_s)

    def on_answer(self, done: AnswerDone) -> None:
        self.answers.labels(done.scope, done.reason).inc()
        if done.timings.ttft_ms is not None:
            self.ttft.labels(done.scope).observe(done.timings.ttft_ms / 1000)

    def render(self) -> tuple[str, bytes]:
        """(content type, body) of a scrape."""
        return CONTENT_TYPE, generate_latest(self.registry)


def per_key(values: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """`{"a": 1}` → `{("a",): 1.0}`: a one-label gauge's readings."""
    return {(k,): float(v) for k, v in values.items()}
