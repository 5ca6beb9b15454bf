"""The decoding logits pipeline on `[rows, vocab]` tensors, every option a per-row tensor: no Python per row.

The order and the arithmetic are those of the stock `transformers` processors the reference uses (repetition
penalty, then temperature, top-k, top-p), so a row gets the same filtered distribution here as through
`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (a test
compares them on the same logits). The penalty reads a per-row "seen" mask `[rows, vocab]` instead of each row's
token history, which is what the stock processor computes from the history anyway (it scatters into a mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowOptions:
    """Per-row decoding options as tensors on the logits' device, each `[rows]`.

    penalty: repetition penalty (1 = off); temperature (1 = off); top_k (0 = off); top_p (1 = off);
    sample: True to sample, False for argmax. `max_top_k` (the largest top_k in force) and `any_sample` are host
    values, so that choosing needs no device→host sync.
    """

    penalty: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    sample: torch.Tensor
    max_top_k: int
    any_sample: bool


def apply_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty: seen tokens' logits divided by the penalty when positive, multiplied when negative.
    `logits` `[R, V]` float32, `seen` `[R, V]` bool, `penalty` `[R]`."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def warp(logits: torch.Tensor, o: RowOptions) -> torch.Tensor:
    """Temperature, top-k and top-p on penalised logits `[R, V]` float32 → filtered logits (removed = -inf).
    Rows that do not sample are warped too (harmless: they take the argmax of the penalised logits)."""
    logits = logits / o.temperature[:, None]
    vocab = logits.shape[-1]
    if o.max_top_k > 0:
        k = min(o.max_top_k, vocab)
        top = torch.topk(logits, k, dim=-1).values  # [R, k], descending
        kth = top.gather(1, (o.top_k.clamp(1, k) - 1)[:, None])  # each row's own k-th largest
        kth = torch.where(o.top_k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
        logits = logits.masked_fill(logits < kth, -float("inf"))
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - o.top_p[:, None])
    remove[:, -1] = False  # keep at least the most likely token
    return logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def choose(
    logits: torch.Tensor,
    seen: torch.Tensor,
    o: RowOptions,
    generator: torch.Generator | None = None,
    seeded: list[tuple[int, torch.Generator]] | None = None,
) -> torch.Tensor:
    """The next token of each row, `[R]` long, on the logits' device (no host sync).

    `generator` draws for every sampling row; `seeded` lists (row, generator) pairs of rows with their own seed,
    whose draws are redone with their own generator so that a seeded row's text does not depend on what else is
    in the batch.
    """
    penalised = apply_penalty(logits, seen, o.penalty)
    greedy = penalised.argmax(dim=-1)
    if not o.any_sample:
        return greedy
    probs = warp(penalised, o).softmax(dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    for row, g in seeded or ():
        sampled[row] = torch.multinomial(probs[row], 1, generator=g)[0]
    return torch.where(o.sample, sampled, greedy)
