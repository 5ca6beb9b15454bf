"""What the model needs in memory, before loading it: weights by precision, the ASR model, the decode engine's KV
slots and a workspace, against the device's free memory. `plan_memory` chooses the number of KV slots, or says
which setting to change when nothing fits (`ltu-daemon check --memory` prints the plan; the daemon refuses to start
on a plan that does not fit).

Weights are counted exactly, tensor by tensor, from the architecture built on the meta device (no memory used) with
the quantization rules of `ltu_as.loading.quantize`; tests compare them with what loading allocates. The ASR model
and the workspace are estimates (CTranslate2 allocates outside torch; activations depend on the batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..loading.quantize import compute_dtype, int4_group
from ..model.config import LtuAsConfig

GB = 1024**3
MB = 1024**2

# Parameters of faster-whisper's models by size name (CTranslate2 holds the encoder and the decoder).
ASR_PARAMS = {
    "tiny": 39e6,
    "base": 74e6,
    "small": 244e6,
    "medium": 769e6,
    "large": 1550e6,
    "distil-large": 756e6,
    "turbo": 809e6,
}
# CTranslate2 compute type → bytes per weight (int8_float16: int8 weights, fp16 activations)
ASR_BYTES = {"int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int16": 2}
ASR_OVERHEAD = 1.15  # CTranslate2's buffers and the decoder's cache for one batch, over the weights
CUDA_CONTEXT = 512 * MB  # the CUDA context, cuBLAS workspaces and the caching allocator's slack


def asr_params(model: str) -> float:
    """Parameters of a faster-whisper model given as a size name, hub id or CTranslate2 folder."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model.bin").is_file():
        return (path / "model.bin").stat().st_size / 2  # converted models store fp16 weights
    name = model.rsplit("/", 1)[-1].lower().removeprefix("faster-whisper-").removeprefix("bundled:")
    for key in sorted(ASR_PARAMS, key=len, reverse=True):
        if name.startswith(key) or f"-{key}" in name:
            return ASR_PARAMS[key]
    return ASR_PARAMS["large"]  # unknown: assume the largest


def asr_bytes(model: str, compute_type: str, device: str) -> int:
    """Estimated bytes of a faster-whisper model at `compute_type` ("default": int8 on CPU, fp16 on CUDA)."""
    ct = compute_type
    if ct in ("default", "auto"):
        ct = "float16" if device == "cuda" else "int8"
    per = next((b for k, b in ASR_BYTES.items() if ct.startswith(k)), 4)
    return int(asr_params(model) * per * ASR_OVERHEAD)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def llm_linear_bytes(out_features: int, in_features: int, quantization: str, dtype: torch.dtype, cuda: bool) -> int:
    """Bytes of one linear layer's weight (LLM or encoder) as `ltu_as.loading.quantize` stores it."""
    if quantization == "int8":  # int8 values + one scale per row (bf16 for the CPU kernel, fp32 in torchao's tensor)
        return out_features * in_features + out_features * (4 if cuda else 2)
    if quantization == "int4":  # two values per byte + a bf16 scale and zero per group and row
        return out_features * in_features // 2 + (in_features // int4_group(in_features)) * out_features * 2 * 2
    return out_features * in_features * _dtype_size(dtype)


def model_bytes(
    config: LtuAsConfig,
    quantization: str,
    dtype: torch.dtype,
    cuda: bool,
    *,
    llm_dtype: torch.dtype | None = None,
    encoder_quantization: str = "none",
) -> dict[str, int]:
    """Bytes of each part of the loaded model: `whisper_encoder` (its linears at `encoder_quantization`, the rest
    in `dtype`), `llm` (quantized linears, the rest in `llm_dtype`, default `dtype`), `lora` (its factors stay
    after merging, in `llm_dtype`) and `audio` (TLTR + projector, in `dtype`)."""
    from ..model.modeling import LtuAsForConditionalGeneration

    with torch.device("meta"):
        model = LtuAsForConditionalGeneration(config)
    llm_dtype = llm_dtype or dtype
    out = {"whisper_encoder": 0, "llm": 0, "lora": 0, "audio": 0}
    # weight name → (layer, its quantization)
    linears = {
        f"language_model.{n}.weight": (m, quantization)
        for n, m in model.language_model.named_modules()
        if type(m) is nn.Linear and "lora_" not in n
    }
    linears.update(
        (f"whisper_encoder.{n}.weight", (m, encoder_quantization))
        for n, m in model.whisper_encoder.named_modules()
        if type(m) is nn.Linear
    )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("whisper_encoder."):
            part, size = "whisper_encoder", _dtype_size(dtype)
        elif name.startswith(("audio_encoder.", "audio_proj.")):
            part, size = "audio", _dtype_size(dtype)
        else:
            part, size = ("lora" if "lora_" in name else "llm"), _dtype_size(llm_dtype)
        lin, mode = linears.get(name, (None, "none"))
        if lin is not None and mode != "none":
            out[part] += llm_linear_bytes(lin.out_features, lin.in_features, mode, llm_dtype, cuda)
        else:
            out[part] += t.numel() * (t.element_size() if not t.is_floating_point() else size)
    return out


