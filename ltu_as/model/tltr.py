"""TLTR (time-and-layer transformer) and the projector into the LLM's embedding space.

Module and parameter names follow the authors' release (`time_tr`, `layer_tr`, `attn.query/key/value/out`,
`attn_ln`, `mlp_ln`, `mlp.0/2`, `audio_proj.1`) so their checkpoint keys map one to one
(`ltu_as.checkpoint`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (as in Whisper and the reference TLTR)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


class MultiHeadAttention(nn.Module):
    """Whisper-style attention: `key` has no bias, q and k are each scaled by `head_dim ** -0.25`, softmax in fp32."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, T, D]` → `[N, T, D]`; no mask, no positional embedding."""
        n, t, d = x.shape
        scale = (d // self.n_head) ** -0.25
        # [N, T, D] -> [N, H, T, D/H]
        q = self.query(x).view(n, t, self.n_head, -1).transpose(1, 2) * scale
        k = self.key(x).view(n, t, self.n_head, -1).transpose(1, 2) * scale
        v = self.value(x).view(n, t, self.n_head, -1).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2)).float().softmax(dim=-1).to(q.dtype)  # [N, H, T, T]
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, d))


class ResidualAttentionBlock(nn.Module):
    """`x + attn(attn_ln(x))`, then `x + mlp(mlp_ln(x))` with `mlp = Linear → GELU → Linear`."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_head)
        self.attn_ln = LayerNorm(d_model)
        hidden = d_model * mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.mlp_ln = LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class TLTR(nn.Module):
    """Attention over time within each encoder layer, then across layers at each time step, then a layer mean."""

    def __init__(self, d_model: int, time_heads: int = 1, layer_heads: int = 8, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.time_tr = ResidualAttentionBlock(d_model, time_heads, mlp_ratio)
        self.layer_tr = ResidualAttentionBlock(d_model, layer_heads, mlp_ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, L, T, D]` pooled encoder states (L = 32 layers, T = 25 tokens) → `[B, T, D]`."""
        b, l, t, d = features.shape
        x = self.time_tr(features.reshape(b * l, t, d))  # [B*L, T, D]
        x = x.reshape(b, l, t, d).transpose(1, 2).reshape(b * t, l, d)  # [B*T, L, D]
        x = self.layer_tr(x)
        return x.reshape(b, t, l, d).mean(dim=2)  # [B, T, D]


def build_projector(d_audio: int, d_llm: int) -> nn.Sequential:
    """`LayerNorm(d_audio, no affine) → Linear(d_audio, d_llm)`; index 1 matches the release's `audio_proj.1`."""
    return nn.Sequential(LayerNorm(d_audio, elementwise_affine=False), nn.Linear(d_audio, d_llm))
