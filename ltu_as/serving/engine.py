"""`DecodeEngine`: continuous batching over a preallocated slot KV cache, for a stock `LlamaForCausalLM`.

What it does, per `step()` (the caller's loop; no threads, no asyncio):

1. admits waiting rows into free KV slots, most urgent first (lower `priority`, then oldest); when none is free, a
   waiting row may preempt a running row of a less urgent priority (the preempted row keeps what it generated,
   gives its slot back and is prefilled again from its prompt + its tokens when it returns);
2. prefills newcomers, at most `prefill_chunk` positions per step in all, so a long prompt never stalls the running
   rows for more than about one step, and up to `prefill_rows` of them in one padded forward; a row whose prefix (a
   window's audio tokens + the prompt's common start) was prefilled before copies that KV from a bounded LRU instead
   of computing it, and an uncached prefix is computed in the same pass as the rest of the prompt (its KV is copied
   into the LRU once the pass has written it);
3. runs one decode step for every running row: one forward of `[rows, 1]` through the LLaMA layers with SDPA over
   each row's own slot (no pads: a row's positions are 0..n-1 in its slot), then the logits pipeline
   (`sampling.choose`) on `[rows, vocab]` tensors and one device→host copy of the new tokens. The running rows
   always hold slots 0..R-1, so the step reads the KV as one view: a row that leaves has its slot filled by the
   last running row (one move), and a newcomer takes the lowest free slot past the running rows, so rows that
   join together (prefilled in the order they were admitted) start decoding where they sit, and one that joins
   alone moves at most once, into the first slot past the running ones. On
   CUDA the step has static shapes (rows padded to a power of two, attention over a power-of-two span of
   positions) and each (rows, span) bucket is a CUDA graph, captured by `warm()` before any work (at most
   `max_graphs` of them) and replayed;
4. retires rows on EOS, `max_new_tokens` (or the slot's end) or cancel.

The layer math is the stock model's: its own modules (`input_layernorm`, `q/k/v/o_proj`, `rotary_emb`, `mlp`, ...)
called on our cache, with transformers' `apply_rotary_pos_emb`. LoRA is whatever the modules hold: merge it first
(`LtuAsForConditionalGeneration.merge_lora`) so a decode step costs the base weights only.

Greedy rows give the same tokens as `LtuAsForConditionalGeneration.stream` (tests compare them); sampled rows draw
from the same filtered distribution (see `sampling`).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..model.generation import GenerationOptions
from .sampling import RowOptions, choose

log = logging.getLogger(__name__)

Finish = Literal["eos", "length", "cancelled"]

# Priorities: lower runs first and may preempt higher.
QUESTION, CHECK, SCENE, TEXT = 0, 1, 2, 3


class PromptTooLong(ValueError):
    """A prompt that fills a whole slot, leaving no room for an answer."""


@dataclass(eq=False)
class Request:
    """One sequence to continue.

    Layout: `[prefix_embeds][ids]`, positions 0..n-1. The first `len(prefix_embeds) + shared` positions are the
    cacheable prefix, found again by `(prefix_key, ids[:shared])`; `prefix_key` None means never cached.

    prefix_embeds: `[P, d]` embeddings placed before the text (LTU-AS: the window's 25 audio tokens), or None.
    ids: the text token ids (BOS first); also what the repetition penalty sees, as in the reference.
    """

    ids: Sequence[int]
    options: GenerationOptions
    prefix_embeds: torch.Tensor | None = None
    prefix_key: Hashable | None = None
    shared: int = 0
    priority: int = QUESTION
    tag: Any = None  # the caller's, returned with each output

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("a request needs at least one text token (BOS)")
        self.ids = [int(i) for i in self.ids]
        self.shared = max(0, min(self.shared, len(self.ids) - 1))  # a row always prefills one token of its own


@dataclass(eq=False)
class Row:
    """A request inside the engine. `generated` holds the tokens produced so far (EOS excluded)."""

    request: Request
    seq: int
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    filled: int = 0  # positions of this row's KV written in its slot
    target: int = 0  # positions to prefill before decoding (prompt + tokens kept over a preemption)
    state: Literal["waiting", "prefill", "running", "done"] = "waiting"
    cancelled: bool = False
    preemptions: int = 0
    max_new: int = 0  # options.max_new_tokens, or less where the slot ends first
    generator: torch.Generator | None = None

    @property
    def prompt_len(self) -> int:
        pe = self.request.prefix_embeds
        return (0 if pe is None else pe.shape[0]) + len(self.request.ids)


@dataclass
class Output:
    """What one step produced for one row: a new token, and/or the reason it finished (EOS is not a token)."""

    row: Row
    token: int | None
    finished: Finish | None = None
    error: Exception | None = None  # a remote engine's failed row (finished is then "cancelled")

    @property
    def tag(self) -> Any:
        return self.row.request.tag


def checked_row(request: Request, seq: int, *, vocab: int, hidden: int, max_positions: int, limit: str) -> Row:
    """A `Row` for `request`, checked against the model: ids in its vocabulary, `prefix_embeds` `[P, hidden]`, and
    a prompt shorter than `max_positions` (else PromptTooLong, naming `limit`). `max_new` is capped at the last
    position: an answer stops there as at its token cap (reason "length")."""
    row = Row(request, seq)
    if not all(0 <= i < vocab for i in request.ids):
        raise ValueError(f"token ids must be in [0, {vocab}): the model's vocabulary")
    if row.prompt_len >= max_positions:
        raise PromptTooLong(
            f"the prompt ({row.prompt_len} positions) leaves no room to answer in {limit} ({max_positions}); "
            "shorten it or raise that limit"
        )
    pe = request.prefix_embeds
    if pe is not None and tuple(pe.shape[1:]) != (hidden,):
        raise ValueError(f"prefix_embeds must be [P, {hidden}]")
    row.max_new = min(request.options.max_new_tokens, max_positions - row.prompt_len)
    return row


def kv_bytes_per_slot(config: Any, max_positions: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one slot of `max_positions` positions over every layer."""
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * max_positions * size


def auto_slots(config: Any, max_positions: int, dtype: torch.dtype, device: torch.device, fraction: float) -> int:
    """How many slots fit in `fraction` of the device's free memory now (`memory_plan.free_bytes`)."""
    from .memory_plan import free_bytes

    return max(1, int(free_bytes(device) * fraction) // kv_bytes_per_slot(config, max_positions, dtype))


class DecodeEngine:
    """Continuous batching for one `LlamaForCausalLM` (see the module docstring).

    Parameters
    ----------
    llm: the stock model (LoRA merged for speed; unmerged works).
    slots: rows that can hold KV at once (running + prefilling).
    max_positions: positions per slot: prompt + new tokens of any one row must fit.
    eos_token_id: ends a row (not emitted).
    prefill_chunk: most prompt positions prefilled per step, all newcomers together.
    prefix_cache: most prefixes (window audio + common prompt start) whose KV is kept for reuse.
    seed: seeds the generator of sampling rows that have no seed of their own.
    static: decode with static shapes (rows padded to a power of two, attention over a power-of-two span of
        positions): what a CUDA graph needs. Default: on CUDA. On CPU it runs eagerly (tests check it there).
    graphs: run each (rows, span) bucket of the static step as a CUDA graph (default: on CUDA). `warm()` captures
        them all up front; a bucket first met later is captured then (counted in `counts["late_captures"]`) while
        fewer than `max_graphs` exist, else it runs eagerly. A capture that fails turns graphs off with a warning
        (`graph_error` says why, `counts["graph_failures"]` counts it); decoding goes on eagerly.
    max_graphs: the most graphs kept (each holds its own output buffers; intermediates share one memory pool).
    prefill_rows: the most newcomers prefilled together in one forward (padded to the longest chunk).
    """

    def __init__(
        self,
        llm: Any,
        *,
        slots: int,
        max_positions: int,
        eos_token_id: int,
        prefill_chunk: int = 256,
        prefix_cache: int = 32,
        seed: int = 0,
        static: bool | None = None,
        graphs: bool | None = None,
        max_graphs: int = 64,
        prefill_rows: int = 16,
    ) -> None:
        if slots < 1 or max_positions < 2 or prefill_chunk < 1 or prefill_rows < 1 or max_graphs < 0:
            raise ValueError(
                "slots >= 1, max_positions >= 2, prefill_chunk >= 1, prefill_rows >= 1 and max_graphs >= 0 are needed"
            )
        self.llm = llm
        self.base = llm.model
        cfg = llm.config
        self.layers = list(self.base.layers[: cfg.num_hidden_layers])
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab = cfg.vocab_size
        p = next(llm.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.slots, self.max_positions, self.prefill_chunk = slots, max_positions, prefill_chunk
        self.prefill_rows, self.max_graphs = prefill_rows, max_graphs
        self.eos = int(eos_token_id)
        # one more position than a row can use: the scratch column padding rows of a static step write to
        shape = (len(self.layers), slots, self.kv_heads, max_positions + 1, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # per-slot decoding state, on the device
        self.seen = torch.zeros((slots, self.vocab), dtype=torch.bool, device=self.device)
        self.tok = torch.zeros(slots, dtype=torch.long, device=self.device)  # the next input token
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # its position
        self._opt = {
            "penalty": torch.ones(slots, device=self.device),
            "temperature": torch.ones(slots, device=self.device),
            "top_k": torch.zeros(slots, dtype=torch.long, device=self.device),
            "top_p": torch.ones(slots, device=self.device),
            "sample": torch.zeros(slots, dtype=torch.bool, device=self.device),
        }
        self.owner: list[Row | None] = [None] * slots  # slot → row; slots 0..used-1 are taken
        self.waiting: list[Row] = []
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.prefixes: collections.OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self.prefix_cache_size = prefix_cache
        self._seq = itertools.count()
        cuda = self.device.type == "cuda"
        self.static = cuda if static is None else static
        self.graphs = (cuda if graphs is None else graphs) and cuda
        self.static = self.static or self.graphs
        self._arange = torch.arange(max(slots, max_positions) + 1, device=self.device)
        self._g_tok = torch.zeros(slots, dtype=torch.long, device=self.device)  # the static step's inputs
        self._g_pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self.graph_error: str | None = None  # why graphs were turned off, if they were
        self.counts = {
            "steps": 0,
            "prefix_hits": 0,
            "prefix_misses": 0,
            "preempted": 0,
            "prefill_tokens": 0,
            "prefill_forwards": 0,  # forwards that prefilled (one per step at most, however many rows)
            "moves": 0,  # rows whose KV was copied to another slot to keep the running rows in 0..R-1
            "moved_positions": 0,  # positions copied by those moves
            "graphs": 0,  # buckets captured as CUDA graphs
            "late_captures": 0,  # of those, captured mid-run (not by `warm()`)
            "graph_failures": 0,
        }

    # --- the caller's side ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Row:
        """Queue a request; it joins the running batch at a later `step()`. Raises ValueError when its prompt
        fills a slot; a prompt + `max_new_tokens` longer than a slot ends at the slot's end (reason "length")."""
        row = checked_row(
            request,
            next(self._seq),
            vocab=self.vocab,
            hidden=self.llm.config.hidden_size,
            max_positions=self.max_positions,
            limit="the engine's max_positions per slot",
        )
        if request.options.do_sample and request.options.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(request.options.seed)
        row.target = row.prompt_len
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """End `row` at the next step (its last output says "cancelled"); the others are not affected."""
        row.cancelled = True

    def abort(self) -> list[Row]:
        """End every row at once (after a failed step, or at shutdown) and return them; the engine is then empty
        and usable. The prefix cache is dropped too, as a failed step may have left it half written."""
        rows = [r for r in self.owner if r is not None] + self.waiting
        for r in rows:
            r.state, r.slot = "done", None
        self.owner = [None] * self.slots
        self.waiting = []
        self.prefixes.clear()
        return rows

    @property
    def used(self) -> int:
        return sum(r is not None for r in self.owner)

    @property
    def running(self) -> list[Row]:
        return [r for r in self.owner if r is not None and r.state == "running"]

    def has_work(self) -> bool:
        return bool(self.waiting) or self.used > 0

    def step(self) -> list[Output]:
        """One step: admit, prefill (≤ `prefill_chunk` positions), decode every running row once, retire."""
        out: list[Output] = []
        self._retire_cancelled(out)
        self._admit()
        fresh = self._prefill()
        self._decode(out, fresh)
        self.counts["steps"] += 1
        return out

    def run(self, requests: Sequence[Request]) -> list[list[int]]:
        """Submit `requests` and step until all are done: their generated tokens (EOS excluded), in order."""
        rows = [self.submit(r) for r in requests]
        while any(r.state != "done" for r in rows):
            self.step()
        return [r.generated for r in rows]

    # --- slots ------------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        self.waiting.sort(key=lambda r: (r.request.priority, r.seq))
        while self.waiting:
            row = self.waiting[0]
            if self.used >= self.slots:
                victim = self._victim(row.request.priority)
                if victim is None:
                    return
                self._preempt(victim)
            self.waiting.pop(0)
            self._take_slot(row)

    def _victim(self, priority: int) -> Row | None:
        """The least urgent, most recently started row less urgent than `priority` (None: nobody to preempt)."""
        cands = [r for r in self.owner if r is not None and r.request.priority > priority]
        return max(cands, key=lambda r: (r.request.priority, r.seq)) if cands else None

    def _preempt(self, row: Row) -> None:
        self.counts["preempted"] += 1
        row.preemptions += 1
        self._free(row)
        # prefilled again later from prompt + what it generated; the last generated token is then fed by decode
        row.state, row.filled = "waiting", 0
        row.target = row.prompt_len + max(0, len(row.generated) - 1)
        self.waiting.append(row)

    def _take_slot(self, row: Row) -> None:
        # the lowest free slot past the running rows: newcomers admitted together are prefilled in this order, so
        # they become running rows R, R+1, ... where they already sit (a hole among the running rows is filled by
        # the last running row instead, one move)
        running = sum(r is not None and r.state == "running" for r in self.owner)
        free = [i for i, r in enumerate(self.owner) if r is None]
        slot = next((i for i in free if i >= running), free[0])
        self.owner[slot] = row
        row.slot, row.state, row.filled = slot, "prefill", 0
        o, opts = self._opt, row.request.options
        o["penalty"][slot] = opts.repetition_penalty
        sample = opts.do_sample
        o["temperature"][slot] = opts.temperature if sample else 1.0
        o["top_k"][slot] = opts.top_k if sample else 0
        o["top_p"][slot] = opts.top_p if sample else 1.0
        o["sample"][slot] = sample
        self.seen[slot] = False
        ids = torch.tensor(list(row.request.ids) + row.generated, dtype=torch.long, device=self.device)
        self.seen[slot, ids] = True

    def _free(self, row: Row) -> None:
        """Give `row`'s slot back (`_layout` closes the gap before the next decode)."""
        assert row.slot is not None
        self.owner[row.slot] = None
        row.slot = None

    def _layout(self) -> None:
        """Move rows so that the running ones hold slots 0..R-1 (a decode step then reads its KV as one view `[0:R]`,
        and a captured graph always the same addresses). Only a running row past R-1 moves, into a slot below R that
        no running row holds (a departed row's, or a prefilling row's, which then takes the mover's old slot): at
        most one move per departure or arrival, copying only the positions each moved row has filled."""
        running = [r for r in self.owner if r is not None and r.state == "running"]
        n = len(running)
        movers = [r for r in running if r.slot is not None and r.slot >= n]
        if not movers:
            return
        holes = [s for s in range(n) if self.owner[s] is None or self.owner[s].state != "running"]  # type: ignore[union-attr]
        for row, hole in zip(movers, holes, strict=True):
            assert row.slot is not None
            self._exchange(row.slot, hole)

    def _exchange(self, a: int, b: int) -> None:
        """Swap what slots a and b hold (KV up to each row's `filled`, and the per-slot decoding state)."""
        per_slot = (self.seen, self.tok, self.pos, *self._opt.values())
        ra, rb = self.owner[a], self.owner[b]
        saved = []
        for row, src, dst in ((ra, a, b), (rb, b, a)):
            if row is None:
                continue
            n = row.filled
            saved.append(
                (
                    row,
                    dst,
                    self.k[:, src, :, :n].clone(),
                    self.v[:, src, :, :n].clone(),
                    [t[src].clone() for t in per_slot],
                )
            )
        for row, dst, k, v, rest in saved:
            n = k.shape[2]
            self.k[:, dst, :, :n] = k
            self.v[:, dst, :, :n] = v
            for t, x in zip(per_slot, rest, strict=True):
                t[dst] = x
            row.slot = dst
            self.counts["moves"] += 1
            self.counts["moved_positions"] += n
        self.owner[a], self.owner[b] = rb, ra

    def _finish(self, row: Row, reason: Finish, out: list[Output], token: int | None = None) -> None:
        if row.slot is not None:
            self._free(row)
        if row in self.waiting:
            self.waiting.remove(row)
        row.state = "done"
        out.append(Output(row, token, reason))

    def _retire_cancelled(self, out: list[Output]) -> None:
        for row in [r for r in (*self.owner, *self.waiting) if r is not None and r.cancelled]:
            self._finish(row, "cancelled", out)

    # --- the model --------------------------------------------------------------------------------------------------
    def _embeds(self, row: Row, start: int, end: int) -> torch.Tensor:
        """`[end - start, d]` input embeddings of positions start..end-1 of the row's sequence."""
        pe = row.request.prefix_embeds
        p = 0 if pe is None else pe.shape[0]
        parts = []
        if pe is not None and start < p:
            parts.append(pe[start : min(end, p)].to(self.device, self.dtype))
        if end > p:
            ids = (list(row.request.ids) + row.generated)[max(start, p) - p : end - p]
            parts.append(self.base.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | slice,
        write: torch.Tensor,
        mask: torch.Tensor,
        length: int,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LLaMA layers on `h` `[R, S, d]` at `positions` `[R, S]`, over the KV of `slots` (R of them).

        write: the `[R]` slot indices the rows' new K and V go to, each at its `positions` (a padding position is
            `max_positions`: the scratch column no real row reads).
        mask: `[R, 1, S, length]`, True = attend, over the first `length` positions of each slot.
        last: `[R]` index of each row's last real position in S (None: S - 1 for every row).

        Returns the final-norm hidden state of each row's last position, `[R, d]`.
        """
        r, s, _ = h.shape
        cos, sin = self.base.rotary_emb(h, positions)
        groups = self.heads // self.kv_heads
        rows = write[:, None]  # [R, 1] with positions [R, S]: index_put writes [R, S, heads, head_dim]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(r, s, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(r, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(r, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, positions] = k.transpose(1, 2)
            vc[rows, :, positions] = v.transpose(1, 2)
            keys, values = kc[slots, :, :length], vc[slots, :, :length]
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=groups > 1
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(r, s, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.base.norm(h[:, -1] if last is None else h[self._arange[:r], last])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.lm_head(hidden).float()  # [R, vocab]

    def _prefill(self) -> list[tuple[Row, torch.Tensor]]:
        """Prefill newcomers within the step's budget, up to `prefill_rows` of them in one forward. Returns the
        rows whose prompt is now complete with the logits `[1, vocab]` of their first token (chosen together with
        the decode step's, one sync for both)."""
        chunks: list[tuple[Row, int, int]] = []  # (row, first position, end) of this step's part of each prompt
        budget = self.prefill_chunk
        # most urgent first (a question before a scene), then oldest: slots say nothing about order
        prefilling = sorted(
            (r for r in self.owner if r is not None and r.state == "prefill"), key=lambda r: (r.request.priority, r.seq)
        )
        for row in prefilling:
            if budget <= 0 or len(chunks) >= self.prefill_rows:
                break
            slot = row.slot
            assert slot is not None
            key, cut = self._prefix(row)
            if row.filled == 0 and key is not None and key in self.prefixes:
                pk, pv = self.prefixes[key]
                self.prefixes.move_to_end(key)
                self.k[:, slot, :, :cut] = pk
                self.v[:, slot, :, :cut] = pv
                row.filled = cut
                self.counts["prefix_hits"] += 1
            end = min(row.target, row.filled + budget)
            chunks.append((row, row.filled, end))
            budget -= end - row.filled
        if not chunks:
            return []
        hidden = self._prefill_forward(chunks)
        self.counts["prefill_forwards"] += 1
        done: list[tuple[int, Row]] = []
        for i, (row, start, end) in enumerate(chunks):
            slot = row.slot
            assert slot is not None
            row.filled = end
            self.counts["prefill_tokens"] += end - start
            key, cut = self._prefix(row)
            if key is not None and start < cut <= end and key not in self.prefixes:
                # this pass wrote the whole prefix: keep a copy for the next question about the same window
                self.counts["prefix_misses"] += 1
                self.prefixes[key] = (self.k[:, slot, :, :cut].clone(), self.v[:, slot, :, :cut].clone())
                while len(self.prefixes) > self.prefix_cache_size:
                    self.prefixes.popitem(last=False)
            if row.filled < row.target:
                continue
            self.pos[slot] = row.filled
            if row.generated and row.target < row.prompt_len + len(row.generated):
                # back from a preemption: the last token it generated is the next input
                self.tok[slot] = row.generated[-1]
                row.state = "running"
                continue
            done.append((i, row))
        if not done:
            return []
        logits = self._logits(hidden[torch.tensor([i for i, _ in done], device=self.device)])
        return [(row, logits[j : j + 1]) for j, (_, row) in enumerate(done)]

    def _prefill_forward(self, chunks: list[tuple[Row, int, int]]) -> torch.Tensor:
        """One forward over every chunk `(row, start, end)`: positions start..end-1 of each row, padded to the
        longest chunk (pads sit at the scratch position). Returns the hidden state of each chunk's last position,
        `[len(chunks), d]`."""
        n = len(chunks)
        width = max(end - start for _, start, end in chunks)
        length = max(end for _, _, end in chunks)
        positions = torch.full((n, width), self.max_positions, dtype=torch.long, device=self.device)
        h = torch.zeros((n, width, self.llm.config.hidden_size), dtype=self.dtype, device=self.device)
        for i, (row, start, end) in enumerate(chunks):
            h[i, : end - start] = self._embeds(row, start, end)
            positions[i, : end - start] = self._arange[start:end]
        slots = torch.tensor([row.slot for row, _, _ in chunks], dtype=torch.long, device=self.device)
        last = torch.tensor([end - start - 1 for _, start, end in chunks], dtype=torch.long, device=self.device)
        # causal over each row's own slot: a real position p attends 0..p (earlier chunks' KV and this one's); a pad
        # (position max_positions) attends everything and is never read
        mask = (self._arange[None, None, :length] <= positions[:, :, None])[:, None]  # [n, 1, width, length]
        return self._forward(h, positions, slots, slots, mask, length, last)

    def _prefix(self, row: Row) -> tuple[Hashable | None, int]:
        """The row's prefix cache key (None: not cached) and how many positions it covers."""
        req = row.request
        if req.prefix_key is None:
            return None, 0
        p = 0 if req.prefix_embeds is None else req.prefix_embeds.shape[0]
        return (req.prefix_key, tuple(req.ids[: req.shared])), p + req.shared

    def _decode(self, out: list[Output], fresh: list[tuple[Row, torch.Tensor]]) -> None:
        """One decode step of every running row, then the next token of those rows and of the `fresh` ones (whose
        prefill just ended) chosen together: one device→host copy per step."""
        self._layout()
        rows = self.running  # in slots 0..R-1, in that order
        r = len(rows)
        logits = None
        if r:
            length = max(row.filled for row in rows) + 1
            if self.static:
                logits = self._static_step(r, length)
            else:
                positions = self.pos[:r, None]  # [R, 1]
                h = self.base.embed_tokens(self.tok[:r])[:, None]  # [R, 1, d]
                mask = (self._arange[None, :length] <= positions)[:, None, None]  # [R, 1, 1, L]
                hidden = self._forward(h, positions, slice(0, r), self._arange[:r], mask, length)
                logits = self._logits(hidden)
            for row in rows:
                row.filled += 1
            self.pos[:r] += 1
        if fresh:
            logits = torch.cat([x for x in (logits, *(f[1] for f in fresh)) if x is not None])
            rows = rows + [f[0] for f in fresh]
            slots: torch.Tensor | slice = torch.tensor([row.slot for row in rows], dtype=torch.long, device=self.device)
        elif not r:
            return
        else:
            slots = slice(0, r)
        assert logits is not None
        for row, tok in zip(rows, self._choose(rows, logits, slots), strict=True):
            self._emit(row, tok, out)

    def _bucket(self, rows: int, length: int) -> tuple[int, int]:
        """The static step's shape for `rows` rows attending `length` positions: rows → a power of two ≤ slots,
        span → a power of two ≥ 64 and ≤ max_positions."""
        return min(_pow2(rows), self.slots), min(max(_pow2(length), 64), self.max_positions)

    def buckets(self, rows: int | None = None, length: int | None = None) -> list[tuple[int, int]]:
        """Every (rows, span) bucket a step with at most `rows` rows and `length` positions can use (default: the
        engine's slots and max_positions), shortest spans first."""
        rows = self.slots if rows is None else max(1, min(rows, self.slots))
        length = self.max_positions if length is None else max(1, min(length, self.max_positions))
        bs = sorted({self._bucket(r, 1)[0] for r in range(1, rows + 1)})
        spans = sorted({self._bucket(1, n)[1] for n in range(1, length + 1)})
        return [(b, span) for span in spans for b in bs]

    def warm(
        self, rows: int | None = None, length: int | None = None, only: Sequence[tuple[int, int]] | None = None
    ) -> int:
        """Capture the CUDA graph of every bucket of `buckets(rows, length)` (or of `only`) now, before any timed
        or served work (at most `max_graphs` in all); returns how many graphs exist. A no-op without graphs. Safe
        at any time: the capture's warm-up passes write only the scratch position."""
        if not self.graphs:
            return 0
        for b, span in self.buckets(rows, length) if only is None else only:
            if (b, span) in self._graphs:
                continue
            if len(self._graphs) >= self.max_graphs:
                break
            self._g_tok.zero_()
            self._g_pos.fill_(self.max_positions)
            if self._capture_bucket(b, span) is None:
                break
        return len(self._graphs)

    def _capture_bucket(self, b: int, span: int) -> tuple[Any, torch.Tensor] | None:
        try:
            entry = self._capture(b, span)
        except Exception as e:  # a graph is an optimisation: decode on without it
            self.graph_error = f"{type(e).__name__}: {e}"[:300]
            self.counts["graph_failures"] += 1
            log.warning("CUDA graph capture failed (%s); decoding without graphs", self.graph_error)
            self.graphs = False
            return None
        self._graphs[(b, span)] = entry
        self.counts["graphs"] = len(self._graphs)
        return entry

    def _static_step(self, r: int, length: int) -> torch.Tensor:
        """Logits `[r, vocab]` of the decode step of rows 0..r-1 through the static-shape step of its bucket
        (`_bucket`); a graph replay where one is captured (see `graphs`)."""
        b, span = self._bucket(r, length)
        self._g_tok[:r] = self.tok[:r]
        self._g_pos[:r] = self.pos[:r]
        if b > r:  # padding rows: token 0 at the scratch position, never read by a real row
            self._g_tok[r:b] = 0
            self._g_pos[r:b] = self.max_positions
        if self.graphs:
            entry = self._graphs.get((b, span))
            if entry is None and len(self._graphs) < self.max_graphs:
                # not warmed: captured now (the warm-up passes write this step's own KV, so they are harmless)
                entry = self._capture_bucket(b, span)
                if entry is not None:
                    self.counts["late_captures"] += 1
            if entry is not None:
                graph, out = entry
                graph.replay()
                return out[:r]
        return self._static_forward(b, span)[:r]

    def _static_forward(self, b: int, span: int) -> torch.Tensor:
        """The decode step on the static buffers: `b` rows in slots 0..b-1, attention over positions 0..span-1."""
        positions = self._g_pos[:b, None]
        h = self.base.embed_tokens(self._g_tok[:b])[:, None]
        mask = (self._arange[None, :span] <= positions)[:, None, None]
        return self._logits(self._forward(h, positions, slice(0, b), self._arange[:b], mask, span))

    def _capture(self, b: int, span: int) -> tuple[Any, torch.Tensor]:
        """Record the static step of bucket (b, span) as a CUDA graph (warm-up runs first, on a side stream, as
        graphs require; they write the same KV the step itself writes)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_forward(b, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._static_forward(b, span)
        self._pool = graph.pool()
        return graph, out

    def _choose(self, rows: list[Row], logits: torch.Tensor, slots: torch.Tensor | slice) -> list[int]:
        """Next tokens of `rows` (logits `[R, vocab]`, in `slots`): the pipeline on tensors, then one device→host
        copy. Also records each token as the slot's next input and as seen."""
        o = {k: t[slots] for k, t in self._opt.items()}
        sample = any(r.request.options.do_sample for r in rows)
        options = RowOptions(
            **o,
            max_top_k=max((r.request.options.top_k for r in rows if r.request.options.do_sample), default=0),
            any_sample=sample,
        )
        seeded = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]
        chosen = choose(logits, self.seen[slots], options, self.generator if sample else None, seeded)
        idx = self._arange[: self.slots][slots]
        self.tok[idx] = chosen
        self.seen[idx, chosen] = True
        return chosen.tolist()  # the one sync of the step

    def _emit(self, row: Row, token: int, out: list[Output]) -> None:
        if token == self.eos:
            self._finish(row, "eos", out)
            return
        row.generated.append(token)
        if len(row.generated) >= row.max_new:
            self._finish(row, "length", out, token)
            return
        row.state = "running"
        out.append(Output(row, token))


def _pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()