def kv_slot_bytes(llm: dict[str, Any], max_positions: int, dtype: torch.dtype) -> int:
    """What one decode-engine slot allocates: K and V for `max_positions` + 1 positions (the static step's scratch
    column) over every layer, and its row of the repetition-penalty mask."""
    heads = int(llm["num_attention_heads"])
    kv_heads = int(llm.get("num_key_value_heads") or heads)
    head_dim = int(llm.get("head_dim") or int(llm["hidden_size"]) // heads)
    kv = 2 * int(llm["num_hidden_layers"]) * kv_heads * head_dim * (max_positions + 1) * _dtype_size(dtype)
    return kv + int(llm["vocab_size"])  # bool mask


def workspace_bytes(llm: dict[str, Any], slots: int, prefill_chunk: int, dtype: torch.dtype, cuda: bool) -> int:
    """An estimate of the activations of one step: a prefill chunk through one layer (hidden, q/k/v, the MLP's
    two intermediate tensors), the logits of every slot in fp32 (three copies in the sampling pipeline), plus the
    CUDA context on a GPU."""
    h, i, v = int(llm["hidden_size"]), int(llm["intermediate_size"]), int(llm["vocab_size"])
    act = prefill_chunk * (6 * h + 3 * i) * _dtype_size(dtype)
    logits = 3 * slots * v * 4 + prefill_chunk * v * 4
    return act + logits + (CUDA_CONTEXT if cuda else 0)


def free_bytes(device: torch.device) -> int:
    """Free memory of `device` now: `cudaMemGetInfo` on CUDA, MemAvailable (RAM the kernel can give without
    swapping) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class MemoryPlan:
    """The plan for one device. Sizes in bytes. `problem` is None when it fits, else what to change."""

    device: str
    available: int
    parts: dict[str, int]
    kv_per_slot: int
    slots: int
    max_positions: int
    workspace: int
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.problem is None

    @property
    def weights(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        return self.weights + self.workspace + self.slots * self.kv_per_slot

    def table(self) -> str:
        rows = [(name, b) for name, b in self.parts.items()]
        rows += [
            ("workspace (estimate)", self.workspace),
            (f"KV cache: {self.slots} slots × {self.max_positions} positions", self.slots * self.kv_per_slot),
            ("total", self.total),
            (f"free on {self.device}", self.available),
        ]
        lines = [f"{name:<48} {b / GB:8.2f} GiB" for name, b in rows]
        lines.append(f"{'KV per slot':<48} {self.kv_per_slot / MB:8.1f} MiB")
        lines += self.notes
        lines.append("fits" if self.fits else f"DOES NOT FIT: {self.problem}")
        return "\n".join(lines)


def plan_memory(
    config: LtuAsConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = "none",
    encoder_quantization: str = "none",
    slots: int | str = "auto",
    max_slots: int = 64,
    max_positions: int = 1024,
    memory_fraction: float = 0.5,
    prefill_chunk: int = 256,
    asr: tuple[str, str] | None = None,
    available: int | None = None,
    llm_local: bool = True,
) -> MemoryPlan:
    """The memory plan of the model (and the ASR model `asr` = (model, compute_type) when it shares the device).

    `available`: the bytes to plan against (default: `free_bytes(device)`). Slots ("auto"): `memory_fraction` of
    what is left after weights and workspace, at most `max_slots`; a fixed number must fit whole.
    `llm_local` False (`llm.backend = "vllm"`): only the token embeddings of the LLM are kept here, no KV slots.
    `dtype` is the model's (`model.dtype`); a quantized LLM on CPU computes in bf16 (`compute_dtype`) while the
    audio path keeps `dtype`.
    """
    cuda = device.type == "cuda"
    llm_dtype = compute_dtype(quantization, dtype, device)
    avail = free_bytes(device) if available is None else int(available)
    positions = min(max_positions, int(config.llm["max_position_embeddings"]))
    sizes = model_bytes(
        config, quantization, dtype, cuda, llm_dtype=llm_dtype, encoder_quantization=encoder_quantization
    )
    enc = encoder_quantization if encoder_quantization != "none" else str(dtype).removeprefix("torch.")
    parts = {
        f"Whisper encoder (features, {enc})": sizes["whisper_encoder"],
        "TLTR + projector": sizes["audio"],
    }
    if llm_local:
        llm_kind = quantization if quantization != "none" else str(llm_dtype).removeprefix("torch.")
        parts[f"LLM weights ({llm_kind})"] = sizes["llm"]
        parts["LoRA factors"] = sizes["lora"]
    else:
        parts["LLM token embeddings (the LLM runs on vLLM)"] = (
            int(config.llm["vocab_size"]) * config.d_llm * (_dtype_size(dtype))
        )
    if asr is not None:
        parts[f"ASR {asr[0]} ({asr[1]}, estimate)"] = asr_bytes(asr[0], asr[1], device.type)
    per_slot = kv_slot_bytes(config.llm, positions, llm_dtype) if llm_local else 0
    plan = MemoryPlan(str(device), avail, parts, per_slot, 0, positions, 0)
    if not llm_local:
        plan.workspace = CUDA_CONTEXT if cuda else 0
        if plan.total > avail:
            plan.problem = _advice(plan, quantization, encoder_quantization, kv=False, local=False)
        return plan
    want = max_slots if slots == "auto" else int(slots)
    plan.workspace = workspace_bytes(config.llm, want, prefill_chunk, llm_dtype, cuda)
    left = avail - plan.weights - plan.workspace
    if slots == "auto":
        plan.slots = max(0, min(max_slots, int(left * memory_fraction) // per_slot)) if left > 0 else 0
        plan.notes.append(f"slots: {memory_fraction:g} of what is left after weights (engine.memory_fraction)")
    else:
        plan.slots = int(slots)
    if cuda and quantization != "none":
        # issue 22: torchao 0.18's eager CUDA int8 casts each whole weight to bf16 per call; int4 is tinygemm
        plan.notes.append(
            f"{quantization} on CUDA is for memory: its decode speed against bf16 is not measured yet (no GPU run); "
            "bench/gpu_check.sh times it, and model.int8_kernel picks the int8 kernel"
        )
    if left <= 0:
        plan.problem = _advice(plan, quantization, encoder_quantization, kv=False, local=True)
    elif plan.slots < 1 or plan.total > avail:
        plan.problem = _advice(plan, quantization, encoder_quantization, kv=True, local=True)
    return plan


def _advice(plan: MemoryPlan, quantization: str, encoder_quantization: str, *, kv: bool, local: bool) -> str:
    need = plan.weights + plan.workspace + (plan.kv_per_slot if kv else 0)
    short = f"{need / GB:.2f} GiB needed{' with one KV slot' if kv else ''}, {plan.available / GB:.2f} GiB free"
    tips = []
    if kv:
        tips.append("lower engine.max_positions or engine.slots (each slot holds its KV)")
    if local and quantization == "none":
        tips.append('set model.quantization = "int8" (LLM weights ÷2 from bf16) or "int4" (÷4)')
    elif local and quantization == "int8":
        tips.append('set model.quantization = "int4"')
    if encoder_quantization == "none":
        tips.append('set model.encoder_quantization = "int8" (the Whisper encoder ÷2 from bf16)')
    if any(k.startswith("ASR") for k in plan.parts):
        tips.append('use a smaller asr.model or asr.compute_type = "int8"')
    tips.append(
        'or run the LLM elsewhere: llm.backend = "vllm" (docs/scale.md)'
        + (', or model.device = "cpu"' if plan.device.startswith("cuda") else "")
    )
    return f"{short} on {plan.device}: " + "; ".join(tips)
