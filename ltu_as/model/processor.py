"""`LtuAsProcessor`: audio → mel, question + transcript → prompt token ids, token ids → text (also streamed)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelNotFoundError
from .audio import log_mel_spectrogram, pad_or_trim_mel
from .config import LtuAsConfig
from .prompt import build_prompt, extract_answer


class LtuAsProcessor:
    """Pairs the audio front end with the LLM tokenizer and the prompt template.

    Parameters
    ----------
    tokenizer: the LLM's tokenizer (a `PreTrainedTokenizerBase`, SentencePiece LLaMA tokenizer for Vicuna).
    config: the model's config (mel bins, frame count, sampling rate).
    """

    def __init__(self, tokenizer: Any, config: LtuAsConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_pretrained(cls, llm_folder: str | Path | None, config: LtuAsConfig) -> LtuAsProcessor:
        """Load the tokenizer saved in an LLM folder (`tokenizer.model` + `tokenizer_config.json`)."""
        from transformers import AutoTokenizer

        if llm_folder is None:  # a model built in memory has no folder to read a tokenizer from
            raise ModelNotFoundError("no LLM folder to load the tokenizer from; load the LLM from a folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(llm_folder))
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"no usable tokenizer in {llm_folder}: {e}") from e
        return cls(tokenizer, config)

    # --- audio -----------------------------------------------------------------------------------------------------
    def mel(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float waveform at 16 kHz, `[samples]` → `[n_mels, n_frames]` (`[80, 1000]`), mel padded/trimmed."""
        c = self.config
        mel = log_mel_spectrogram(audio, c.n_mels, c.n_fft, c.hop_length, c.sampling_rate)
        return pad_or_trim_mel(mel, c.n_frames)

    # --- text ------------------------------------------------------------------------------------------------------
    @staticmethod
    def build_prompt(question: str, transcript: str | None = None) -> str:
        return build_prompt(question, transcript)

    @staticmethod
    def extract_answer(text: str) -> str:
        return extract_answer(text)

    def encode(self, question: str, transcript: str | None = None) -> list[int]:
        """Prompt token ids, BOS first, no EOS (the reference's `add_eos_token=False`)."""
        ids = list(self.tokenizer(self.build_prompt(question, transcript), add_special_tokens=False)["input_ids"])
        return [self.bos_token_id, *ids]

    def encode_example(self, question: str, transcript: str | None, answer: str) -> tuple[list[int], int]:
        """A training sequence: BOS + prompt + answer tokenized together (as the reference does, so the answer's
        first word gets its SentencePiece space), and the length of the prompt part (for response-only loss).
        No EOS is appended (the reference's add_eos_token=False)."""
        full = [
            self.bos_token_id,
            *self.tokenizer(self.build_prompt(question, transcript) + answer, add_special_tokens=False)["input_ids"],
        ]
        return full, len(self.encode(question, transcript))

    def answer_rows(
        self, question: str, answers: Sequence[str], transcript: str | None = None, eos: bool = True
    ) -> list[tuple[list[int], int]]:
        """Each answer as a scored row: (BOS + prompt + answer [+ EOS] tokenized as in training, the number of
        answer tokens at its end). `eos`: the answer ends with EOS, as a `eos = true` fine-tune learned it."""
        rows = []
        for a in answers:
            full, n = self.encode_example(question, transcript, a)
            if eos:
                full = [*full, self.eos_token_id]
            rows.append((full, len(full) - n))
        return rows

    def answer_first_tokens(self, question: str, answers: Sequence[str], transcript: str | None = None) -> list[int]:
        """The first token of each answer as the model would produce it after this prompt (tokenized together
        with the prompt, as in training), deduplicated: the ids a yes/no decision compares."""
        n = len(self.encode(question, transcript))
        out: list[int] = []
        for a in answers:
            full, _ = self.encode_example(question, transcript, a)
            if len(full) > n and full[n] not in out:
                out.append(full[n])
        return out

    def yes_no_ids(self, question: str, transcript: str | None = None) -> tuple[list[int], list[int]]:
        """First-token ids of "Yes"/"yes" and "No"/"no" answers to `question`. Raises `ValueError` when the
        tokenizer cannot tell them apart."""
        yes = self.answer_first_tokens(question, ["Yes", "yes"], transcript)
        no = self.answer_first_tokens(question, ["No", "no"], transcript)
        if not yes or not no or set(yes) & set(no):
            raise ValueError(f"the tokenizer gives no distinct first tokens for yes {yes} and no {no}")
        return yes, no

    @functools.cached_property
    def template_start(self) -> tuple[int, ...]:
        """The ids every prompt starts with (BOS and the template's header up to the question): the common start of
        two prompts that differ from their first character on."""
        a, b = self.encode("A"), self.encode("z")
        return tuple(a[: _common_prefix_len(a, b)])

    def shared_prefix_len(self, ids: Sequence[int]) -> int:
        """How many of a prompt's leading `ids` are the template's start (what prompts about one window share)."""
        return _common_prefix_len(ids, self.template_start)

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream_text(self, tokens: Iterable[int | None]) -> Iterator[str]:
        """Turn a stream of token ids into text pieces as they become printable (see `TextStreamer`)."""
        streamer = TextStreamer(self.decode)
        for tok in tokens:
            if tok is not None and (piece := streamer.push(tok)):
                yield piece
        if piece := streamer.finish():
            yield piece


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class TextStreamer:
    """Incremental detokenisation of one row: `push` each new id and get the newly printable text (maybe "").

    Each new piece is the decoding of a short window of recent tokens minus the decoding of its already printed
    part, so SentencePiece word-initial spaces come out right and the cost stays constant per token. A piece is
    held back while it ends in an incomplete UTF-8 sequence (byte-fallback tokens).
    """

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read] were printed and give the context for the next piece

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        printed = self.decode(self.ids[self._prefix : self._read])
        text = self.decode(self.ids[self._prefix :])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(printed) :]
        return ""

    def finish(self) -> str:
        printed, text = self.decode(self.ids[self._prefix : self._read]), self.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(printed) :] if len(text) > len(printed) else ""
