"""Understanding benchmark: questions through the daemon, in one run.

    .venv/bin/python bench/understanding.py                    # tiny random models (built once), CPU
    .venv/bin/python bench/understanding.py --checkpoint authors:ltuas_long_noqa_a6.bin --device cuda \
        --asr-model large-v2 --dtype bf16

1. Time to first token and tokens/s of a question under no load (scene descriptions off) and under a scene
   backlog (a window every second, long descriptions: the model is always behind). Ratio: backlog / no load.
2. N questions about one window asked at once (one batch, one shared prefill) against the same N asked one after
   another. Ratio: together / one by one (wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontend import ASSET, free_port  # noqa: E402 (after the sys.path setup above)

QUESTIONS = [
    "What can be inferred from the audio?",
    "Is anyone speaking?",
    "What did they say?",
    "Is there an alarm?",
    "What is the mood?",
    "Where is this?",
    "Is it loud?",
    "What happened?",
]


class Daemon:
    def __init__(self, args: argparse.Namespace, tmp: Path, extra: str) -> None:
        self.port = free_port()
        m = args
        cfg = tmp / f"u-{self.port}.toml"
        model = f'checkpoint = "{m.checkpoint}"\ndevice = "{m.device}"\ndtype = "{m.dtype}"\n'
        model += (f'whisper = "{m.whisper}"\n' if m.whisper else "") + (f'llm = "{m.llm}"\n' if m.llm else "")
        cfg.write_text(
            f'[server]\nport = {self.port}\n[model]\n{model}[asr]\nmodel = "{m.asr_model}"\n'
            f'device = "{m.asr_device}"\nbeam_size = 1\nmax_new_tokens = 24\n{extra}\n'
            f'[[streams]]\nname = "s"\nsource = "file"\npath = "{ASSET}"\nloop = true\n'
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "start", "--config", str(cfg)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"ws://127.0.0.1:{self.port}"
        while True:  # ready, and a window exists
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    h = json.loads(r.read())
                if h["ready"] and h["streams"]["s"]["windows"]:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the daemon exited; run it by hand with this config to see why")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def ask(url: str, question: str, n: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["-"]}}))
        await ws.recv()
        await ws.send(
            json.dumps(
                {"type": "ask", "id": 1, "question": question, "greedy": True, "max_new_tokens": n, "window": "s:w1"}
            )
        )
        batch = 0
        while True:
            e = json.loads(await ws.recv())
            if e["type"] == "answer.start":
                batch = e["batch"]
            if e["type"] in ("answer.done", "error"):
                return {**e, "batch": batch}


def summary(done: list[dict[str, Any]]) -> tuple[float, float]:
    ttft = statistics.median(d["timings"]["ttft_ms"] for d in done)
    rate = statistics.median(d["timings"]["tokens_per_s"] or 0 for d in done)
    return ttft, rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint"), p.add_argument("--whisper"), p.add_argument("--llm")
    p.add_argument("--device", default="cpu"), p.add_argument("--dtype", default="fp32")
    p.add_argument("--asr-model"), p.add_argument("--asr-device", default="cpu")
    p.add_argument("--tokens", type=int, default=32, help="answer length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-n", type=int, default=8, help="questions on one window")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.checkpoint is None:
        tiny = REPO / ".cache" / "demo" / "tiny"
        if not (tiny / "ltuas_tiny.bin").is_file():
            from ltu_as.testing import build_tiny_models

            build_tiny_models(tiny)
        args.checkpoint, args.whisper, args.llm = tiny / "ltuas_tiny.bin", tiny / "whisper", tiny / "llm"
        args.asr_model = args.asr_model or tiny / "whisper-ct2"
    print(f"checkpoint {args.checkpoint} on {args.device} ({args.dtype}); {args.tokens}-token answers, greedy")
    with tempfile.TemporaryDirectory() as tmp:
        idle = Daemon(args, Path(tmp), "[scene]\nenabled = false\n")
        run = asyncio.run
        try:
            base = [run(ask(idle.url, QUESTIONS[i % len(QUESTIONS)], args.tokens)) for i in range(args.repeats)]
            t0 = time.perf_counter()
            for q in QUESTIONS[: args.n]:
                run(ask(idle.url, q, args.tokens))
            one_by_one = time.perf_counter() - t0

            async def together() -> list[dict[str, Any]]:
                return await asyncio.gather(*(ask(idle.url, q, args.tokens) for q in QUESTIONS[: args.n]))

            t0 = time.perf_counter()
            batch = run(together())
            at_once = time.perf_counter() - t0
        finally:
            idle.stop()
        busy = Daemon(args, Path(tmp), "[windows]\nhop_s = 1.0\n[scene]\nmax_new_tokens = 1024\n")
        try:
            time.sleep(3)  # let the backlog build
            loaded = [
                asyncio.run(ask(busy.url, QUESTIONS[i % len(QUESTIONS)], args.tokens)) for i in range(args.repeats)
            ]
        finally:
            busy.stop()
    t_idle, r_idle = summary(base)
    t_busy, r_busy = summary(loaded)
    print(f"{'':24} {'TTFT ms':>9} {'tokens/s':>9}")
    print(f"{'no load':24} {t_idle:>9.1f} {r_idle:>9.1f}")
    print(f"{'scene backlog':24} {t_busy:>9.1f} {r_busy:>9.1f}")
    print(f"{'ratio backlog/no load':24} {t_busy / t_idle:>9.2f} {r_busy / max(r_idle, 1e-9):>9.2f}")
    print(
        f"{args.n} questions on one window: one by one {one_by_one * 1000:.0f} ms, together "
        f"{at_once * 1000:.0f} ms (batch sizes {sorted(d['batch'] for d in batch)}); "
        f"ratio together/one-by-one {at_once / one_by_one:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
