"""The decode engine against the model's own `stream` (the independent path: stock transformers forward with a
DynamicCache): the same greedy tokens alone, batched, joining and leaving mid-flight, sharing a prefix, cancelled,
preempted and resumed; sampling equal to transformers' processors; slots always returned."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ltu_as import GenerationOptions
from ltu_as.serving.engine import QUESTION, SCENE, DecodeEngine, PromptTooLong, Request
from ltu_as.serving.sampling import RowOptions, apply_penalty, warp

# the dynamic step (CPU default) and the static-shape step a CUDA graph captures (here run eagerly)
STATIC = pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
GREEDY = GenerationOptions(max_new_tokens=20).greedy()
QUESTIONS = [
    ("What sound is this?", "hello there"),
    ("Is the dog barking?", ""),
    ("Describe the sound scene in detail, please.", "we need to check the kitchen router now"),
    ("Who speaks?", "a short one"),
]


@pytest.fixture(scope="module")
def setup(loaded):
    """Two clips' audio tokens and four prompts of different lengths."""
    m, p = loaded.model, loaded.processor
    g = torch.Generator().manual_seed(3)
    clips = [0.3 * torch.randn(16000 * 6, generator=g), 0.2 * torch.sin(torch.arange(16000 * 4) / 9.0)]
    feats = m.audio_features(torch.stack([p.mel(c) for c in clips]))
    audio = m.audio_embeddings(feats).detach()
    prompts = [p.encode(q, t) for q, t in QUESTIONS]
    assert len({len(x) for x in prompts}) == 4
    return feats, audio, prompts


def reference(loaded, feats, prompt, options=GREEDY, clip=0):
    """What `stream` gives for one prompt alone (EOS excluded)."""
    p = loaded.processor
    return loaded.model.generate(feats[clip : clip + 1], [prompt], options, eos_token_id=p.eos_token_id)[0]


def engine(loaded, **kw: Any) -> DecodeEngine:
    kw = {"slots": 4, "max_positions": 256, "prefill_chunk": 16, **kw}
    return DecodeEngine(loaded.model.llm, eos_token_id=loaded.processor.eos_token_id, **kw)


def request(setup, i, options=GREEDY, clip=None, key=True, **kw: Any) -> Request:
    _, audio, prompts = setup
    c = i % 2 if clip is None else clip
    return Request(prompts[i], options, prefix_embeds=audio[c], prefix_key=f"w{c}" if key else None, shared=3, **kw)


def test_one_row_gives_the_same_greedy_tokens_as_stream(loaded, setup) -> None:
    feats, _, prompts = setup
    e = engine(loaded)
    assert e.run([request(setup, 0, key=False)]) == [reference(loaded, feats, prompts[0])]
    assert e.used == 0 and not e.waiting


@STATIC
def test_rows_of_different_lengths_in_one_batch(loaded, setup, static: bool) -> None:
    feats, _, prompts = setup
    expected = [reference(loaded, feats, prompts[i], clip=i % 2) for i in range(4)]
    assert len({tuple(x) for x in expected}) == 4  # the four really differ
    e = engine(loaded, static=static, prefill_chunk=1000)
    assert e.run([request(setup, i) for i in range(4)]) == expected
    # all four decoded together: one step per token once they were all prefilled
    assert e.counts["steps"] <= max(len(x) for x in expected) + 4


@STATIC
def test_rows_join_and_leave_mid_flight(loaded, setup, static: bool) -> None:
    feats, _, prompts = setup
    caps = [20, 5, 12, 20]
    e = engine(loaded, static=static, prefill_chunk=8)
    rows = [e.submit(request(setup, 0))]
    outputs = []
    for step in range(60):
        if step == 3:
            rows.append(e.submit(request(setup, 1, GREEDY.replace(max_new_tokens=caps[1]))))
        if step == 9:
            rows += [e.submit(request(setup, i, GREEDY.replace(max_new_tokens=caps[i]))) for i in (2, 3)]
        outputs += e.step()
        if step > 9 and not e.has_work():
            break
    for i, row in enumerate(rows):
        assert row.generated == reference(loaded, feats, prompts[i], GREEDY.replace(max_new_tokens=caps[i]), i % 2)
        assert row.state == "done"
    finished = {o.row.seq: o.finished for o in outputs if o.finished}
    assert len(finished) == 4 and set(finished.values()) <= {"eos", "length"}
    # the stream of outputs carries every token once, in order
    for row in rows:
        assert [o.token for o in outputs if o.row is row and o.token is not None] == row.generated


