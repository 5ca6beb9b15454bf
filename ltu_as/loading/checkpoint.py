"""The authors' checkpoint format (`*.bin`, reference section 5), mapped in this one place.

A released checkpoint is a `torch.save`d dict of the trainable tensors of their PEFT-wrapped model:

    base_model.model.model.audio_encoder.{time_tr,layer_tr}...   → audio_encoder....
    base_model.model.model.audio_proj.1.{weight,bias}            → audio_proj.1....
    base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}[.default].weight
                                                                 → language_model.base_model.model.model.layers....

Older and newer PEFT versions omit or add the adapter name (`.default`); both load. Loading is strict: every
expected tensor must be present with the right shape, and nothing may be left over.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..model.modeling import LtuAsForConditionalGeneration

OFFICIAL_PREFIX = "base_model.model.model."
_LORA = re.compile(r"^(layers\.\d+\.self_attn\.\w+\.lora_[AB])\.(?:(\w+)\.)?weight$")


def official_to_ours(key: str, adapter: str = "default") -> str | None:
    """Our state-dict name for an official key, or None when the key is not one the format defines."""
    if not key.startswith(OFFICIAL_PREFIX):
        return None
    rest = key[len(OFFICIAL_PREFIX) :]
    if rest.startswith(("audio_encoder.", "audio_proj.")):
        return rest
    m = _LORA.match(rest)
    if m and m.group(2) in (None, adapter):
        return f"language_model.base_model.model.model.{m.group(1)}.{adapter}.weight"
    return None


def ours_to_official(key: str, adapter: str = "default", with_adapter_name: bool = True) -> str:
    """The official name of one of our trainable tensors (inverse of `official_to_ours`)."""
    if key.startswith(("audio_encoder.", "audio_proj.")):
        return OFFICIAL_PREFIX + key
    prefix = "language_model.base_model.model.model."
    if not key.startswith(prefix):
        raise ValueError(f"{key} is not a trainable LTU-AS tensor")
    rest = key[len(prefix) :]
    if not with_adapter_name:
        rest = rest.replace(f".{adapter}.weight", ".weight")
    return OFFICIAL_PREFIX + rest


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an authors'-layout `.bin` (a `torch.save`d dict of tensors) without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}. The file is truncated or not a torch checkpoint; "
            "delete it and download it again"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a dict of tensors (got {type(state).__name__})")
    return state


def load_official_checkpoint(model: LtuAsForConditionalGeneration, path: str | Path) -> dict[str, int]:
    """Load the authors' released LTU-AS checkpoint into `model`.

    Raises `CheckpointError` listing missing, unexpected and mis-shaped tensors (nothing is changed then).
    Returns counts of what was loaded: {"tensors": n, "parameters": n}.
    """
    state = read_official_checkpoint(path)
    expected = model.trainable_state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmappable: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = official_to_ours(key)
        if ours is None or ours in mapped:
            unmappable[key] = value
        else:
            mapped[ours] = value
    report_mismatch(str(path), expected, {**mapped, **unmappable})
    with torch.no_grad():
        for key, value in mapped.items():
            expected[key].copy_(value)
    return {"tensors": len(mapped), "parameters": sum(v.numel() for v in mapped.values())}


def official_state_dict(
    model: LtuAsForConditionalGeneration, with_adapter_name: bool = True
) -> dict[str, torch.Tensor]:
    """The trainable tensors under the authors' names, float32 on CPU (what `torch.save` writes for a `.bin`)."""
    return {
        ours_to_official(k, with_adapter_name=with_adapter_name): v.detach().to("cpu", torch.float32).clone()
        for k, v in model.trainable_state_dict().items()
    }


def save_official_checkpoint(model: LtuAsForConditionalGeneration, path: str | Path) -> Path:
    """Export the trainable tensors in the authors' `.bin` layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state_dict(model), path)
    return path


def report_mismatch(source: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Raise `CheckpointError` listing missing, unexpected and mis-shaped tensors; return if they all match."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = sorted(
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or bad:

        def show(items: list[str]) -> str:
            more = f" … and {len(items) - 10} more" if len(items) > 10 else ""
            return ("\n    " + "\n    ".join(items[:10]) + more) if items else " none"

        raise CheckpointError(
            f"{source} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(bad)} mis-shaped tensors.\n  missing:{show(missing)}\n  unexpected:{show(unexpected)}\n"
            f"  mis-shaped:{show(bad)}\n"
            "Check that the checkpoint was trained for this configuration (dims, LoRA rank, LLM size)."
        )
