"""History store benchmark: insert rate, and search latency (full text, vector, combined) at 10^4, 10^5 and 10^6
stored windows, each against a brute-force baseline computed in the same run on the same data.

    .venv/bin/python bench/store.py                       # 1e4, 1e5, 1e6 (about 15 min, ~2.5 GB in a temp dir)
    .venv/bin/python bench/store.py --sizes 10000 100000  # quicker

Synthetic windows: 20 words drawn from a Zipf-distributed vocabulary of 5,000, over 8 streams and a month of wall
clock. Embeddings come from a fast deterministic stand-in (hashed bag of words → 384-d, normalised) so that a
million windows can be written; MiniLM's own speed, which bounds a real daemon's inserts, is measured separately
on 512 of the texts. Baselines: a Python scan of every text for the query words ranked by how many they contain
(text), a numpy matrix product over every vector (vector), and both merged the same way (combined). The store
goes through its real writer thread and its real `search`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daemon.config import StoreConfig
from daemon.delivery.events import WindowEvent
from daemon.memory.store import Store

DIM = 384
T0 = time.time() - 30 * 86400  # the windows span the last month (inside the retention)
MONTH = 30 * 86400


def vocabulary(n: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(n)]


class HashEmbedder:
    """Bag of words hashed into 384 dims, L2-normalised: cheap, deterministic, and similar for shared words."""

    def __init__(self) -> None:
        self.cache: dict[str, np.ndarray] = {}

    def word(self, w: str) -> np.ndarray:
        v = self.cache.get(w)
        if v is None:
            seed = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            v = self.cache[w] = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        return v

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i] += self.word(w.strip('".:').lower())
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-6)


def brute_text(texts: list[set[str]], query: set[str], k: int) -> list[int]:
    scores = [(len(query & t), i) for i, t in enumerate(texts)]
    hits = [s for s in scores if s[0]]
    hits.sort(key=lambda s: -s[0])
    return [i for _, i in hits[:k]]


def brute_vector(x: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    sims = x @ q
    top = np.argpartition(-sims, k)[:k]
    return [int(i) for i in top[np.argsort(-sims[top])]]


def rrf(*rankings: list[int], k: int) -> list[int]:
    scores: dict[int, float] = {}
    for r in rankings:
        for rank, i in enumerate(r):
            scores[i] = scores.get(i, 0.0) + 1.0 / (60 + rank + 1)
    return sorted(scores, key=lambda i: -scores[i])[:k]


def timed(fn: object, repeats: int) -> float:
    """Median wall time of `fn()`, ms."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def main(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    vocab = vocabulary(5000, rng)
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    zipf /= zipf.sum()
    embed = HashEmbedder()
    folder = Path(tempfile.mkdtemp(prefix="ltu-store-bench-"))
    store = Store(
        StoreConfig(path=folder / "bench.db", commit_interval_s=0.5, queue=1_000_000, max_mb=1e6, retention_days=365),
        lambda: embed,
    )
    store.start()
    texts: list[str] = []
    sets: list[set[str]] = []
    vectors: list[np.ndarray] = []
    wall_ends: list[float] = []
    # content words: three of ranks 50..5000 (the 50 most frequent act like stop words)
    queries = [" ".join(rng.choice(vocab[50:], size=3)) for _ in range(30)]
    qs = [set(q.split()) for q in queries]
    qv = [embed([q])[0] for q in queries]
    print(f"store in {folder}; 30 queries of 3 content words; k = 10; per-query medians in ms; 'x': brute / store")
    print(f"{'windows':>9} {'insert/s':>9} {'db MB':>7} | {'mode':<8} {'range':<6} {'store':>8} {'brute':>8} {'x':>7}")
    n = 0
    for size in args.sizes:
        words = rng.choice(len(vocab), size=(size - n, 20), p=zipf)
        batch = [" ".join(vocab[j] for j in row) for row in words]
        walls = [T0 + MONTH * i / args.sizes[-1] for i in range(n + 1, size + 1)]
        t = time.perf_counter()
        for i, (text, wall) in enumerate(zip(batch, walls, strict=True), n + 1):
            stream = f"s{i % 8}"
            store.put(
                WindowEvent(
                    stream=stream,
                    id=f"{stream}:w{i}",
                    start=0.0,
                    end=10.0,
                    wall_start=wall - 10,
                    wall_end=wall,
                    transcript=text,
                )
            )
        while store.stats()["queue"] or store.written < size:
            time.sleep(0.2)
        rate = (size - n) / (time.perf_counter() - t)
        texts += batch
        sets += [set(b.split()) for b in batch]
        vectors.append(embed(batch))
        wall_ends += walls
        n = size
        x = np.concatenate(vectors)
        ends = np.asarray(wall_ends)
        since = ends[-1] - 86400  # the last day: what a history question looks at by default
        day = np.flatnonzero(ends >= since)
        day_sets = [sets[i] for i in day]
        print(f"{size:>9,} {rate:>9,.0f} {store.size_bytes() / 2**20:>7,.0f} |")
        for mode in ("text", "vector", "combined"):
            for label, lo in (("all", None), ("24 h", since)):

                def run_store(mode: str = mode, lo: float | None = lo) -> None:
                    for q in queries:
                        store.search(q, mode=mode, since=lo, limit=10)  # type: ignore[arg-type]

                def run_brute(
                    mode: str = mode,
                    lo: float | None = lo,
                    x: np.ndarray = x,
                    sets: list[set[str]] = sets,
                    day: np.ndarray = day,
                    day_sets: list[set[str]] = day_sets,
                ) -> None:
                    xs, ss, idx = (x, sets, None) if lo is None else (x[day], day_sets, day)
                    for i in range(len(queries)):
                        if mode == "text":
                            r = brute_text(ss, qs[i], 10)
                        elif mode == "vector":
                            r = brute_vector(xs, qv[i], 10)
                        else:
                            r = rrf(brute_text(ss, qs[i], 50), brute_vector(xs, qv[i], 50), k=10)
                        _ = r if idx is None else [int(idx[j]) for j in r]

                t_store = timed(run_store, args.repeats) / len(queries)
                t_brute = timed(run_brute, args.repeats if mode == "vector" else 1) / len(queries)
                print(
                    f"{'':>9} {'':>9} {'':>7} | {mode:<8} {label:<6} {t_store:>8.2f} {t_brute:>8.2f} "
                    f"{t_brute / t_store:>6.1f}x",
                    flush=True,
                )
        # the store's full-text top hit contains as many query words as the brute force's best
        agree = sum(
            len(qs[i] & sets[int(store.search(q, mode="text", limit=1)[0][0].id.split(":w")[1]) - 1])
            == len(qs[i] & sets[brute_text(sets, qs[i], 1)[0]])
            for i, q in enumerate(queries)
        )
        print(f"{'':>9} {'':>9} {'':>7} | full-text top hit as good as the brute force's: {agree}/{len(queries)}")
    store.stop(60)
    if not args.no_minilm:
        from ltu_as.serving.embedding import Embedder

        minilm = Embedder()
        minilm(texts[:8])
        t = time.perf_counter()
        minilm(texts[:512])
        print(f"MiniLM (the real embedder) on this CPU: {512 / (time.perf_counter() - t):,.0f} windows/s")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-minilm", action="store_true")
    main(p.parse_args())
