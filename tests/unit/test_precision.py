"""Device/dtype policy and a bf16 model on CPU."""

from __future__ import annotations

import pytest
import torch

import ltu_as
from ltu_as import GenerationOptions, load_model
from ltu_as.loading.precision import resolve_device, resolve_dtype


def test_dtype_policy() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_bf16_model_on_cpu_runs_and_stays_close_to_fp32(tiny, loaded, clip) -> None:
    bf = load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", dtype="bf16", progress=False)
    assert bf.model.dtype == torch.bfloat16 and bf.model.llm.dtype == torch.bfloat16
    mel = bf.processor.mel(clip)[None]
    emb_bf = bf.model.audio_embeddings(bf.model.audio_features(mel))
    emb_32 = loaded.model.audio_embeddings(loaded.model.audio_features(mel))
    assert emb_bf.dtype == torch.bfloat16
    rel = (emb_bf.float() - emb_32).norm() / emb_32.norm()
    assert rel < 0.05
    ids = bf.processor.encode("What sound is this?", "")
    out = bf.model.generate(bf.model.audio_features(mel), [ids], GenerationOptions(max_new_tokens=5).greedy())
    assert len(out[0]) == 5


def test_public_api_names() -> None:
    for name in (
        "LtuAsConfig",
        "LtuAsForConditionalGeneration",
        "LtuAsProcessor",
        "load_official_checkpoint",
        "CheckpointError",
        "testing",
    ):
        assert hasattr(ltu_as, name)
    assert callable(ltu_as.testing.build_tiny_models)
