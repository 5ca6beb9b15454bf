"""LTU-AS ("Joint Audio and Speech Understanding", Gong et al., 2023) as a small, faithful library.

A frozen Whisper encoder's layer states → TLTR → projector → 25 audio tokens prepended to a stock LLaMA
(+ LoRA via peft) that reads the question and the Whisper transcript. No asyncio, no global state, no work at
import: each public name loads its module on first use.
"""

import importlib
from typing import Any

# Public names → the module that holds them. Loaded on first use (PEP 562), so that light users such as the
# daemon's ASR front end (`ltu_as.transcribe`) do not pay for importing torch and transformers.
_EXPORTS = {
    "load_official_checkpoint": "checkpoint", "official_state_dict": "checkpoint",
    "save_official_checkpoint": "checkpoint",
    "LoraSettings": "config", "LtuAsConfig": "config", "trainable_parameter_counts": "config",
    "CheckpointError": "errors", "LtuAsError": "errors", "ModelNotFoundError": "errors",
    "GenerationOptions": "generation",
    "LoadedModel": "loading", "load_components": "loading", "load_model": "loading",
    "LtuAsForConditionalGeneration": "model",
    "LtuAsProcessor": "processor",
}


def __getattr__(name: str) -> Any:
    if name == "testing":  # tiny random models, public as ltu_as.testing
        return importlib.import_module(".testing", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "GenerationOptions",
    "LoadedModel",
    "LoraSettings",
    "LtuAsConfig",
    "LtuAsError",
    "LtuAsForConditionalGeneration",
    "LtuAsProcessor",
    "ModelNotFoundError",
    "load_components",
    "load_model",
    "load_official_checkpoint",
    "official_state_dict",
    "save_official_checkpoint",
    "testing",
    "trainable_parameter_counts",
]
