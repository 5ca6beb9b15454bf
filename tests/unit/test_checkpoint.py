"""The authors' checkpoint layout: strict loading, useful errors, export and round trip."""

from __future__ import annotations

import re

import pytest
import torch

from ltu_as import CheckpointError, load_official_checkpoint, official_state_dict
from ltu_as.loading.checkpoint import official_to_ours, ours_to_official


def official_keys(n_layers: int) -> set[str]:
    """The key set of section 5 of the reference facts, written out independently."""
    p = "base_model.model.model."
    keys = set()
    for tr in ("time_tr", "layer_tr"):
        a = f"{p}audio_encoder.{tr}."
        keys |= {f"{a}attn.{m}.weight" for m in ("query", "key", "value", "out")}
        keys |= {f"{a}attn.{m}.bias" for m in ("query", "value", "out")}
        keys |= {f"{a}{ln}.{w}" for ln in ("attn_ln", "mlp_ln") for w in ("weight", "bias")}
        keys |= {f"{a}mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    keys |= {f"{p}audio_proj.1.weight", f"{p}audio_proj.1.bias"}
    keys |= {
        f"{p}layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
        for i in range(n_layers)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    return keys


def test_tiny_release_file_has_exactly_the_reference_keys(tiny) -> None:
    state = torch.load(tiny.checkpoint, weights_only=True)
    assert set(state) == official_keys(tiny.config.llm["num_hidden_layers"])
    assert all(v.dtype == torch.float32 for v in state.values())


def test_loads_with_zero_leftovers_and_copies_values(loaded, tiny) -> None:
    model = loaded.model
    state = torch.load(tiny.checkpoint, weights_only=True)
    counts = load_official_checkpoint(model, tiny.checkpoint)
    assert counts["tensors"] == len(state) == len(model.trainable_state_dict())
    ours = model.trainable_state_dict()
    for key, value in state.items():
        torch.testing.assert_close(ours[official_to_ours(key)], value, rtol=0, atol=0)


def test_loads_without_adapter_name(loaded, tiny, tmp_path) -> None:
    state = torch.load(tiny.checkpoint, weights_only=True)
    old = {re.sub(r"\.default\.weight$", ".weight", k): v for k, v in state.items()}
    assert old.keys() != state.keys()
    torch.save(old, tmp_path / "old_peft.bin")
    assert load_official_checkpoint(loaded.model, tmp_path / "old_peft.bin")["tensors"] == len(state)


def test_broken_checkpoint_raises_listing_problems_and_changes_nothing(loaded, tiny, tmp_path) -> None:
    state = torch.load(tiny.checkpoint, weights_only=True)
    missing = "base_model.model.model.audio_proj.1.bias"
    shaped = "base_model.model.model.audio_encoder.time_tr.mlp.0.weight"
    del state[missing]
    state[shaped] = torch.zeros(3, 3)
    state["base_model.model.model.something_else.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.bin")
    before = {k: v.clone() for k, v in loaded.model.trainable_state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(loaded.model, tmp_path / "broken.bin")
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "audio_proj.1.bias" in msg and "something_else" in msg and "time_tr.mlp.0.weight" in msg
    assert "(3, 3)" in msg
    after = loaded.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_corrupt_or_foreign_file_is_a_checkpoint_error(loaded, tiny, tmp_path) -> None:
    data = tiny.checkpoint.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        load_official_checkpoint(loaded.model, tmp_path / "trunc.bin")
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        load_official_checkpoint(loaded.model, tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(loaded.model, tmp_path / "nope.bin")


def test_export_round_trip(loaded) -> None:
    exported = official_state_dict(loaded.model)
    assert set(exported) == official_keys(loaded.model.config.llm["num_hidden_layers"])
    for key in exported:
        assert official_to_ours(ours_to_official(official_to_ours(key))) == official_to_ours(key)