def test_shared_prefix_rows_reuse_the_window_kv(loaded, setup) -> None:
    feats, _, prompts = setup
    e = engine(loaded)
    got = e.run([request(setup, i, clip=0) for i in range(4)])
    assert got == [reference(loaded, feats, prompts[i], clip=0) for i in range(4)]
    assert e.counts["prefix_misses"] == 1 and e.counts["prefix_hits"] == 3
    # a later question about the same window skips its audio prefill altogether
    before = e.counts["prefill_tokens"]
    assert e.run([request(setup, 1, clip=0)]) == [reference(loaded, feats, prompts[1], clip=0)]
    assert e.counts["prefix_hits"] == 4
    assert e.counts["prefill_tokens"] - before == len(prompts[1]) - 3  # only what follows the shared start


@STATIC
def test_a_cancelled_row_leaves_the_others_unaffected(loaded, setup, static: bool) -> None:
    feats, _, prompts = setup
    e = engine(loaded, static=static)
    rows = [e.submit(request(setup, i)) for i in range(3)]
    outputs = []
    while len(rows[1].generated) < 3:
        outputs += e.step()
    e.cancel(rows[1])
    while e.has_work():
        outputs += e.step()
    assert [o.finished for o in outputs if o.row is rows[1] and o.finished] == ["cancelled"]
    assert 3 <= len(rows[1].generated) < 20
    for i in (0, 2):
        assert rows[i].generated == reference(loaded, feats, prompts[i], clip=i % 2)
    assert e.used == 0


@STATIC
def test_a_preempted_row_resumes_with_the_same_tokens(loaded, setup, static: bool) -> None:
    feats, _, prompts = setup
    e = engine(loaded, static=static, slots=1)
    scene = e.submit(request(setup, 2, priority=SCENE))
    while len(scene.generated) < 5:
        e.step()
    question = e.submit(request(setup, 0, priority=QUESTION))
    e.step()
    assert scene.state == "waiting" and question.state in ("prefill", "running")  # the question took the slot
    while e.has_work():
        e.step()
    assert e.counts["preempted"] == 1 and scene.preemptions == 1
    assert question.generated == reference(loaded, feats, prompts[0])
    assert scene.generated == reference(loaded, feats, prompts[2])


def test_text_rows_without_audio_equal_stream_text(loaded) -> None:
    p = loaded.processor
    prompts = [p.encode("Summarise: a dog barked twice."), p.encode("When did the kettle boil?", "at 7:02 am")]
    expected = [loaded.model.generate_text([x], GREEDY, eos_token_id=p.eos_token_id)[0] for x in prompts]
    assert engine(loaded).run([Request(x, GREEDY) for x in prompts]) == expected


def test_merged_lora_gives_the_unmerged_tokens(loaded, setup) -> None:
    feats, _, prompts = setup
    model = loaded.model
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(b.detach().abs().max()) > 0 for b in lora_b)  # the adapter really does something
    unmerged = engine(loaded).run([request(setup, i) for i in range(4)])
    model.merge_lora()
    try:
        merged = engine(loaded).run([request(setup, i) for i in range(4)])
    finally:
        model.unmerge_lora()
    assert merged == unmerged == [reference(loaded, feats, prompts[i], clip=i % 2) for i in range(4)]
    with model.language_model.disable_adapter():
        without = engine(loaded).run([request(setup, i) for i in range(4)])
    assert without != unmerged  # so the equality above is about the adapter, not a no-op


