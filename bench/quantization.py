"""Quantized LLM weights at the real LTU-AS LLM dims (Vicuna-7B: 32 layers, d 4096, MLP 11008, vocab 32000),
random weights (N(0, 0.02), built on the device), against bf16 on the same inputs, in one run:

1. each linear shape alone: relative output error of int8 and int4 against bf16, and its time per call at one row
   (the decode case), with the dense bf16 and fp32 layers and torchao's own eager int8 path as baselines;
2. the whole model: relative error of the logits, greedy agreement and mean KL of the next-token distributions over
   fixed prompts (teacher-forced), int8 and int4 against bf16;
3. decode speed of the engine at batch 1, ms/token, for bf16, int8 and int4 (and HF `generate` eager bf16);
4. the Whisper large encoder (32 layers, d 1280, 500 positions = one 10 s window, random weights) in the audio
   path's dtype (fp32 on CPU, bf16 on CUDA), against int8 (`model.encoder_quantization`): the relative error of
   each of the 32 pooled layer outputs the TLTR reads, the weights and the time of one window's features; on CPU
   also the encoder in bf16, the precision the whole model had when quantized before the audio path kept fp32.

    .venv/bin/python bench/quantization.py                   # here: all 32 layers, ~10 min, ~14 GB RAM at peak
    .venv/bin/python bench/quantization.py --layers 4        # quicker; error and ms/token of 4 real-dims layers
    .venv/bin/python bench/quantization.py --encoder-only    # only part 4 (~2 min here)
    python bench/quantization.py --device cuda               # GPU: int4 through torchao's CUDA kernels

Random weights are a stand-in: real LLM weights have outlier channels (which per-row int8 scales absorb) and are
not Gaussian, so real-model agreement is usually higher than here for int8 and can be lower for int4 without
calibration. The relative errors per layer are what carries over. `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine import build_llm, decode_rate, hf_rate, sync  # noqa: E402

from ltu_as.loading.quantize import compare_logits, quantize_linears, weight_bytes  # noqa: E402
from ltu_as.logs import quiet_imports  # noqa: E402

SHAPES = {
    "q/k/v/o_proj": (4096, 4096),
    "gate/up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
    "lm_head": (32000, 4096),
}


def timed(f: Any, x: torch.Tensor, device: torch.device, n: int = 20) -> float:
    f(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        f(x)
    sync(device)
    return (time.perf_counter() - t0) / n * 1000


def layers_alone(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=g) * 0.02).to(device, torch.bfloat16)
        x = torch.randn(16, k, generator=g).to(device, torch.bfloat16)
        x1 = x[:1]
        ref = x @ w.T
        entry: dict[str, Any] = {"bf16_ms": round(timed(lambda a, w=w: a @ w.T, x1, device), 3)}
        if device.type == "cpu":
            w32 = w.float()
            entry["fp32_ms"] = round(timed(lambda a, w32=w32: a @ w32.T, x1.float(), device), 3)
        for mode in ("int8", "int4"):
            lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(w)
            holder = nn.Sequential(lin)
            try:
                quantize_linears(holder, mode, device)
                with torch.no_grad():
                    entry[f"{mode}_rel_error"] = round(compare_logits(ref, holder(x))["rel_error"], 4)
                    entry[f"{mode}_ms"] = round(timed(holder, x1, device), 3)
            except Exception as e:  # a kernel this device lacks: say so, go on
                entry[f"{mode}_rel_error"] = f"failed: {type(e).__name__}: {e}"[:160]
        if device.type == "cpu":  # torchao's own eager int8 path, which ltu_as replaces on CPU
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(w)
            quantize_(lin, Int8WeightOnlyConfig())
            with torch.no_grad():
                entry["torchao_eager_int8_ms"] = round(timed(lin, x1, device, n=5), 3)
        out[name] = entry
        print(f"{name}: {entry}", flush=True)
    return out


def encoder(device: torch.device, layers: int | None = None) -> dict[str, Any]:
    """Part 4: the Whisper encoder's features, int8 against the audio path's dtype (`layers`: fewer than large's
    32, at its real dims, for a dry run)."""
    import copy

    from ltu_as.model.config import LtuAsConfig
    from ltu_as.model.encoder import build_whisper_encoder, pooled_layer_states

    cfg = LtuAsConfig()
    if layers is not None:
        cfg.whisper["encoder_layers"] = layers
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    enc = build_whisper_encoder(cfg.whisper, cfg.n_positions).to(device, dtype)
    mel = torch.randn(1, cfg.n_mels, cfg.n_frames, generator=torch.Generator().manual_seed(2)).to(device)

    def features(e: nn.Module, dt: torch.dtype) -> tuple[torch.Tensor, float]:
        pooled_layer_states(e, mel[:, :, :200].to(dt).repeat(1, 1, 5), cfg.pool)  # warm-up
        sync(device)
        t = time.perf_counter()
        f = pooled_layer_states(e, mel.to(dt), cfg.pool)
        sync(device)
        return f.float(), time.perf_counter() - t

    ref, ref_s = features(enc, dtype)
    out: dict[str, Any] = {
        str(dtype).removeprefix("torch."): {"weights_GB": round(weight_bytes(enc) / 1e9, 2), "s_per_window": ref_s}
    }
    variants: list[tuple[str, nn.Module, torch.dtype]] = []
    if device.type == "cpu":
        variants.append(("bfloat16", copy.deepcopy(enc).to(torch.bfloat16), torch.bfloat16))
    q = copy.deepcopy(enc)
    quantize_linears(q, "int8", device)
    variants.append(("int8", q, dtype))
    del enc
    for name, e, dt in variants:
        got, s = features(e, dt)
        errors = [compare_logits(ref[:, i], got[:, i])["rel_error"] for i in range(ref.shape[1])]
        out[name] = {
            "weights_GB": round(weight_bytes(e) / 1e9, 2),
            "s_per_window": round(s, 2),
            "rel_error_first_layer": round(errors[0], 4),
            "rel_error_last_layer": round(errors[-1], 4),
            "rel_error_max": round(max(errors), 4),
        }
        print(f"encoder {name}: {out[name]}", flush=True)
        del e
        gc.collect()
    out[str(dtype).removeprefix("torch.")]["s_per_window"] = round(ref_s, 2)
    return out


def prompts(n: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(100, 31000, (n, length), generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=5, help="decode steps timed")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--encoder-only", action="store_true", help="only the Whisper encoder (part 4)")
    a = ap.parse_args()
    quiet_imports()
    torch.set_grad_enabled(False)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    out["threads"] = torch.get_num_threads()
    out["encoder"] = encoder(device)
    if a.encoder_only:
        print(json.dumps(out, indent=2))
        if a.json:
            a.json.write_text(json.dumps(out, indent=2))
        return
    out["layers_alone"] = layers_alone(device)
    ids = prompts(a.prompts, a.length).to(device)
    out["layers"] = a.layers
    whole: dict[str, Any] = {}
    reference = None
    for mode in ("none", "int8", "int4"):
        t = time.perf_counter()
        llm = build_llm(device, torch.bfloat16, a.layers)  # same seed: the same weights every time
        build_s = time.perf_counter() - t
        if mode != "none":
            t = time.perf_counter()
            try:
                quantize_linears(llm, mode, device)
            except Exception as e:
                whole[mode] = {"failed": f"{type(e).__name__}: {e}"[:200]}
                del llm
                gc.collect()
                continue
            build_s = time.perf_counter() - t
        entry: dict[str, Any] = {"weights_GB": round(weight_bytes(llm) / 1e9, 2), "prepare_s": round(build_s, 1)}
        logits = llm(ids).logits.float()
        if reference is None:
            reference = logits
        else:
            entry |= {k: round(v, 4) for k, v in compare_logits(reference, logits).items()}
        del logits
        entry["decode_ms_per_token"] = round(decode_rate(llm, 1, a.tokens, device) * 1000, 1)
        if mode == "none":
            entry["hf_eager_ms_per_token"] = round(hf_rate(llm, 1, a.tokens, device) * 1000, 1)
        whole[mode] = entry
        print(f"{mode}: {entry}", flush=True)
        del llm
        gc.collect()
    out["whole_model"] = whole
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
