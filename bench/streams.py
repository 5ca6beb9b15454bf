"""How many microphones one engine keeps real time: N simulated streams, each bringing a window every 10 s that
gets a ~40-token scene description, plus a steady question load about recent windows, all through one
`DecodeEngine` in one running batch (the daemon's model worker loop, without the websocket around it).

    python bench/streams.py --device cuda                        # GPU: real LTU-AS LLM dims, bf16, 32 layers
    .venv/bin/python bench/streams.py                            # here: the tiny model's dims, CPU (machinery)

For each N of a ladder it runs `--windows` windows per stream in real time (stream starts spread over the first
window), and reports the scene lag (window arrival → its description done; real time = under one window, 10 s),
question TTFT p50/p95 and tokens/s. The headline: the largest N with every scene lag under 10 s and question TTFT
p95 under 100 ms. Each window's audio tokens are random embeddings (no encoder in the loop: its cost is measured
separately by `bench/understanding.py`); every question is about a stream's newest window, so its prefix KV is
usually cached. EOS is disabled so every row runs to its token count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine import build_llm, sync  # noqa: E402

from ltu_as.model.generation import GenerationOptions  # noqa: E402
from ltu_as.serving.engine import QUESTION, SCENE, DecodeEngine, Request, auto_slots  # noqa: E402

HEADER = [1, 835, 2799, 4080, 29901, 13]


def tiny_llm(device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).to(device).eval().requires_grad_(False)


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    return [*(h % vocab for h in HEADER), *[(131 * seed + 17 * k) % (vocab - 100) + 50 for k in range(n)]]


class AsrLoad:
    """Speech on every stream, decoded on the device the engine uses: each stream ends an utterance (`clip`) every
    `every_s` seconds (streams staggered), and one thread decodes the due finals in batches of up to `max_batch`
    (the daemon's batched finals, `transcribe_batch`), oldest first. A final's latency runs from its utterance's
    end to its text; the load keeps up while p95 latency stays under `bound_s`. Decoding stops `4 × bound_s` after
    the last utterance's end: what is left then is counted (`asr_unfinished`), not waited for, so an overloaded
    ASR cannot hold the trial (or the GPU check's time budget) for minutes."""

    def __init__(
        self, model: Any, clip: Any, every_s: float, options: Any, max_batch: int = 16, bound_s: float = 2.0
    ) -> None:
        self.model, self.clip, self.every, self.options = model, clip, every_s, options
        self.max_batch, self.bound = max_batch, bound_s
        self.latencies: list[float] = []
        self.unfinished = 0
        self.batches = 0
        self.busy_s = 0.0
        self.error: str | None = None

    def run(self, n: int, t0: float, until: float) -> threading.Thread:
        """Decode the finals of `n` streams whose utterances end before `until` (seconds after `t0`)."""
        from ltu_as.serving.transcribe import transcribe_batch

        ends = sorted(
            s * self.every / n + k * self.every for s in range(n) for k in range(1, int(until / self.every) + 2)
        )
        ends = [e for e in ends if e <= until]

        give_up = until + 4 * self.bound

        def loop() -> None:
            i = 0
            try:
                while i < len(ends):
                    now = time.perf_counter() - t0
                    if now > give_up:
                        self.unfinished = len(ends) - i
                        return
                    due = [e for e in ends[i : i + self.max_batch] if e <= now]
                    if not due:
                        time.sleep(min(0.01, max(0.0, ends[i] - now)))
                        continue
                    a = time.perf_counter()
                    transcribe_batch(self.model, [self.clip] * len(due), self.options)
                    b = time.perf_counter()
                    self.busy_s += b - a
                    self.batches += 1
                    self.latencies += [b - t0 - e for e in due]
                    i += len(due)
            except Exception as e:  # reported in the trial's figures
                self.error = f"{type(e).__name__}: {e}"[:200]

        t = threading.Thread(target=loop, name="asr-load", daemon=True)
        t.start()
        return t

    def figures(self, wall: float) -> dict[str, Any]:
        xs = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

        return {
            "asr_finals": len(xs),
            "asr_batches": self.batches,
            "asr_final_p50_s": pct(0.5),
            "asr_final_p95_s": pct(0.95),
            "asr_busy": round(self.busy_s / wall, 2) if wall else None,
            "asr_unfinished": self.unfinished,
            "asr_keeps_up": bool(xs) and self.error is None and not self.unfinished and (pct(0.95) or 0.0) < self.bound,
            "asr_error": self.error,
        }


def trial(
    llm: Any, n: int, args: argparse.Namespace, device: torch.device, asr: AsrLoad | None = None
) -> dict[str, Any]:
    """N streams for `args.windows` windows each, in real time; scene lags, question TTFTs (and with `asr`, every
    stream's speech decoded on the same device at the same time)."""
    vocab, d = llm.config.vocab_size, llm.config.hidden_size
    p = next(llm.parameters())
    # a scene and a few questions per stream at most; never more KV than 80 % of the free memory holds
    fits = auto_slots(llm.config, 256, p.dtype, p.device, 0.8)
    slots = args.slots or min(2 * n + 16, fits)
    e = DecodeEngine(llm, slots=slots, max_positions=256, eos_token_id=-1, prefill_chunk=args.prefill_chunk)
    e.warm()  # every graph bucket before the clock starts (a capture mid-trial would read as lag)
    scene_opts = GenerationOptions(max_new_tokens=args.scene_tokens).greedy()
    q_opts = GenerationOptions(max_new_tokens=args.answer_tokens).greedy()
    audio = [(0.02 * torch.randn(25, d)).to(p.device, p.dtype) for _ in range(n)]  # one per stream, reused

    def about(stream: int, window: int, ids: list[int], options: GenerationOptions, priority: int) -> Request:
        """A row about a stream's window: its audio tokens and the template's start are the shared prefix."""
        key = (stream, window)
        return Request(ids, options, prefix_embeds=audio[stream], prefix_key=key, shared=len(HEADER), priority=priority)

    period = args.period
    arrivals = sorted((s * period / n + k * period, s, k) for s in range(n) for k in range(args.windows))
    q_every = 1.0 / args.question_rate if args.question_rate > 0 else float("inf")
    lags: list[float] = []
    ttfts: list[float] = []
    submitted: dict[Any, tuple[str, float]] = {}
    latest: dict[int, int] = {}
    answered: set[Any] = set()
    i_arrival, next_q, q_seq, tokens = 0, q_every / 2, 0, 0
    end_of_arrivals = arrivals[-1][0]
    sync(device)
    t0 = time.perf_counter()
    speech = asr.run(n, t0, end_of_arrivals + period) if asr is not None else None
    while True:
        now = time.perf_counter() - t0
        while i_arrival < len(arrivals) and arrivals[i_arrival][0] <= now:
            at, s, k = arrivals[i_arrival]
            latest[s] = k
            row = e.submit(about(s, k, prompt(s * 1000 + k, 30, vocab), scene_opts, SCENE))
            submitted[row] = ("scene", at)
            i_arrival += 1
        while next_q <= now and next_q <= end_of_arrivals:
            s = q_seq % n
            k = latest.get(s)
            if k is not None:
                row = e.submit(about(s, k, prompt(q_seq, 20, vocab), q_opts, QUESTION))
                submitted[row] = ("question", next_q)
            q_seq += 1
            next_q += q_every
        if not e.has_work():
            if i_arrival >= len(arrivals):
                break
            time.sleep(min(0.005, max(0.0, arrivals[i_arrival][0] - now)))
            continue
        outputs = e.step()
        done_at = time.perf_counter() - t0
        for o in outputs:
            kind, at = submitted[o.row]
            tokens += o.token is not None
            if kind == "question" and o.token is not None and o.row not in answered:
                answered.add(o.row)
                ttfts.append(done_at - at)
            if kind == "scene" and o.finished:
                lags.append(done_at - at)
    if speech is not None:
        speech.join()
    wall = time.perf_counter() - t0
    lags.sort()
    ttfts.sort()

    def pct(xs: list[float], q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else float("nan")

    return {
        "streams": n,
        "slots": slots,
        "scenes": len(lags),
        "scene_lag_p50_s": round(statistics.median(lags), 3) if lags else None,
        "scene_lag_max_s": round(max(lags), 3) if lags else None,
        "questions": len(ttfts),
        "ttft_p50_ms": pct(ttfts, 0.5),
        "ttft_p95_ms": pct(ttfts, 0.95),
        "tokens_per_s": round(tokens / wall),
        "preempted": e.counts["preempted"],
        "prefix_hits": e.counts["prefix_hits"],
        "real_time": bool(lags) and max(lags) < period and len(lags) == n * args.windows,
        "ttft_ok": not ttfts or pct(ttfts, 0.95) < args.ttft_ms,
        "graphs": e.counts["graphs"],
        "late_captures": e.counts["late_captures"],
        **(asr.figures(wall) if asr is not None else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dims", choices=["real", "tiny"], default=None, help="default: real on CUDA, tiny on CPU")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ladder", default=None, help="stream counts (default: 32,64,128,192,256 GPU; 1,4,16 CPU)")
    ap.add_argument("--windows", type=int, default=3, help="windows per stream in each trial")
    ap.add_argument("--period", type=float, default=10.0, help="seconds between a stream's windows")
    ap.add_argument("--scene-tokens", type=int, default=40)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--question-rate", type=float, default=2.0, help="questions per second, all streams together")
    ap.add_argument("--ttft-ms", type=float, default=100.0)
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    dims = a.dims or ("real" if gpu else "tiny")
    ladder = [int(x) for x in (a.ladder or ("32,64,128,192,256" if gpu else "1,4,16")).split(",")]
    torch.set_grad_enabled(False)
    llm = build_llm(device, torch.bfloat16, a.layers) if dims == "real" else tiny_llm(device)
    results = []
    best = 0
    for n in ladder:
        r = trial(llm, n, a, device)
        if gpu:  # give the trial's KV back to the device, so the next trial's auto sizing sees it free
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
        if r["real_time"] and r["ttft_ok"]:
            best = max(best, n)
        elif best:  # past the knee: larger N will not do better
            break
    out = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "dims": dims,
        "layers": llm.config.num_hidden_layers,
        "largest_real_time_streams": best,
        "trials": results,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "trials"}))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
