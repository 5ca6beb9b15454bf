"""LTU-AS ("Joint Audio and Speech Understanding", Gong et al., 2023) as a small, faithful library.

A frozen Whisper encoder's layer states → TLTR → projector → 25 audio tokens prepended to a stock LLaMA
(+ LoRA via peft) that reads the question and the Whisper transcript. No asyncio, no global state, no work at
import: each public name loads its module on first use.

Subpackages: `model` (config, audio, encoder, TLTR, the model, processor, prompt, decoding), `loading` (sources,
checkpoints, precision, assembling a model), `serving` (one-shot pipeline, faster-whisper transcripts) and
`training` (Open-ASQA data, feature store, curriculum trainer, evaluation). The arrows point one way:
model ← loading ← serving / training.
"""

import importlib
from typing import Any

# Public names → the module that holds them. Loaded on first use (PEP 562), so that light users such as the
# daemon's ASR front end (`ltu_as.transcribe`) do not pay for importing torch and transformers.
_EXPORTS = {
    "CheckpointError": "errors",
    "LtuAsError": "errors",
    "ModelNotFoundError": "errors",
    # the model: architecture, math, prompt and decoding
    "LoraSettings": "model.config",
    "LtuAsConfig": "model.config",
    "trainable_parameter_counts": "model.config",
    "GenerationOptions": "model.generation",
    "LtuAsForConditionalGeneration": "model.modeling",
    "LtuAsProcessor": "model.processor",
    # loading: sources, checkpoints in both layouts, precision
    "load_official_checkpoint": "loading.checkpoint",
    "official_state_dict": "loading.checkpoint",
    "save_official_checkpoint": "loading.checkpoint",
    "LoadedModel": "loading.load",
    "load_components": "loading.load",
    "load_model": "loading.load",
    "load_pretrained": "loading.load",
    "load_trainable": "loading.load",
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
    "load_pretrained",
    "load_trainable",
    "official_state_dict",
    "save_official_checkpoint",
    "testing",
    "trainable_parameter_counts",
]
