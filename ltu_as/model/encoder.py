"""The frozen Whisper feature encoder: a stock `transformers` `WhisperEncoder` cut to 10 s.

LTU-AS runs Whisper large-v1 on a 1000-frame mel, so the stride-2 conv gives 500 positions and the positional
embedding is `embed_positions[:500]`. The stock encoder refuses inputs that are not `2 * max_source_positions`
frames, so it is built with `max_source_positions = n_frames // 2` and loaded with the first rows of
`embed_positions` (padding the mel to 3000 frames instead would let attention see the padding).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)

_ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def whisper_encoder_config(whisper: dict[str, Any], n_positions: int) -> WhisperConfig:
    """A `WhisperConfig` for the encoder with `max_source_positions = n_positions` (500 for 10 s)."""
    cfg = WhisperConfig(**{**whisper, "max_source_positions": n_positions})
    # Inference only, and the reference has no dropout in the frozen encoder.
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.0
    cfg.encoder_layerdrop = 0.0
    return cfg


def build_whisper_encoder(whisper: dict[str, Any], n_positions: int) -> WhisperEncoder:
    """A randomly initialised stock `WhisperEncoder` with the given dims, frozen, in eval mode."""
    encoder = WhisperEncoder(whisper_encoder_config(whisper, n_positions))
    encoder.requires_grad_(False)
    return encoder.eval()


def read_whisper_config(folder: Path) -> dict[str, Any]:
    """The encoder-relevant keys of a Hugging Face Whisper folder's `config.json`."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} is not a Hugging Face Whisper folder: no config.json")
    cfg = json.loads(path.read_text())
    keys = (
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "encoder_attention_heads",
        "encoder_ffn_dim",
        "max_source_positions",
        "activation_function",
        "scale_embedding",
    )
    return {k: cfg[k] for k in keys if k in cfg}


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise ModelNotFoundError(
        f"{folder} holds no Whisper weights (model.safetensors, its index, or pytorch_model.bin); "
        "download the full Hugging Face folder, e.g. openai/whisper-large"
    )


def _read_encoder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Only the encoder's tensors, without loading the (larger) decoder into memory."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                        for prefix in _ENCODER_PREFIXES:
                            if key.startswith(prefix):
                                tensors[key[len(prefix) :]] = f.get_tensor(key)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key, value in state.items():
                    for prefix in _ENCODER_PREFIXES:
                        if key.startswith(prefix):
                            tensors[key[len(prefix) :]] = value
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read Whisper weights {file}: {e}; delete it and download again") from e
    return tensors


def load_whisper_encoder(folder: str | Path, n_positions: int) -> WhisperEncoder:
    """Load the encoder of a Hugging Face Whisper folder, cut to `n_positions` (500 for 10 s)."""
    folder = Path(folder)
    encoder = build_whisper_encoder(read_whisper_config(folder), n_positions)
    tensors = _read_encoder_tensors(folder)
    pos = tensors.get("embed_positions.weight")
    if pos is None or pos.shape[0] < n_positions:
        raise CheckpointError(f"{folder}: encoder embed_positions missing or shorter than {n_positions} rows")
    tensors["embed_positions.weight"] = pos[:n_positions]
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{folder}: Whisper encoder weights do not match its config.json: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"mis-shaped {[(k, tuple(tensors[k].shape), tuple(expected[k].shape)) for k in bad[:8]]}"
        )
    encoder.load_state_dict(tensors, strict=True)
    return encoder


def pooled_layer_states(encoder: WhisperEncoder, mel: torch.Tensor, pool: int) -> torch.Tensor:
    """Every block's output (the pre-`layer_norm` states), mean-pooled over time.

    Parameters
    ----------
    mel: `[B, n_mels, 2 * P]` log-mel, P = encoder positions (500).
    pool: positions averaged into one token (20).

    Returns
    -------
    `[B, L, P // pool, D]` = `[B, 32, 25, 1280]`: the inputs of blocks 2..L plus the raw output of block L, i.e.
    the reference's 33 states minus the first (conv + positions), none after the final `layer_norm`.
    """
    pooled: list[torch.Tensor] = []

    def collect(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        h = output[0] if isinstance(output, tuple) else output  # [B, P, D]
        b, p, d = h.shape
        pooled.append(h.reshape(b, p // pool, pool, d).mean(dim=2))  # [B, P/pool, D]

    # Forward hooks see each block's output, whatever `output_hidden_states` does with the last one in a given
    # transformers version (it returns the state after `layer_norm` there).
    hooks = [layer.register_forward_hook(collect) for layer in encoder.layers]
    try:
        encoder(mel)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(pooled, dim=1)
