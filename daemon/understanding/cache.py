"""A bounded LRU of per-window audio features (`[32, 25, 1280]` fp32 = 4 MB for the real model), so questions
about a window never recompute them. Bounded by entries and by bytes; the least recently used goes first.
Thread-safe: the model worker fills it, the event loop reads its size for /healthz."""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class FeatureCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:  # no effect on recency or the hit counts
        with self._lock:
            return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if key in self._items:
                self.bytes -= self._size(self._items.pop(key))
            self._items[key] = value
            self.bytes += size
            while self._items and (len(self._items) > self.max_entries or self.bytes > self.max_bytes):
                _, old = self._items.popitem(last=False)
                self.bytes -= self._size(old)

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()
