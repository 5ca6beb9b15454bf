"""Device and dtype policy, decided in one place.

GPU: bf16 where the card supports it, else fp16 (the authors ran fp16). CPU: fp32 by default; bf16 on request
(fast on CPUs with AMX/AVX512-BF16). fp16 on CPU is refused: many CPU kernels lack it or are slow.
"""

from __future__ import annotations

import torch

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` → the first CUDA device if there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA device; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """`"auto"` → bf16/fp16 on GPU, fp32 on CPU. Accepts fp32, fp16, bf16 (or torch dtypes)."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, fp32, fp16, bf16")
        dtype = _NAMES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 is not supported on CPU; use fp32 or bf16")
    return dtype
