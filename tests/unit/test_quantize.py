"""Quantized LLM weights (`model.quantization`): the CPU int8 kernel against an independent computation, every
linear layer and the whole tiny model within measured error bounds of bf16, the engine decoding a quantized model,
and byte counts that equal what is allocated.

Bounds come from measurements on the tiny suite (2 layers, hidden 64, random weights at std 0.1: the worst case
for int4, whose 16 levels per group cover a Gaussian coarsely): int8 per layer ≈ 0.006 relative error, whole model
0.021 with 96 % greedy agreement; int4 per layer ≈ 0.09–0.10, whole model 0.30 with 50 % agreement. The real-dims
figures are in docs/performance.md (`bench/quantization.py`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltu_as import GenerationOptions
from ltu_as.loading.load import load_model, quantize_for_inference
from ltu_as.loading.quantize import (
    CompiledInt8Linear,
    CpuInt8Linear,
    compare_logits,
    int4_group,
    quantize_linears,
    weight_bytes,
)
from ltu_as.serving.engine import DecodeEngine, Request

IDS = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))


def _load(tiny, **kw: object):
    return load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def bf16(tiny):
    ref = _load(tiny, dtype="bf16")
    ref.model.merge_lora()
    return ref


def test_cpu_int8_linear_equals_the_dequantized_matmul() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    bias = torch.randn(96, generator=g)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    holder = nn.Sequential(lin)
    assert quantize_linears(holder, "int8", torch.device("cpu")) == 1
    q = holder[0]
    assert isinstance(q, CpuInt8Linear)
    # independent: per-row symmetric int8 by hand, then a float matmul
    assert q.qdata.dtype == torch.int8 and q.qdata.shape == (96, 64)
    scale = q.scale.float()
    assert torch.allclose(scale, w.bfloat16().float().abs().amax(1) / 127, rtol=1e-2)
    x = torch.randn(5, 64, generator=g)
    expected = x.bfloat16().float() @ (q.qdata.float() * scale[:, None]).T + q.bias.float()
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2)
    # and close to the unquantized layer: int8 rounding only
    assert compare_logits(x @ w.T + bias, got)["rel_error"] < 0.02


def test_int8_kernels_agree_on_the_same_weights() -> None:
    """The three int8 paths the GPU check compares (torchao's `Int8Tensor`, aten's int8pack kernel, the compiled
    dequant + matmul; here on CPU, inductor's C++ backend) compute the same layer from the same int8 weights."""
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x = torch.randn(3, 7, 64, generator=g).bfloat16()
    outs = {}
    for kernel in ("torchao", "aten", "compiled"):
        lin = nn.Linear(64, 48).to(torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(bias)
        holder = nn.Sequential(lin)
        quantize_linears(holder, "int8", torch.device("cpu"), int8_kernel=kernel)
        assert isinstance(
            holder[0], {"torchao": nn.Linear, "aten": CpuInt8Linear, "compiled": CompiledInt8Linear}[kernel]
        )
        outs[kernel] = holder[0](x).float()
    assert outs["aten"].shape == (3, 7, 48)
    for kernel in ("torchao", "compiled"):
        assert compare_logits(outs["aten"], outs[kernel])["rel_error"] < 0.01
    with pytest.raises(ValueError, match="int8_kernel"):
        quantize_linears(nn.Sequential(nn.Linear(64, 48)), "int8", torch.device("cpu"), int8_kernel="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "layer_bound", "model_bound", "agreement", "kl"),
    [
        ("int8", 0.012, 0.04, 0.9, 0.001),
        ("int4", 0.15, 0.45, 0.35, 0.06),
    ],
)
def test_quantized_model_within_bounds_of_bf16(tiny, bf16, mode, layer_bound, model_bound, agreement, kl) -> None:
    q = _load(tiny, quantization=mode)
    # the CPU kernels take bf16: the LLM computes in bf16, the audio path keeps fp32
    assert q.model.quantization == mode and q.model.llm_dtype == torch.bfloat16 and q.model.dtype == torch.float32
    names = [n for n, m in bf16.model.llm.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    assert len(names) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in names:
            a = bf16.model.llm.get_submodule(name)
            b = q.model.llm.get_submodule(name)
            base = getattr(b, "base_layer", b)
            assert type(base) is not nn.Linear or type(base.weight) is not nn.Parameter  # really quantized
            x = torch.randn(8, a.in_features, generator=g).bfloat16()
            err = compare_logits(a(x), b(x))["rel_error"]
            assert 0 < err < layer_bound, (name, err)
        whole = compare_logits(bf16.model.llm(IDS).logits, q.model.llm(IDS).logits)
    assert 0 < whole["rel_error"] < model_bound
    assert whole["greedy_agreement"] >= agreement
    assert whole["mean_kl"] < kl


def test_the_engine_decodes_a_quantized_model(tiny) -> None:
    """The engine calls the model's own (now quantized) modules on its KV cache: its greedy tokens equal a plain
    greedy loop over the stock forward of the same quantized model."""
    q = _load(tiny, quantization="int8")
    ids = q.processor.encode("What sound is this?")
    engine = DecodeEngine(q.model.llm, slots=2, max_positions=64, eos_token_id=-1)
    got = engine.run([Request(ids, GenerationOptions(max_new_tokens=10, repetition_penalty=1.0).greedy())])[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(q.model.llm(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids) :]


def test_lora_is_merged_before_quantizing_and_cannot_be_unmerged(tiny, bf16) -> None:
    plain = _load(tiny, dtype="bf16")  # LoRA not merged: its deltas applied on the fly
    q = _load(tiny, quantization="int8")
    with torch.no_grad():
        ref = plain.model.llm(IDS).logits
        assert compare_logits(ref, q.model.llm(IDS).logits)["rel_error"] < 0.04
        plain.model.language_model.base_model.disable_adapter_layers()
        no_lora = plain.model.llm(IDS).logits
    assert compare_logits(ref, no_lora)["rel_error"] > 0.05  # the LoRA matters, so the check above means something
    with pytest.raises(RuntimeError, match="quantized"):
        q.model.unmerge_lora()


def test_weight_bytes_count_quantized_storage(tiny) -> None:
    q8 = _load(tiny, quantization="int8")
    llm = q8.model.llm
    linears = [m for n, m in llm.named_modules() if isinstance(m, CpuInt8Linear)]
    expected = sum(m.qdata.numel() + m.scale.numel() * 2 for m in linears)
    others = sum(
        p.numel() * p.element_size()
        for n, p in list(llm.named_parameters()) + list(llm.named_buffers())
        if not n.endswith((".qdata", ".scale")) and "lora_" not in n and "base_layer" not in n
    )
    lora = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if "lora_" in n)
    assert weight_bytes(llm) == expected + others + lora


def test_int4_group_and_unknown_mode() -> None:
    assert (int4_group(4096), int4_group(64), int4_group(96)) == (128, 64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        int4_group(48)
    with pytest.raises(ValueError, match=r"model\.quantization"):
        quantize_linears(nn.Linear(4, 4), "fp8", torch.device("cpu"))


def test_a_quantized_llm_leaves_the_audio_path_in_fp32_on_cpu(tiny) -> None:
    """bf16 GEMM is ~10× slower than fp32 on AVX2 cores (a real-dims encoder layer: 2.6 s against 0.24 s), so only
    the LLM computes in bf16: the audio tokens of an int8-LLM model equal the fp32 model's bit for bit, and every
    way of decoding (per row, shared prefix, text only) runs across the fp32 → bf16 boundary."""
    fp32 = _load(tiny)
    q = _load(tiny, quantization="int8")
    assert {p.dtype for p in q.model.whisper_encoder.parameters()} == {torch.float32}
    mel = q.processor.mel(torch.randn(16000, generator=torch.Generator().manual_seed(3)).numpy())[None]
    feats = q.model.audio_features(mel)
    assert torch.equal(feats, fp32.model.audio_features(mel))
    assert torch.equal(q.model.audio_embeddings(feats), fp32.model.audio_embeddings(feats))
    ids = [q.processor.encode("What sound is this?"), q.processor.encode("Is anyone speaking?")]
    opts = GenerationOptions(max_new_tokens=4, repetition_penalty=1.0).greedy()
    rows = [[t for t in step] for step in q.model.stream(feats.expand(2, -1, -1, -1), ids, opts, eos_token_id=-1)]
    shared = [[t for t in step] for step in q.model.stream_shared(feats, ids, opts, eos_token_id=-1)]
    text = list(q.model.stream_text(ids, opts, eos_token_id=-1))
    assert len(rows) == len(shared) == len(text) == 4
    assert all(t is not None for step in rows + shared + text for t in step)


def test_int8_whisper_encoder_features_within_bounds_of_fp32(tiny) -> None:
    """`model.encoder_quantization = "int8"`: every linear layer of the Whisper encoder is int8, and each of the
    pooled layer outputs the TLTR reads stays within 3 % of fp32 (measured on the tiny suite: 1.1–1.6 %; the
    real-dims figures are in docs/performance.md)."""
    fp32 = _load(tiny)
    q = _load(tiny, encoder_quantization="int8")
    assert q.model.encoder_quantization == "int8" and q.model.quantization == "none"
    enc = q.model.whisper_encoder
    layers = len(enc.layers)
    assert sum(isinstance(m, CpuInt8Linear) for m in enc.modules()) == 6 * layers  # q k v out fc1 fc2
    assert not any(type(m) is nn.Linear for m in enc.modules())
    assert not any(isinstance(m, CpuInt8Linear) for m in q.model.llm.modules())  # the LLM is untouched
    mel = q.processor.mel(torch.randn(16000, generator=torch.Generator().manual_seed(4)).numpy())[None]
    ref, got = fp32.model.audio_features(mel), q.model.audio_features(mel)  # [1, L, T, D]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    errors = [compare_logits(ref[:, i], got[:, i])["rel_error"] for i in range(ref.shape[1])]
    assert 0 < max(errors) < 0.03, errors
    with pytest.raises(ValueError, match=r"model\.encoder_quantization"):
        _load(tiny, encoder_quantization="int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_a_loaded_model_equals_loading_it_quantized(tiny, mode) -> None:
    """`ltu-as eval --quantization` quantizes a model loaded unquantized (fp32 on CPU); it must then be the model the
    daemon serves (`load_model(quantization=...)`), LLM in bf16, so that eval measures what is deployed."""
    served = _load(tiny, quantization=mode)
    later = _load(tiny, dtype="fp32")
    quantize_for_inference(later.model, mode)
    assert later.model.llm_dtype == served.model.llm_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(later.model.llm(IDS).logits, served.model.llm(IDS).logits)


def test_the_int8_kernel_setting_reaches_the_llm(tiny) -> None:
    """`model.int8_kernel` picks the kernel of every LLM int8 layer; the tokens of a short greedy decode are the
    same whichever computes them (the weights and scales are the same int8 ones)."""
    kinds = {}
    logits = {}
    for kernel in ("auto", "torchao", "aten"):
        q = _load(tiny, quantization="int8", int8_kernel=kernel)
        kinds[kernel] = {
            type(m).__name__
            for n, m in q.model.llm.named_modules()
            if isinstance(m, (nn.Linear, CpuInt8Linear)) and "lora_" not in n  # peft's merged factors stay
        }
        logits[kernel] = q.model.llm(IDS).logits.float()
    assert kinds["auto"] == kinds["aten"] == {"CpuInt8Linear"}  # CPU's default
    assert kinds["torchao"] == {"Linear"}
    assert compare_logits(logits["aten"], logits["torchao"])["rel_error"] < 0.02