def test_sampling_with_a_seed_is_reproducible_alone_or_in_a_batch(loaded, setup) -> None:
    sampled = GenerationOptions(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    alone = engine(loaded).run([request(setup, 0, sampled)])[0]
    again = engine(loaded, seed=123).run([request(setup, 1), request(setup, 0, sampled), request(setup, 3)])[1]
    assert alone == again and len(alone) > 0
    other = engine(loaded).run([request(setup, 0, sampled.replace(seed=8))])[0]
    assert other != alone


def test_filtered_distributions_equal_transformers_processors() -> None:
    g = torch.Generator().manual_seed(0)
    rows, vocab = 5, 300
    logits = torch.randn(rows, vocab, generator=g) * 3
    history = [torch.randint(0, vocab, (1, n), generator=g) for n in (1, 7, 30, 4, 12)]
    opts = [  # (penalty, temperature, top_k, top_p)
        (1.1, 0.1, 500, 0.95),
        (1.3, 0.7, 20, 1.0),
        (1.0, 1.0, 0, 0.5),
        (2.0, 1.5, 5, 0.8),
        (1.1, 1.0, 0, 1.0),
    ]
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for i, h in enumerate(history):
        seen[i, h[0]] = True
    o = RowOptions(
        penalty=torch.tensor([x[0] for x in opts]),
        temperature=torch.tensor([x[1] for x in opts]),
        top_k=torch.tensor([x[2] for x in opts]),
        top_p=torch.tensor([x[3] for x in opts]),
        sample=torch.ones(rows, dtype=torch.bool),
        max_top_k=max(x[2] for x in opts),
        any_sample=True,
    )
    ours = warp(apply_penalty(logits, seen, o.penalty), o)
    for i, (pen, temp, k, p) in enumerate(opts):
        x = logits[i : i + 1].clone()
        if pen != 1.0:
            x = RepetitionPenaltyLogitsProcessor(pen)(history[i], x)
        if temp != 1.0:
            x = TemperatureLogitsWarper(temp)(None, x)
        if k > 0:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(None, x)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(x[0])), i  # the same tokens filtered out
        torch.testing.assert_close(ours[i].softmax(-1), x[0].softmax(-1), rtol=1e-6, atol=1e-7)
    assert torch.isinf(ours[2]).sum() > 0 and torch.isinf(ours[3]).sum() >= vocab - 5  # filters really filtered


def test_slots_are_returned_over_a_thousand_jobs(loaded, setup) -> None:
    e = engine(loaded, slots=3, prefix_cache=4)
    short = GREEDY.replace(max_new_tokens=2)
    k_ptr, size = e.k.data_ptr(), e.k.numel()
    done = 0
    for batch in range(250):
        rows = [e.submit(request(setup, i, short, clip=0, key=True)) for i in range(4)]
        rows[0].request.prefix_key = f"w{batch}"  # new windows come and go through the bounded prefix cache
        if batch % 7 == 0:
            e.cancel(rows[2])
        while e.has_work():
            e.step()
        done += sum(r.state == "done" for r in rows)
    assert done == 1000 and e.used == 0 and not e.waiting and e.owner == [None] * 3
    assert len(e.prefixes) <= 4 and e.k.data_ptr() == k_ptr and e.k.numel() == size


def test_slot_end_and_prompts_too_long(loaded, setup) -> None:
    _, _, prompts = setup
    e = engine(loaded, max_positions=25 + len(prompts[1]) + 3)
    row = e.submit(request(setup, 1, GREEDY.replace(max_new_tokens=100)))
    outs = []
    while e.has_work():
        outs += e.step()
    assert len(row.generated) <= 3 and outs[-1].finished in ("length", "eos")
    with pytest.raises(PromptTooLong, match="max_positions"):
        e.submit(request(setup, 2))


