"""How many decode lanes and threads the ASR should use on this machine (what `asr.lanes = 0` picks).

    .venv/bin/python bench/asr_lanes.py                 # tiny.en int8, beam 5, the 12 sentences of the bench script
    .venv/bin/python bench/asr_lanes.py --decodes 24

For each (lanes, threads per lane): one `WhisperModel` with `num_workers = lanes` (CTranslate2's inter_threads, the
weights shared) and `cpu_threads = threads`; `lanes` Python threads decode the sentences as fast as they can.
Reports decodes per second and the median time of one decode. Then, with two lanes, a final's decode time while the
other lane decodes partials back to back (what a final costs when a partial is running), against one lane where the
final waits for the partial in progress to finish first.

Everything runs in this process under the OpenMP settings of the ASR bench (`OMP_WAIT_POLICY=PASSIVE`); nothing
else should run meanwhile. Ratios against the one-lane, two-thread row are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from speech_audio import SCRIPT, conversation  # noqa: E402

from ltu_as.serving.transcribe import BUNDLED_TINY_EN, AsrOptions, load_asr, transcribe_detailed  # noqa: E402


def _clips() -> list[np.ndarray]:
    audio, placed = conversation(list(SCRIPT))
    return [audio[int(p.start_s * 16000) : int(p.end_s * 16000)] for p in placed]


def throughput(clips: list[np.ndarray], lanes: int, threads: int, decodes: int, o: AsrOptions) -> tuple[float, float]:
    """(decodes per second, median seconds of one decode) with `lanes` threads decoding back to back."""
    model = load_asr(BUNDLED_TINY_EN, "cpu", "int8", threads, num_workers=lanes)
    warm = [threading.Thread(target=transcribe_detailed, args=(model, clips[0], o)) for _ in range(lanes)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    took: list[float] = []
    lock = threading.Lock()
    left = iter(range(decodes))

    def lane() -> None:
        while True:
            with lock:
                i = next(left, None)
            if i is None:
                return
            t = time.perf_counter()
            transcribe_detailed(model, clips[i % len(clips)], o)
            with lock:
                took.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=lane) for _ in range(lanes)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return decodes / (time.perf_counter() - t0), statistics.median(took)


def final_beside_partials(clips: list[np.ndarray], threads: int, finals: int, o: AsrOptions) -> float:
    """Median seconds of a final's decode on one lane while the other decodes partials back to back."""
    model = load_asr(BUNDLED_TINY_EN, "cpu", "int8", threads, num_workers=2)
    transcribe_detailed(model, clips[0], o)
    stop = threading.Event()

    def partials() -> None:
        k = 0
        while not stop.is_set():
            transcribe_detailed(model, clips[k % len(clips)], o)
            k += 1

    p = threading.Thread(target=partials)
    p.start()
    time.sleep(0.3)
    took = []
    for i in range(finals):
        t = time.perf_counter()
        transcribe_detailed(model, clips[i % len(clips)], o)
        took.append(time.perf_counter() - t)
    stop.set()
    p.join()
    return statistics.median(took)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", type=int, default=16)
    ap.add_argument("--beam", type=int, default=5)
    args = ap.parse_args()
    o = AsrOptions(beam_size=args.beam, temperature=0.0, language="en", lead_silence_s=0.5)
    clips = _clips()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; tiny.en int8, beam {args.beam}; {args.decodes} decodes per row", flush=True)
    rows = []
    for lanes, threads in [(1, 2), (1, 1), (2, 1), (2, 2)]:
        rate, one = throughput(clips, lanes, threads, args.decodes, o)
        rows.append((lanes, threads, rate, one))
        print(f"lanes {lanes} x threads {threads}: {rate:.2f} decodes/s, one decode {one:.3f} s", flush=True)
    base = rows[0][2]
    beside = {t: final_beside_partials(clips, t, max(4, args.decodes // 2), o) for t in (1, 2)}
    alone = {t: one for lanes, t, _, one in rows if lanes == 1}
    print("\n| lanes x threads per lane | decodes/s | vs 1 x 2 | one decode, all lanes busy (s) |\n|---|---|---|---|")
    for lanes, threads, rate, one in rows:
        print(f"| {lanes} x {threads} | {rate:.2f} | {rate / base:.2f}x | {one:.3f} |")
    print("\n| threads per lane | a final alone, one lane (s) | a final beside a partial, two lanes (s) | "
          "a final behind a partial, one lane, on average (s) |\n|---|---|---|---|")  # fmt: skip
    for t in (1, 2):
        # on one lane a final that arrives while a partial decodes waits on average half a decode, then decodes
        print(f"| {t} | {alone[t]:.3f} | {beside[t]:.3f} | {alone[t] * 1.5:.3f} |")


if __name__ == "__main__":
    main()
