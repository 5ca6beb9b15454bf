"""LTU-AS ("Joint Audio and Speech Understanding", Gong et al., 2023) as a small, faithful library.

A frozen Whisper encoder's layer states → TLTR → projector → 25 audio tokens prepended to a stock LLaMA
(+ LoRA via peft) that reads the question and the Whisper transcript. No asyncio, no global state, no work at
import beyond importing torch and transformers.
"""

from .checkpoint import load_official_checkpoint, official_state_dict, save_official_checkpoint
from .config import LoraSettings, LtuAsConfig, trainable_parameter_counts
from .errors import CheckpointError, LtuAsError, ModelNotFoundError
from .generation import GenerationOptions
from .loading import LoadedModel, load_components, load_model
from .model import LtuAsForConditionalGeneration
from .processor import LtuAsProcessor
from . import testing  # tiny random models, public as ltu_as.testing

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
