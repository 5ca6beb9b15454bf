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
