"""One question about one clip, end to end: audio → mel → features → prompt → streamed answer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..loading.load import LoadedModel
from ..model.generation import GenerationOptions


def ask_stream(
    loaded: LoadedModel,
    audio: np.ndarray | torch.Tensor,
    question: str,
    transcript: str | None = None,
    options: GenerationOptions | None = None,
) -> Iterator[str]:
    """Stream the answer's text pieces for one clip (`[samples]` float at 16 kHz; only the first 10 s are
    heard, while the log-mel floor still uses the whole clip, as in the reference)."""
    model, processor = loaded.model, loaded.processor
    features = model.audio_features(processor.mel(audio).unsqueeze(0))  # [1, L, T, D]
    ids = processor.encode(question, transcript)
    steps = model.stream(features, [ids], options, eos_token_id=processor.eos_token_id)
    yield from processor.stream_text(step[0] for step in steps)


def ask(
    loaded: LoadedModel,
    audio: np.ndarray | torch.Tensor,
    question: str,
    transcript: str | None = None,
    options: GenerationOptions | None = None,
) -> str:
    """The whole answer, stripped."""
    return "".join(ask_stream(loaded, audio, question, transcript, options)).strip()
