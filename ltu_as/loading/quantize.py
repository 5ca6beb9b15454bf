"""Weight-only quantization for inference: the LLM's linear layers (`model.quantization`) and, optionally, the
Whisper encoder's (`model.encoder_quantization`, int8 only).

Modes:

- `"none"`: the weights stay in the model's dtype.
- `"int8"`: per-output-channel symmetric int8 (torchao `Int8WeightOnlyConfig`; 1 byte per weight plus one scale
  per row). On CUDA the layers keep torchao's `Int8Tensor`. On CPU each layer then runs PyTorch's own CPU kernel
  `aten._weight_int8pack_mm` on torchao's int8 data and scales (bf16 activations): torchao 0.18's eager CPU path
  casts the whole int8 weight to the activation dtype on every call, 10–17× slower than the dense layer here
  (measured in `bench/quantization.py`), while the aten kernel reads the int8 bytes directly.
- `"int4"`: group-wise asymmetric int4 (groups of 128 input features, or fewer where a layer is narrower: 0.5
  byte per weight plus a bf16 scale and zero per group and row). CUDA: torchao `Int4WeightOnlyConfig` (tinygemm
  layout). CPU: torchao's `PrototypeInt4WeightOnlyConfig` (`_weight_int4pack_mm_for_cpu`), bf16 activations.

LoRA is merged into the base weights *before* quantizing (the deltas are then inside the quantized weights, and
peft's LoRA layers are gone from the decode path). Training never quantizes: it keeps the frozen LLM in bf16/fp32
(docs/training.md). The token embeddings and norms stay in the model's dtype; `lm_head` is quantized like every
other linear layer.

Precision on CPU: a quantized LLM computes in bf16, but the audio path (Whisper encoder, TLTR, projector) keeps
`model.dtype` (fp32 by default on CPU): on cores without native bf16 GEMM (AVX2 only) a real-dims encoder layer
over 500 positions takes 2.6 s in bf16 against 0.24 s in fp32. An int8 encoder on CPU runs the same int8 kernel
(bf16 inside, fp32 in and out): 0.28 s per layer, a quarter of the fp32 bytes. On a GPU the encoder's int8 saves
0.6 GiB of the 1.2 GiB bf16 encoder, which is where it pays (the 8 GB cards of `docs/performance.md`).
The int4 mode is not offered for the encoder: its 32 layer outputs all feed the TLTR, and int4's per-layer error
(≈10 %, against int8's 1 %) would reach the audio tokens from every layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "int4"]
MODES: tuple[Quantization, ...] = ("none", "int8", "int4")
ENCODER_MODES = ("none", "int8")
INT4_GROUP = 128


def int4_group(in_features: int) -> int:
    """The int4 group size for a layer with `in_features` inputs: 128, or the largest power of two ≥ 32 that
    divides a narrower layer (the CPU and CUDA kernels need one of 32, 64, 128, 256)."""
    for g in (INT4_GROUP, 64, 32):
        if in_features % g == 0:
            return g
    raise ValueError(f"int4 needs layers whose input width is a multiple of 32 (got {in_features})")


def compute_dtype(quantization: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype a quantized model runs in: the CPU int8/int4 kernels take bf16 activations, so a
    quantized model on CPU computes in bf16 whatever `model.dtype` says (the unquantized default there is fp32)."""
    if quantization != "none" and device.type == "cpu":
        return torch.bfloat16
    return dtype


Int8Kernel = Literal["torchao", "aten", "compiled"]


class CpuInt8Linear(nn.Module):
    """`y = x @ (q * s)ᵀ + b` with `q` `[out, in]` int8 and `s` `[out]` (torchao's per-row scales), the product
    computed by `aten._weight_int8pack_mm` in bf16 (PyTorch has it on CPU and CUDA). Inputs of any float dtype;
    the output has the input's dtype."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16).contiguous())
        # the bias keeps its dtype and is added in the input's dtype (fp32 for the encoder on CPU)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [tokens, in]
        y = torch.ops.aten._weight_int8pack_mm(rows, self.qdata, self.scale).to(x.dtype)  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only (aten)"


def _int8_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`x @ (q * s)ᵀ` for `x` `[tokens, in]`, `q` `[out, in]` int8, `s` `[out]`: written so that inductor can fuse
    the int8 → activation-dtype cast into the matmul's operand load (one read of the int8 bytes)."""
    return (x @ q.to(x.dtype).t()) * s


