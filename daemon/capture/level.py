"""A throttled level meter: RMS and peak in dBFS over blocks of the stream clock."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import dbfs


@dataclass(frozen=True)
class Level:
    """Levels of samples [start, stop) of a stream. dBFS of RMS: a full-scale sine reads -3.01, silence -120."""

    start: int
    stop: int
    rms_dbfs: float
    peak_dbfs: float


class LevelMeter:
    """Accumulates audio and yields one `Level` per `interval` samples of audio, at most one per `interval_s` of
    wall time: a source running faster than real time gets its levels merged instead of flooding clients."""

    def __init__(self, interval: int, interval_s: float) -> None:
        self.interval, self.interval_s = interval, interval_s
        self._start = 0
        self._n = 0
        self._sumsq = 0.0
        self._peak = 0.0
        self._last_wall = float("-inf")

    def push(self, samples: np.ndarray, first: int, wall: float) -> Level | None:
        """Feed [n] float32 samples starting at stream index `first`; `wall` is now (s)."""
        if self._n == 0:
            self._start = first
        x = np.asarray(samples, dtype=np.float64)
        self._n += len(x)
        self._sumsq += float(np.dot(x, x))
        if len(x):
            self._peak = max(self._peak, float(np.abs(x).max()))
        if self._n < self.interval or wall - self._last_wall < self.interval_s:
            return None
        level = Level(self._start, self._start + self._n, dbfs(self._sumsq / self._n), dbfs(self._peak**2))
        self._n, self._sumsq, self._peak, self._last_wall = 0, 0.0, 0.0, wall
        return level
