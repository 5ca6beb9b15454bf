"""Logging set-up shared by the command-line programs (the library itself configures no logging)."""

from __future__ import annotations

import logging


def quiet_imports() -> None:
    """Silence expected import-time warnings: torchao (imported by peft when installed) says its CUDA-only kernels
    do not load on a CPU build, and torch's pytree that torchao registers enums the old way."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
