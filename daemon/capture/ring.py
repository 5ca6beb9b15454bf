"""A bounded in-memory ring of a stream's recent audio, addressed by sample index on the stream clock."""

from __future__ import annotations

import numpy as np


class AudioRing:
    """The last `capacity` samples of one stream (float32 on the stream clock: sample `i` is at i / SAMPLE_RATE s,
    see `daemon.clock`).

    Memory is fixed at construction (`capacity` × 4 bytes); writing past it overwrites the oldest audio.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._buf = np.zeros(capacity, dtype=np.float32)
        self.end = 0  # samples ever written: the stream clock, in samples

    @property
    def capacity(self) -> int:
        return len(self._buf)

    @property
    def start(self) -> int:
        """Index of the oldest sample still held."""
        return max(0, self.end - self.capacity)

    def write(self, samples: np.ndarray) -> int:
        """Append `samples` ([n] float32); returns the stream index of the first one."""
        first = self.end
        x = np.asarray(samples, dtype=np.float32)[-self.capacity :]
        skipped = len(samples) - len(x)
        pos = (first + skipped) % self.capacity
        head = min(len(x), self.capacity - pos)
        self._buf[pos : pos + head] = x[:head]
        self._buf[: len(x) - head] = x[head:]
        self.end += len(samples)
        return first

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of samples [start, stop) of the stream. Raises `IndexError` when part of it was overwritten or is
        in the future."""
        if not self.start <= start <= stop <= self.end:
            raise IndexError(f"samples [{start}, {stop}) are not in the ring (it holds [{self.start}, {self.end}))")
        n = stop - start
        pos = start % self.capacity
        head = min(n, self.capacity - pos)
        return np.concatenate([self._buf[pos : pos + head], self._buf[: n - head]])
