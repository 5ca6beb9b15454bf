"""Token generation over `inputs_embeds`: a plain generator, so callers stream tokens and cancel between them.

The logits pipeline is the stock `transformers` one in the stock order (repetition penalty, then temperature,
top-k, top-p). The repetition penalty sees each row's own text prompt plus what it generated, as in the reference
(which passes the prompt's `input_ids` to `generate`); audio positions and pads are never penalised.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call decoding options. Defaults are the reference demo's: sampling, T 0.1, top-p 0.95, top-k 500,
    repetition penalty 1.1, up to 500 new tokens. Change with `dataclasses.replace` or `.greedy()`."""

    max_new_tokens: int = 500
    do_sample: bool = True
    temperature: float = 0.1
    top_p: float = 0.95
    top_k: int = 500
    repetition_penalty: float = 1.1
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def greedy(self) -> GenerationOptions:
        """The same options with argmax decoding."""
        return dataclasses.replace(self, do_sample=False)

    def replace(self, **changes: Any) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


def _warpers(options: GenerationOptions) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if options.do_sample:
        if options.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k > 0:
            warpers.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            warpers.append(TopPLogitsWarper(options.top_p))
    return warpers


def _cache_kwarg(cls: type) -> str:
    """The model class's name for the KV cache argument: transformers 5.x renamed `past_key_values` to `cache`
    (both accepted until 5.40). Read once per generation, not per token."""
    forward = getattr(cls, "forward")  # noqa: B009 (mypy's `type` has no `forward`)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def generate_tokens(
    llm: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_ids: list[list[int]],
    eos_token_id: int,
    options: GenerationOptions,
    cache: DynamicCache | None = None,
) -> Iterator[list[int | None]]:
    """Decode from assembled inputs (see `LtuAsForConditionalGeneration.assemble`).

    Parameters
    ----------
    llm: a `LlamaForCausalLM`-like model taking `inputs_embeds`.
    inputs_embeds `[B, S, d]`, attention_mask `[B, S]`, position_ids `[B, S]`: left-padded rows.
    prompt_ids: each row's text token ids, the history the repetition penalty sees.
    cache: optional KV cache already holding the first `attention_mask.shape[1] - S` positions of every row (a
        shared prefix, see `LtuAsForConditionalGeneration.stream_shared`); `attention_mask` then covers both.

    Yields
    ------
    For each step, a list of B entries: the new token id of each row, or None for a row that has finished.
    """
    b = inputs_embeds.shape[0]
    device = inputs_embeds.device
    embed = llm.get_input_embeddings()
    penalty = (
        RepetitionPenaltyLogitsProcessor(options.repetition_penalty) if options.repetition_penalty != 1.0 else None
    )
    warpers = _warpers(options)
    generator = None
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    history = [torch.tensor(ids, dtype=torch.long, device=device).reshape(1, -1) for ids in prompt_ids]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    if cache is None and options.use_cache:
        cache = DynamicCache()
    elif cache is not None and not options.use_cache:
        raise ValueError("a prefilled cache needs options.use_cache=True")
    cache_kw = _cache_kwarg(type(llm))
    step_embeds, step_positions = inputs_embeds, position_ids
    for _ in range(options.max_new_tokens):
        kwargs: dict[str, Any] = {"use_cache": options.use_cache}
        if cache is not None:
            kwargs[cache_kw] = cache
        out = llm(
            inputs_embeds=step_embeds,
            attention_mask=attention_mask,
            position_ids=step_positions,
            logits_to_keep=1,
            **kwargs,
        )
        logits = out.logits[:, -1, :].float()  # [B, vocab]
        if penalty is not None:
            logits = torch.cat([penalty(history[i], logits[i : i + 1]) for i in range(b)])
        logits = warpers(None, logits)  # type: ignore[arg-type]  # temperature/top-k/top-p do not read input_ids
        if options.do_sample:
            probs = logits.softmax(dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        is_eos = next_tokens == eos_token_id
        step = [None if (finished[i] or is_eos[i]) else int(next_tokens[i]) for i in range(b)]
        finished |= is_eos
        if finished.all():
            return
        yield step
        for i in range(b):
            history[i] = torch.cat([history[i], next_tokens[i].reshape(1, 1)], dim=1)
        new_embeds = embed(next_tokens).unsqueeze(1)  # [B, 1, d]
        new_positions = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones((b, 1), dtype=attention_mask.dtype, device=device)], 1)
        position_ids = torch.cat([position_ids, new_positions], dim=1)
        if cache is not None:
            step_embeds, step_positions = new_embeds, new_positions
        else:
            inputs_embeds = torch.cat([inputs_embeds, new_embeds], dim=1)
            step_embeds, step_positions = inputs_embeds, position_ids


def yes_probability(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """P(yes) from next-token `logits` `[B, vocab]`: the probability mass of the "yes" first tokens against the
    "no" ones (the rest of the vocabulary left out), `[B]` float32."""
    yes = torch.logsumexp(logits[:, list(yes_ids)].float(), dim=-1)
    no = torch.logsumexp(logits[:, list(no_ids)].float(), dim=-1)
    return torch.sigmoid(yes - no)