_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def compiled_int8_mm() -> Callable[..., torch.Tensor]:
    """`_int8_mm` through `torch.compile` (one compile per weight shape, the row count dynamic), made once."""
    if "mm" not in _compiled:
        _compiled["mm"] = torch.compile(_int8_mm, dynamic=True, mode="max-autotune-no-cudagraphs")
    return _compiled["mm"]


class CompiledInt8Linear(CpuInt8Linear):
    """`CpuInt8Linear`'s weights through `compiled_int8_mm` (activation dtype kept): a fused dequant + matmul on
    CUDA where inductor makes one, for a GPU where torchao's eager `Int8Tensor` casts the whole weight per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = compiled_int8_mm()(x.reshape(-1, shape[-1]), self.qdata, self.scale.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only (compiled)"


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The plain linear layers, without peft's LoRA factors (merged already, and unused once merged)."""
    return [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear and "lora_" not in n]


def quantize_linears(
    module: nn.Module, quantization: str, device: torch.device, int8_kernel: Int8Kernel | None = None
) -> int:
    """Quantize every `nn.Linear` of `module` in place (see the module docstring); returns how many.

    `int8_kernel` picks how an int8 layer multiplies: `"torchao"` (its `Int8Tensor`; the default on CUDA),
    `"aten"` (`aten._weight_int8pack_mm`; the default on CPU) or `"compiled"` (`CompiledInt8Linear`). The GPU
    check (`bench/gpu_check.py`) times all three against bf16 in one run.

    `module` must already be on `device` in its compute dtype (`compute_dtype`). Raises ValueError for an
    unknown mode or a layer the mode cannot take (naming `model.quantization`), ImportError without torchao.
    """
    if quantization not in MODES:
        raise ValueError(f"model.quantization must be one of {', '.join(MODES)}, not {quantization!r}")
    if quantization == "none":
        return 0
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:  # pragma: no cover - torchao is a core dependency
        raise ImportError("model.quantization needs torchao: pip install torchao") from e
    layers = _linears(module)
    if not layers:
        return 0
    if quantization == "int8":
        names = {n for n, _ in layers}
        quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn in names)
        kernel = int8_kernel or ("aten" if device.type == "cpu" else "torchao")
        if kernel not in ("torchao", "aten", "compiled"):
            raise ValueError(f"int8_kernel must be torchao, aten or compiled, not {kernel!r}")
        if kernel != "torchao":
            # torchao's Int8Tensor holds `qdata` [out, in] int8 and `scale` [out, 1]
            cls = CpuInt8Linear if kernel == "aten" else CompiledInt8Linear
            _swap(module, lambda lin: cls(lin.weight.qdata, lin.weight.scale, lin.bias))  # type: ignore[attr-defined]
        return len(layers)
    # int4: one config per group size (the narrowest layers of small models need groups under 128)
    groups: dict[int, set[str]] = {}
    for name, lin in layers:
        groups.setdefault(int4_group(lin.in_features), set()).add(name)
    for g, names in groups.items():
        config: Any
        if device.type == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            config = PrototypeInt4WeightOnlyConfig(group_size=g)
        else:
            config = Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")
        quantize_(module, config, filter_fn=lambda m, fqn, names=names: type(m) is nn.Linear and fqn in names)
    return len(layers)


def _swap(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for name, lin in _linears(module):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, make(lin))


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers hold, counting quantized tensors by their inner data (int8/int4
    values, scales, zeros) as allocated."""
    seen: set[int] = set()
    total = 0

    def count(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()  # a torchao tensor: count its inner tensors
            return sum(count(inner) for inner in (getattr(t, n) for n in names) if inner is not None)
        key = t.untyped_storage().data_ptr()
        if key in seen:  # tied weights count once
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    for t in list(module.parameters()) + list(module.buffers()):
        total += count(t)
    return total


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How far `other` `[..., vocab]` logits are from `reference` on the same inputs: the relative error
    ‖o − r‖/‖r‖, the share of positions whose argmax (greedy next token) agrees, and the mean KL(P_r ‖ P_o) of
    the next-token distributions, in nats."""
    r, o = reference.float().reshape(-1, reference.shape[-1]), other.float().reshape(-1, other.shape[-1])
    kl = torch.nn.functional.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none")
    return {
        "rel_error": float((o - r).norm() / r.norm()),
        "greedy_agreement": float((o.argmax(-1) == r.argmax(-1)).float().mean()),
        "mean_kl": float(kl.sum(-1).mean()),
    }
