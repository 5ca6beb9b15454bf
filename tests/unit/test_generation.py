"""Generation: cached == uncached, alone == in a left-padded batch, == transformers' own generate, EOS, streaming."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ltu_as import GenerationOptions

GREEDY = GenerationOptions(max_new_tokens=24).greedy()
QUESTIONS = [
    ("What sound is this?", "hello there"),
    ("Is the dog barking?", ""),
    ("Describe the sound scene in detail, please.", "we need to check the kitchen router now"),
]


@pytest.fixture()
def batch(loaded, clip):
    p = loaded.processor
    mels = torch.stack([p.mel(clip), p.mel(clip[: 16000 * 3]), p.mel(clip.flip(0))])
    feats = loaded.model.audio_features(mels)
    prompts = [p.encode(q, t) for q, t in QUESTIONS]
    assert len({len(x) for x in prompts}) == 3  # different lengths, so the batch really is padded
    return feats, prompts


def test_cache_and_no_cache_give_same_greedy_tokens(loaded, batch) -> None:
    feats, prompts = batch
    for i in range(3):
        cached = loaded.model.generate(feats[i : i + 1], [prompts[i]], GREEDY)
        uncached = loaded.model.generate(feats[i : i + 1], [prompts[i]], GREEDY.replace(use_cache=False))
        assert cached == uncached and len(cached[0]) == 24


def test_alone_and_in_left_padded_batch_give_same_greedy_tokens(loaded, batch) -> None:
    feats, prompts = batch
    batched = loaded.model.generate(feats, prompts, GREEDY)
    alone = [loaded.model.generate(feats[i : i + 1], [prompts[i]], GREEDY)[0] for i in range(3)]
    assert batched == alone
    assert len({tuple(x) for x in alone}) == 3  # the three requests really differ


def test_reference_mask_layout_breaks_padded_batches(loaded, batch) -> None:
    """The reference appends the audio mask after the text mask; with padding that masks the wrong positions."""
    model = loaded.model
    feats, prompts = batch
    embeds, mask, pos = model.assemble(model.audio_embeddings(feats), prompts)
    t = model.config.n_audio_tokens
    text_mask = mask[:, t:].clone()
    # Reference: [text mask of the padded text][ones for audio] while the embeddings are [audio][text].
    ref_mask = torch.cat([text_mask, torch.ones_like(mask[:, :t])], dim=1)
    with torch.no_grad():
        ours = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
        ref = model.llm(inputs_embeds=embeds, attention_mask=ref_mask).logits[:, -1]
        alone = model.llm(inputs_embeds=embeds[2:3, -(t + len(prompts[2])) :]).logits[:, -1]
    assert mask[0, 0] == 0 and mask[2].all()  # row 2 is the longest: unpadded
    torch.testing.assert_close(ours[2:3], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours[0], ref[0], atol=1e-3)  # padded row: the reference layout differs


def test_matches_transformers_generate(loaded, batch) -> None:
    """Independent decoder: transformers' own greedy `generate` over the same inputs_embeds."""
    feats, prompts = batch
    model = loaded.model
    opts = GREEDY.replace(repetition_penalty=1.0)  # HF generate cannot see the text ids when given embeds only
    embeds, mask, _ = model.assemble(model.audio_embeddings(feats), prompts)
    with torch.no_grad():
        hf = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
            min_new_tokens=24,
        )
    ours = model.generate(feats, prompts, opts.replace(max_new_tokens=24))
    assert [row[: len(ours[i])] for i, row in enumerate(hf.tolist())] == ours


def test_stops_on_eos(loaded, batch) -> None:
    feats, prompts = batch
    free = loaded.model.generate(feats[:1], prompts[:1], GREEDY)[0]
    assert loaded.model.generate(feats[:1], prompts[:1], GREEDY, eos_token_id=free[0]) == [[]]
    stop_at = next(i for i, tok in enumerate(free) if tok not in free[:i] and i >= 2)
    assert loaded.model.generate(feats[:1], prompts[:1], GREEDY, eos_token_id=free[stop_at]) == [free[:stop_at]]


