"""TLTR + projector against the reference computation written out with plain tensor ops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltu_as.model.tltr import TLTR, build_projector


def ref_block(block, x: torch.Tensor, heads: int) -> torch.Tensor:
    def ln(m, v):
        return F.layer_norm(v, v.shape[-1:], m.weight, m.bias, 1e-5)

    a = block.attn
    h = ln(block.attn_ln, x)
    n, t, d = h.shape
    q = (h @ a.query.weight.T + a.query.bias).view(n, t, heads, -1).transpose(1, 2)
    k = (h @ a.key.weight.T).view(n, t, heads, -1).transpose(1, 2)
    v = (h @ a.value.weight.T + a.value.bias).view(n, t, heads, -1).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    x = x + ((w @ v).transpose(1, 2).reshape(n, t, d) @ a.out.weight.T + a.out.bias)
    h = ln(block.mlp_ln, x)
    h = F.gelu(h @ block.mlp[0].weight.T + block.mlp[0].bias) @ block.mlp[2].weight.T + block.mlp[2].bias
    return x + h


def test_tltr_and_projector_match_reference() -> None:
    torch.manual_seed(0)
    b, l, t, d, d_llm = 2, 6, 25, 32, 48
    tltr = TLTR(d, time_heads=1, layer_heads=8)
    for p in tltr.parameters():  # non-trivial LayerNorm affine too
        torch.nn.init.normal_(p, std=0.2)
    proj = build_projector(d, d_llm)
    x = torch.randn(b, l, t, d)
    got = proj(tltr(x))

    h = ref_block(tltr.time_tr, x.reshape(b * l, t, d), 1)  # attention over time, per layer
    h = h.reshape(b, l, t, d).permute(0, 2, 1, 3).reshape(b * t, l, d)
    h = ref_block(tltr.layer_tr, h, 8)  # attention over layers, per time step
    h = h.reshape(b, t, l, d).mean(2)
    want = F.layer_norm(h, (d,)) @ proj[1].weight.T + proj[1].bias
    assert got.shape == (b, t, d_llm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_layernorm_runs_in_fp32_under_bf16() -> None:
    torch.manual_seed(0)
    tltr = TLTR(32, 1, 8)
    x = torch.randn(1, 4, 25, 32) * 100 + 1000  # large offset: bf16 LayerNorm statistics would be wrong
    ln = tltr.time_tr.attn_ln
    out = ln.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = F.layer_norm(x.to(torch.bfloat16).float(), (32,), ln.weight.float(), ln.bias.float())
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_key_names_match_the_release() -> None:
    names = set(TLTR(32, 1, 8).state_dict()) | {f"audio_proj.{k}" for k in build_projector(32, 16).state_dict()}
    assert "time_tr.attn.key.weight" in names and "time_tr.attn.key.bias" not in names
    assert {
        "layer_tr.mlp.0.weight",
        "layer_tr.mlp.2.bias",
        "time_tr.attn_ln.weight",
        "layer_tr.mlp_ln.bias",
        "audio_proj.1.weight",
        "audio_proj.1.bias",
    } <= names
    assert "audio_proj.0.weight" not in names  # LayerNorm without affine
