"""What the speech endpoints (Wyoming, the HTTP API) need from the daemon: `transcribe` a whole clip for a stream.
`speech.desk.SpeechDesk` is the implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class AsrBusy(RuntimeError):
    """The ASR queue stayed full: the request was not taken (the caller says "busy, retry")."""


@dataclass(frozen=True)
class Piece:
    """One decoded piece of a clip: [start_s, end_s) from the clip's start, and its text."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Heard:
    """A clip's transcript: its pieces' texts joined, the pieces with text, and the clip's length."""

    text: str
    pieces: list[Piece]
    duration_s: float


class Transcriber(Protocol):
    async def transcribe(self, stream: str, audio: np.ndarray, wall_end: float | None = None) -> Heard: ...
