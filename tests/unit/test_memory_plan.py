"""The memory plan (`ltu_as.serving.memory_plan`): its weight and KV numbers equal what loading and the engine
allocate for the tiny models (tolerance: none, the counts are exact; the ASR model and the workspace are estimates
and not compared), real-dims numbers equal an independent count, and plans that do not fit name the setting."""

from __future__ import annotations

import pytest
import torch

from ltu_as.loading.load import load_model
from ltu_as.loading.quantize import weight_bytes
from ltu_as.model.config import LtuAsConfig
from ltu_as.serving.engine import DecodeEngine
from ltu_as.serving.memory_plan import kv_slot_bytes, plan_memory

CPU = torch.device("cpu")
GB = 1024**3


@pytest.mark.parametrize(
    ("quantization", "encoder_quantization"), [("none", "none"), ("int8", "none"), ("int4", "int8"), ("none", "int8")]
)
def test_planned_weights_equal_what_loading_allocates(tiny, quantization, encoder_quantization) -> None:
    loaded = load_model(
        tiny.checkpoint,
        whisper=tiny.whisper,
        llm=tiny.llm,
        device="cpu",
        quantization=quantization,
        encoder_quantization=encoder_quantization,
        progress=False,
    )
    model = loaded.model
    plan = plan_memory(
        model.config,
        device=CPU,
        dtype=torch.float32,
        quantization=quantization,
        encoder_quantization=encoder_quantization,
        available=GB,
    )
    parts = plan.parts
    encoder = next(v for k, v in parts.items() if k.startswith("Whisper encoder"))
    assert encoder == weight_bytes(model.whisper_encoder)
    assert parts["TLTR + projector"] == weight_bytes(model.audio_encoder) + weight_bytes(model.audio_proj)
    llm = next(v for k, v in parts.items() if k.startswith("LLM weights"))
    assert llm + parts["LoRA factors"] == weight_bytes(model.llm)
    assert plan.weights == weight_bytes(model)
    # KV slots in the LLM's dtype (bf16 when quantized on CPU), not the audio path's fp32
    engine = DecodeEngine(model.llm, slots=1, max_positions=plan.max_positions, eos_token_id=2)
    assert plan.kv_per_slot == sum(t.untyped_storage().nbytes() for t in (engine.k, engine.v, engine.seen))


def test_planned_kv_slots_equal_the_engine_allocation(tiny) -> None:
    loaded = load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", progress=False)
    cfg = loaded.model.config
    plan = plan_memory(cfg, device=CPU, dtype=torch.float32, slots=5, max_positions=200, available=GB)
    engine = DecodeEngine(loaded.model.llm, slots=5, max_positions=200, eos_token_id=2)
    allocated = sum(t.untyped_storage().nbytes() for t in (engine.k, engine.v, engine.seen))
    assert plan.slots == 5 and plan.slots * plan.kv_per_slot == allocated


def test_real_dims_match_an_independent_count() -> None:
    h, i, v, layers = 4096, 11008, 32000, 32
    linear = layers * (4 * h * h + 3 * h * i) + v * h  # q k v o gate up down per layer, lm_head
    rows = layers * (4 * h + 2 * i + h) + v  # output rows: a scale each for int8
    rest = v * h + layers * 2 * h + h + 2 * 64  # embeddings, norms, rotary inv_freq (+ its original copy), bf16
    cfg = LtuAsConfig()
    cuda = torch.device("cuda")
    for q, expected in (
        ("none", (linear + rest) * 2),
        ("int8", linear + rows * 4 + rest * 2),  # torchao keeps fp32 row scales on CUDA
    ):
        plan = plan_memory(cfg, device=cuda, dtype=torch.bfloat16, quantization=q, available=80 * GB)
        assert next(b for k, b in plan.parts.items() if k.startswith("LLM weights")) == expected
        # until a GPU run measures it, the plan says a quantized LLM on CUDA is for memory, not speed
        assert any("not measured yet" in n for n in plan.notes) == (q != "none")
    # the Whisper large encoder's linears in int8: 32 × (q k v out 1280² + fc1 fc2 1280×5120), a scale per row
    d, f = 1280, 5120
    enc_linear, enc_rows = 32 * (4 * d * d + 2 * d * f), 32 * (4 * d + f + d)
    enc = {
        e: next(
            b
            for k, b in plan_memory(
                cfg, device=cuda, dtype=torch.bfloat16, encoder_quantization=e, available=80 * GB
            ).parts.items()
            if k.startswith("Whisper encoder")
        )
        for e in ("none", "int8")
    }
    assert enc["none"] - enc["int8"] == enc_linear * 2 - (enc_linear + enc_rows * 4)
    # K and V: 2 × layers × heads × head_dim × (positions + 1) × 2 bytes, plus the penalty mask row
    assert kv_slot_bytes(cfg.llm, 1024, torch.bfloat16) == 2 * 32 * 32 * 128 * 1025 * 2 + v


def test_plans_that_do_not_fit_name_the_setting() -> None:
    cfg, cuda = LtuAsConfig(), torch.device("cuda")
    plan = plan_memory(cfg, device=cuda, dtype=torch.bfloat16, asr=("large-v2", "float16"), available=12 * GB)
    assert not plan.fits and plan.slots == 0
    assert 'model.quantization = "int8"' in plan.problem and "asr.model" in plan.problem
    plan = plan_memory(
        cfg, device=cuda, dtype=torch.bfloat16, quantization="int8", asr=("large-v2", "int8"), available=12 * GB
    )
    assert plan.fits and plan.slots >= 2  # the goal: the whole daemon on a 12 GB card with int8
    plan = plan_memory(cfg, device=cuda, dtype=torch.bfloat16, quantization="int4", slots=64, available=8 * GB)
    assert not plan.fits and "engine.max_positions" in plan.problem
    remote = plan_memory(cfg, device=cuda, dtype=torch.bfloat16, llm_local=False, available=4 * GB)
    assert remote.fits and remote.slots == 0 and remote.weights < 2 * GB
