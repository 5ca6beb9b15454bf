"""Config: derived dims, serialisation, and trainable parameter counts against built modules."""

from __future__ import annotations

import pytest

from ltu_as import LtuAsConfig, trainable_parameter_counts
from ltu_as.model.tltr import TLTR, build_projector


def test_real_dims() -> None:
    c = LtuAsConfig()
    assert c.feature_shape == (32, 25, 1280) and c.n_positions == 500 and c.d_llm == 4096
    assert c.clip_samples == 160_000 and c.n_mels == 80


def test_real_trainable_counts_match_built_modules() -> None:
    c = LtuAsConfig()
    counts = trainable_parameter_counts(c)
    tltr = TLTR(c.d_audio, c.time_heads, c.layer_heads, c.mlp_ratio)
    proj = build_projector(c.d_audio, c.d_llm)
    assert counts["tltr"] == sum(p.numel() for p in tltr.parameters()) == 39_352_320
    assert counts["audio_proj"] == sum(p.numel() for p in proj.parameters()) == 5_246_976
    assert counts["lora"] == 32 * 2 * (8 * 4096 + 4096 * 8) == 4_194_304
    assert counts["total"] == 48_793_600  # the reference's ~48.8 M


def test_tiny_counts_match_the_model(loaded) -> None:
    counts = trainable_parameter_counts(loaded.model.config)
    assert counts["total"] == sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)


def test_round_trip_and_errors(tmp_path) -> None:
    c = LtuAsConfig(whisper_source="/x", pool=10)
    c.save(tmp_path / "c.json")
    assert LtuAsConfig.load(tmp_path / "c.json") == c
    with pytest.raises(ValueError, match="unknown LtuAsConfig keys"):
        LtuAsConfig.from_dict({"n_framez": 1})
    with pytest.raises(ValueError, match="multiple of pool"):
        LtuAsConfig(pool=21)