def test_one_choice_and_one_host_copy_per_step(loaded, setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows finishing their prefill get their first token in the same choice as the decoding rows: `_choose`
    (the one place that copies tokens to the host) runs at most once per step, however many rows join."""
    calls: list[int] = []
    original = DecodeEngine._choose

    def counting(self: DecodeEngine, rows: Any, logits: torch.Tensor, slots: Any) -> list[int]:
        calls.append(len(rows))
        return original(self, rows, logits, slots)

    monkeypatch.setattr(DecodeEngine, "_choose", counting)
    e = engine(loaded, prefill_chunk=1000)
    e.submit(request(setup, 0))
    for step in range(40):
        if step == 2:  # three newcomers finish their prefill in the same step as row 0 decodes
            for i in (1, 2, 3):
                e.submit(request(setup, i))
        before = len(calls)
        e.step()
        assert len(calls) - before <= 1
        if not e.has_work():
            break
    assert 4 in calls  # one choice covered the decoding row and the three fresh ones


def test_a_departing_row_costs_one_move(loaded, setup) -> None:
    """The running rows stay in slots 0..R-1 by moving the last running row into a departed row's slot: one move
    per departure, whatever slot it left (the earlier layout shifted every later row). Eight rows join together
    (row i in slot i, where it starts decoding: no move) and leave front first; every slot exchange is counted,
    and the tokens stay right."""
    feats, _, prompts = setup
    caps = [4, 7, 10, 13, 16, 19, 22, 25]  # row 0, in slot 0, ends first
    e = engine(loaded, slots=8, prefill_chunk=4000)
    rows = [e.submit(request(setup, i % 4, GREEDY.replace(max_new_tokens=caps[i]))) for i in range(8)]
    copies: list[tuple[int, int]] = []  # every slot exchange
    original = e._exchange

    def spy(a: int, b: int) -> None:
        copies.append((a, b))
        original(a, b)

    e._exchange = spy  # type: ignore[method-assign]
    departures = 0
    while e.has_work():
        before = sum(r.state == "done" for r in rows)
        e.step()
        departures += sum(r.state == "done" for r in rows) - before
        if e.counts["steps"] == 1:
            assert [r.slot for r in rows] == list(range(8)) and not copies
    assert departures == 8
    # each departure from the front cost one move (the old layout: one per row behind it, 28 here)
    assert 0 < len(copies) == e.counts["moves"] <= departures
    assert e.counts["moved_positions"] > 0 and e.used == 0
    for i, row in enumerate(rows):
        assert row.generated == reference(loaded, feats, prompts[i % 4], GREEDY.replace(max_new_tokens=caps[i]), i % 2)


def test_each_departure_is_one_move_in_a_full_batch(loaded, setup) -> None:
    """Eight rows run; the row in slot 0 leaves first: one row (the last) moves into slot 0, not seven."""
    e = engine(loaded, slots=8, prefill_chunk=4000)
    long = GREEDY.replace(max_new_tokens=30)
    rows = [e.submit(request(setup, i % 4, long)) for i in range(8)]
    while any(r.state != "running" for r in rows):
        e.step()
    assert sorted(r.slot for r in rows) == list(range(8)) and e.counts["moves"] == 0
    front = next(r for r in rows if r.slot == 0)
    back = next(r for r in rows if r.slot == 7)
    filled = back.filled
    e.cancel(front)
    e.step()
    assert e.counts["moves"] == 1 and back.slot == 0 and e.counts["moved_positions"] == filled
    e.cancel(next(r for r in rows if r.slot == 6))  # the last slot leaving moves nobody
    e.step()
    assert e.counts["moves"] == 1


@pytest.mark.parametrize("key", [True, False], ids=["cached-prefix", "no-prefix"])
def test_batched_prefill_equals_row_by_row(loaded, setup, key: bool) -> None:
    """Four prompts of different lengths prefilled in one padded forward give the KV, the first-token logits and
    the tokens of the same prompts prefilled one row per forward (and of the model's own `stream`)."""
    feats, _, prompts = setup
    engines = {n: engine(loaded, prefill_chunk=4000, prefill_rows=n) for n in (1, 4)}
    rows = {n: [e.submit(request(setup, i, key=key)) for i in range(4)] for n, e in engines.items()}
    firsts: dict[int, list[Any]] = {}
    for n, e in engines.items():
        captured: list[torch.Tensor] = []
        original = e._prefill

        def spy(original=original, captured=captured):  # type: ignore[no-untyped-def]
            fresh = original()
            captured += [lg for _, lg in fresh]
            return fresh

        e._prefill = spy  # type: ignore[method-assign]
        while any(r.state != "running" for r in rows[n]):
            e.step()
        firsts[n] = captured
    # one forward per row against one for all four
    assert engines[1].counts["prefill_forwards"] == 4 and engines[4].counts["prefill_forwards"] == 1
    for a, b in zip(rows[1], rows[4], strict=True):
        n = a.prompt_len  # the prompt's KV (rows prefilled earlier have decoded a step or more since)
        torch.testing.assert_close(engines[4].k[:, b.slot, :, :n], engines[1].k[:, a.slot, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(engines[4].v[:, b.slot, :, :n], engines[1].v[:, a.slot, :, :n], atol=1e-5, rtol=1e-4)
    for x, y in zip(firsts[1], firsts[4], strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    for e in engines.values():
        while e.has_work():
            e.step()
    for i in range(4):
        assert rows[1][i].generated == rows[4][i].generated == reference(loaded, feats, prompts[i], clip=i % 2)


def test_an_uncached_prefix_is_prefilled_in_one_pass(loaded, setup) -> None:
    """A question about a new window: prefix and question in one forward, and the prefix's KV is kept for the
    next question about that window, which then prefills only its own positions."""
    feats, _, prompts = setup
    e = engine(loaded, prefill_chunk=4000)
    first = e.submit(request(setup, 0))
    e.step()
    assert e.counts["prefill_forwards"] == 1 and e.counts["prefix_misses"] == 1 and len(e.prefixes) == 1
    assert e.counts["prefill_tokens"] == first.prompt_len
    second = e.submit(request(setup, 2))  # the same window (clip 0), another question
    while e.has_work():
        e.step()
    assert e.counts["prefix_hits"] == 1 and e.counts["prefill_tokens"] == first.prompt_len + second.prompt_len - 28
    assert second.generated == reference(loaded, feats, prompts[2], clip=0)


class _FakeGraph:
    """Stands in for `torch.cuda.CUDAGraph` on CPU (no CUDA here): `replay` reruns the captured static step into
    the same output buffer, as a replay recomputes into the graph's own memory."""

    def __init__(self, run: Any, out: torch.Tensor) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        self.out.copy_(self.run())


def _fake_capture(self: DecodeEngine, b: int, span: int) -> tuple[Any, torch.Tensor]:
    out = self._static_forward(b, span)
    return _FakeGraph(lambda: self._static_forward(b, span), out), out


def test_graph_buckets_are_captured_up_front_bounded_and_reported(
    loaded, setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`warm()` captures every (rows, span) bucket before any work, at most `max_graphs`; steps then replay them
    without a late capture; the counts say how many. (The capture is a CPU stand-in: no CUDA here.)"""
    feats, _, prompts = setup
    monkeypatch.setattr(DecodeEngine, "_capture", _fake_capture)
    e = engine(loaded, slots=4, max_positions=200, static=True)
    e.graphs = True
    assert e.buckets() == [(b, s) for s in (64, 128, 200) for b in (1, 2, 4)]
    assert e.buckets(rows=2, length=100) == [(1, 64), (2, 64), (1, 128), (2, 128)]
    assert e.warm() == 9 and e.counts["graphs"] == 9 and e.counts["late_captures"] == 0
    rows = [e.submit(request(setup, i)) for i in range(4)]
    while e.has_work():
        e.step()
    assert e.counts["graphs"] == 9 and e.counts["late_captures"] == 0 and e.graphs
    for i, row in enumerate(rows):
        assert row.generated == reference(loaded, feats, prompts[i], clip=i % 2)

    bounded = engine(loaded, slots=4, max_positions=200, static=True, max_graphs=4)
    bounded.graphs = True
    assert bounded.warm() == 4
    rows = [bounded.submit(request(setup, i)) for i in range(4)]
    while bounded.has_work():
        bounded.step()
    assert bounded.counts["graphs"] == 4 and bounded.counts["late_captures"] == 0  # the rest ran eagerly
    for i, row in enumerate(rows):
        assert row.generated == reference(loaded, feats, prompts[i], clip=i % 2)


def test_a_failed_capture_is_reported_and_decoding_goes_on(loaded, setup, monkeypatch: pytest.MonkeyPatch) -> None:
    feats, _, prompts = setup

    def broken(self: DecodeEngine, b: int, span: int) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeEngine, "_capture", broken)
    e = engine(loaded, static=True)
    e.graphs = True
    assert e.warm() == 0
    assert not e.graphs and e.counts["graph_failures"] == 1 and "not permitted" in (e.graph_error or "")
    row = e.submit(request(setup, 0))
    while e.has_work():
        e.step()
    assert row.generated == reference(loaded, feats, prompts[0])


def test_the_most_urgent_newcomer_is_prefilled_first(loaded, setup) -> None:
    """Prefill budget goes by priority then age, not by slot: a question submitted after three scenes, in the same
    step, gets its first token before any of them (prefill_chunk 16 makes each prompt take several steps)."""
    feats, _, prompts = setup
    e = engine(loaded, prefill_chunk=16)
    scenes = [e.submit(request(setup, i, priority=SCENE)) for i in (1, 2, 3)]
    question = e.submit(request(setup, 0, priority=QUESTION))
    while not question.generated:
        e.step()
        assert not any(s.generated for s in scenes)
    while e.has_work():
        e.step()
    assert question.generated == reference(loaded, feats, prompts[0])
    for i, s in zip((1, 2, 3), scenes, strict=True):
        assert s.generated == reference(loaded, feats, prompts[i], clip=i % 2)
