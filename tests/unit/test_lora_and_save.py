"""LoRA merged == unmerged; save_pretrained → load_pretrained reproduces outputs; bad files are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from ltu_as import CheckpointError, GenerationOptions, ModelNotFoundError, load_pretrained

GREEDY = GenerationOptions(max_new_tokens=20).greedy()


@pytest.fixture()
def inputs(loaded, clip):
    feats = loaded.model.audio_features(loaded.processor.mel(clip)[None])
    return feats, [loaded.processor.encode("What sound is this?", "hello there")]


def logits(model, feats, prompts) -> torch.Tensor:
    with torch.no_grad():
        return model(feats, prompts).logits


def test_lora_is_not_a_no_op(loaded, inputs) -> None:
    with loaded.model.language_model.disable_adapter():
        off = logits(loaded.model, *inputs)
    assert not torch.allclose(off, logits(loaded.model, *inputs), atol=1e-3)


def test_lora_merged_and_unmerged_agree(loaded, inputs) -> None:
    model = loaded.model
    before_logits, before = logits(model, *inputs), model.generate(*inputs, GREEDY)
    q = model.llm.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    model.merge_lora()
    try:
        assert not torch.equal(q, model.llm.model.layers[0].self_attn.q_proj.base_layer.weight)
        torch.testing.assert_close(logits(model, *inputs), before_logits, rtol=1e-4, atol=1e-4)
        assert model.generate(*inputs, GREEDY) == before
    finally:
        model.unmerge_lora()
    torch.testing.assert_close(model.llm.model.layers[0].self_attn.q_proj.base_layer.weight, q)


def test_save_and_load_reproduce_outputs(loaded, inputs, tmp_path) -> None:
    loaded.model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "ltu_as_config.json").read_text())
    assert cfg["whisper_source"] == loaded.model.config.whisper_source
    again = load_pretrained(tmp_path / "ckpt", device="cpu", dtype="fp32", progress=False)
    torch.testing.assert_close(logits(again, *inputs), logits(loaded.model, *inputs), rtol=1e-5, atol=1e-5)
    assert again.generate(*inputs, GREEDY) == loaded.model.generate(*inputs, GREEDY)


def test_bad_own_checkpoints(loaded, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no ltu_as_config\.json"):
        load_pretrained(tmp_path, progress=False)
    loaded.model.save_pretrained(tmp_path / "c")
    weights = tmp_path / "c" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pretrained(tmp_path / "c", device="cpu", progress=False)


def test_trainable_parameters_are_exactly_tltr_projector_lora(loaded) -> None:
    names = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert names == {n for n in loaded.model.trainable_state_dict()}
    assert all(n.startswith(("audio_encoder.", "audio_proj.")) or ".lora_" in n for n in names)
