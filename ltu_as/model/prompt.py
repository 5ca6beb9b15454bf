"""The `alpaca_short` prompt template of the reference and answer extraction."""

from __future__ import annotations

RESPONSE_SEPARATOR = "### Response:\n"


def build_prompt(question: str, transcript: str | None = None) -> str:
    """The reference prompt: the question is the instruction, the Whisper transcript the input.

    >>> build_prompt("What sound is this?", "hello")
    '### Instruction:\\nWhat sound is this?\\n\\n### Input:\\nhello\\n\\n### Response:\\n'
    >>> build_prompt("What sound is this?", "")
    '### Instruction:\\nWhat sound is this?\\n\\n### Response:\\n'
    """
    if transcript:
        return f"### Instruction:\n{question}\n\n### Input:\n{transcript}\n\n{RESPONSE_SEPARATOR}"
    return f"### Instruction:\n{question}\n\n{RESPONSE_SEPARATOR}"


def extract_answer(text: str) -> str:
    """The answer in a decoded output: the text after `### Response:`, stripped (all of it when absent)."""
    _, sep, after = text.partition(RESPONSE_SEPARATOR.strip("\n"))
    return (after if sep else text).strip()
