"""Architecture configuration of LTU-AS.

Every architecture number lives here as a named field, so the tiny models built by `ltu_as.testing` and the
real 7B model are the same code with other dims. The nested `whisper` and `llm` dicts are the stock
`transformers` configs (`WhisperConfig`, `LlamaConfig`) of the frozen parts; the named fields describe how LTU-AS
wires them together. The config travels with every checkpoint saved by `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Whisper large-v1 (`openai/whisper-large`), the encoder the LTU-AS features come from.
WHISPER_LARGE_V1: dict[str, Any] = {
    "num_mel_bins": 80,
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "max_source_positions": 1500,
    "activation_function": "gelu",
}

# LLaMA-7B as in Vicuna-7B (the authors' `vicuna_ltuas` folder).
LLAMA_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# Where the real components come from when nothing else is configured (see `ltu_as.sources`).
DEFAULT_WHISPER_SOURCE = "openai/whisper-large"
DEFAULT_LLM_SOURCE = "authors:vicuna_ltuas"
DEFAULT_CHECKPOINT_SOURCE = "authors:ltuas_long_noqa_a6.bin"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the frozen LLM (reference: r 8, alpha 16, dropout 0.05 on q_proj/v_proj, no bias)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class LtuAsConfig:
    """LTU-AS architecture.

    Attributes
    ----------
    whisper, llm:
        `WhisperConfig` / `LlamaConfig` keyword dicts of the frozen encoder and LLM.
    n_frames:
        mel frames the encoder sees (1000 = 10 s at a 10 ms hop); the mel is zero-padded or trimmed to this.
    pool:
        encoder positions averaged into one audio token (20: 500 positions → 25 tokens).
    time_heads, layer_heads:
        attention heads of the TLTR time and layer transformers (1 and 8 in the reference).
    mlp_ratio:
        TLTR MLP width as a multiple of the encoder width (4: 1280 → 5120).
    whisper_source, llm_source:
        where the frozen parts are loaded from (hub id, local path or `authors:` name); recorded so a
        checkpoint of the trainable parts knows what it must be combined with.
    """

    whisper: dict[str, Any] = field(default_factory=lambda: dict(WHISPER_LARGE_V1))
    llm: dict[str, Any] = field(default_factory=lambda: dict(LLAMA_7B))
    n_frames: int = 1000
    pool: int = 20
    time_heads: int = 1
    layer_heads: int = 8
    mlp_ratio: int = 4
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    whisper_source: str = DEFAULT_WHISPER_SOURCE
    llm_source: str = DEFAULT_LLM_SOURCE

    def __post_init__(self) -> None:
        positions = self.n_positions
        if self.n_frames % 2 or positions % self.pool:
            raise ValueError(
                f"n_frames={self.n_frames} gives {positions} encoder positions, not a multiple of pool={self.pool}"
            )
        if positions > self.whisper.get("max_source_positions", positions):
            raise ValueError(f"n_frames={self.n_frames} needs {positions} positions, more than the encoder has")
        if self.d_audio % self.time_heads or self.d_audio % self.layer_heads:
            raise ValueError(f"d_model={self.d_audio} must divide by time_heads and layer_heads")

    # Derived dims (never stored twice).
    @property
    def n_mels(self) -> int:
        return int(self.whisper["num_mel_bins"])

    @property
    def n_positions(self) -> int:
        """Encoder positions after the stride-2 conv (500 for 1000 frames)."""
        return self.n_frames // 2

    @property
    def n_audio_layers(self) -> int:
        """Encoder layer states collected per clip (32 for large-v1)."""
        return int(self.whisper["encoder_layers"])

    @property
    def d_audio(self) -> int:
        return int(self.whisper["d_model"])

    @property
    def n_audio_tokens(self) -> int:
        """Audio tokens handed to the LLM (25)."""
        return self.n_positions // self.pool

    @property
    def d_llm(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape of one clip's pooled encoder features: (layers, tokens, width) = (32, 25, 1280)."""
        return (self.n_audio_layers, self.n_audio_tokens, self.d_audio)

    @property
    def clip_samples(self) -> int:
        """Samples of audio the model reads (160 000 = 10 s at 16 kHz)."""
        return self.n_frames * self.hop_length

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LtuAsConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LtuAsConfig keys: {unknown}")
        d = dict(d)
        if "lora" in d:
            lora = dict(d["lora"])
            lora["target_modules"] = tuple(lora.get("target_modules", LoraSettings.target_modules))
            d["lora"] = LoraSettings(**lora)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LtuAsConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> LtuAsConfig:
        return dataclasses.replace(self, **changes)


def trainable_parameter_counts(config: LtuAsConfig) -> dict[str, int]:
    """Parameter counts of the trainable parts, computed from the dims alone (no model built).

    For the real dims: TLTR 39 352 320, projector 5 246 976, LoRA 4 194 304; 48 793 600 in all.
    """
    d, hidden = config.d_audio, config.d_audio * config.mlp_ratio
    attn = 4 * d * d + 3 * d  # query, value, out have a bias; key has none
    block = attn + 2 * 2 * d + (d * hidden + hidden) + (hidden * d + d)
    tltr = 2 * block
    proj = d * config.d_llm + config.d_llm
    n_layers = int(config.llm["num_hidden_layers"])
    heads, kv_heads = int(config.llm["num_attention_heads"]), int(config.llm.get("num_key_value_heads") or 0)
    head_dim = config.d_llm // heads
    out_dims = {
        "q_proj": heads * head_dim,
        "k_proj": (kv_heads or heads) * head_dim,
        "v_proj": (kv_heads or heads) * head_dim,
        "o_proj": config.d_llm,
    }
    lora = n_layers * sum(config.lora.r * (config.d_llm + out_dims[m]) for m in config.lora.target_modules)
    return {"tltr": tltr, "audio_proj": proj, "lora": lora, "total": tltr + proj + lora}