def test_sampling_is_seeded_and_options_validated(loaded, batch) -> None:
    feats, prompts = batch
    opts = GenerationOptions(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.99, seed=7)
    a = loaded.model.generate(feats[:1], prompts[:1], opts)
    assert a == loaded.model.generate(feats[:1], prompts[:1], opts)
    assert a != loaded.model.generate(feats[:1], prompts[:1], opts.replace(seed=8))
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"max_new_tokens": 0}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            GenerationOptions(**bad)


def test_stream_yields_the_generated_tokens_step_by_step(loaded, batch) -> None:
    feats, prompts = batch
    steps = list(loaded.model.stream(feats, prompts, GREEDY))
    per_row = [[s[i] for s in steps if s[i] is not None] for i in range(3)]
    assert per_row == loaded.model.generate(feats, prompts, GREEDY)
    assert all(len(s) == 3 for s in steps)


def test_text_stream_never_splits_a_character(loaded) -> None:
    p = loaded.processor
    text = "A dog barks ☕ near the café."  # byte-fallback tokens for the non-ASCII characters
    ids = p.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = list(p.stream_text(ids))
    assert len(pieces) > 5 and "".join(pieces) == text.strip() == p.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_closing_the_stream_stops_decoding(loaded, batch) -> None:
    feats, prompts = batch
    calls = 0
    original = loaded.model.llm.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    loaded.model.llm.forward = counting
    try:
        stream = loaded.model.stream(feats[:1], prompts[:1], GREEDY)
        next(stream), next(stream)
        stream.close()
    finally:
        del loaded.model.llm.forward
    assert calls == 2


def test_shared_prefix_batch_equals_one_by_one(loaded) -> None:
    """Several questions about one clip: one prefill of audio + common prefix, the KV cache shared by every row,
    and the same greedy tokens as asking each alone."""
    model, processor = loaded.model, loaded.processor
    torch.manual_seed(3)
    features = torch.randn(1, *model.config.feature_shape)
    questions = ["What can be inferred from the audio?", "Is the dog barking?", "What did they say?", "Why?"]
    rows = [processor.encode(q, "the router needs a restart") for q in questions]
    options = GenerationOptions(max_new_tokens=12).greedy()
    alone = [model.generate(features, [r], options)[0] for r in rows]
    shared: list[list[int]] = [[] for _ in rows]
    for step in model.stream_shared(features, rows, options):
        for out, tok in zip(shared, step, strict=True):
            if tok is not None:
                out.append(tok)
    assert shared == alone
    assert all(len(a) > 0 for a in alone)
    # identical prompts too (the prefix then stops one token short of the end)
    same = list(model.stream_shared(features, [rows[0], rows[0]], options))
    assert [s[0] for s in same if s[0] is not None] == alone[0][: len(same)]


def test_text_only_generation_batched_equals_alone(loaded) -> None:
    """History answers and digests read text only: left-padded rows give the same tokens alone and together."""
    p = loaded.processor
    rows = [
        p.encode("What was said about the kettle?", "[kitchen 10:00] speech: the kettle is boiling"),
        p.encode("Summarise.", "nothing heard"),
    ]
    opts = GenerationOptions(max_new_tokens=6).greedy()
    together = loaded.model.generate_text(rows, opts, eos_token_id=p.eos_token_id)
    alone = [loaded.model.generate_text([r], opts, eos_token_id=p.eos_token_id)[0] for r in rows]
    assert together == alone and all(together)


def test_yes_probability_is_the_first_token_mass_of_yes_against_no(loaded, clip) -> None:
    import torch

    from ltu_as.model.generation import yes_probability

    p, m = loaded.processor, loaded.model
    feats = m.audio_features(p.mel(clip)[None])
    q = "Is a smoke alarm beeping?"
    ids = p.encode(q, "hello")
    logits = m.next_token_logits(feats, [ids])
    # the same logits as the first step of decoding
    first = m.generate(feats, [ids], GenerationOptions(max_new_tokens=1).greedy(), eos_token_id=-1)[0][0]
    assert int(logits[0].argmax()) == first
    yes, no = p.yes_no_ids(q, "hello")
    assert yes and no and not set(yes) & set(no)
    probs = torch.softmax(logits[0].double(), dim=-1)
    expected = float(probs[yes].sum() / (probs[yes].sum() + probs[no].sum()))
    assert float(yes_probability(logits, yes, no)[0]) == pytest.approx(expected, abs=1e-6)
