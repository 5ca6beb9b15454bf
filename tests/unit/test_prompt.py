"""The alpaca_short prompt byte for byte, its tokenization, and answer extraction."""

from __future__ import annotations

from ltu_as import LtuAsProcessor
from ltu_as.model.prompt import build_prompt, extract_answer


def test_prompt_with_transcript_is_byte_exact() -> None:
    got = build_prompt("What can be inferred from the audio?", "we should check the kitchen")
    want = (
        b"### Instruction:\nWhat can be inferred from the audio?\n\n"
        b"### Input:\nwe should check the kitchen\n\n### Response:\n"
    )
    assert got.encode() == want


def test_prompt_without_transcript_is_byte_exact() -> None:
    for empty in ("", None):
        assert build_prompt("What sound is this?", empty).encode() == (
            b"### Instruction:\nWhat sound is this?\n\n### Response:\n"
        )


def test_answer_extraction() -> None:
    out = build_prompt("Q?", "hi") + "  A dog is barking.\n"
    assert extract_answer(out) == "A dog is barking."
    assert extract_answer("  just an answer ") == "just an answer"
    assert extract_answer("### Response:\n") == ""


def test_encode_has_bos_first_and_no_eos(loaded) -> None:
    p: LtuAsProcessor = loaded.processor
    ids = p.encode("What sound is this?", "hello there")
    assert ids[0] == p.bos_token_id == 1 and p.eos_token_id == 2 and 2 not in ids
    assert ids == p.tokenizer(build_prompt("What sound is this?", "hello there"))["input_ids"]
    assert p.decode(ids) == build_prompt("What sound is this?", "hello there")
