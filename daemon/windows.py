"""Cutting a stream into LTU-AS windows: 10 s of audio (the model's input length) every `windows.hop_s`, each
with the final-transcript text that overlaps it (the LTU-AS "input").

A window closes once the audio has passed its end and every utterance that may overlap it has its final, so its
transcript is complete; an utterance still open `windows.settle_max_s` after the window's end no longer holds it.
Pure: positions are sample indices on the stream clock (16 kHz).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from .config import SAMPLE_RATE

WINDOW_SAMPLES = 10 * SAMPLE_RATE  # LTU-AS hears 1000 mel frames of 10 ms: 10 s


@dataclass(frozen=True)
class Window:
    """Samples [start, end) of `stream`; `id` is `<stream>:w<index>`."""

    stream: str
    index: int
    start: int
    end: int
    transcript: str

    @property
    def id(self) -> str:
        return f"{self.stream}:w{self.index}"


class Windower:
    def __init__(self, stream: str, hop: int, settle_max: int, margin: int, length: int = WINDOW_SAMPLES) -> None:
        """`hop`, `settle_max` (samples): see the module docstring. `margin` (samples): how far past a window's end
        the VAD may still confirm an utterance that began inside it (its start_ms + min_speech_ms + pre-roll)."""
        self.stream, self.hop, self.settle_max, self.margin, self.length = stream, hop, settle_max, margin, length
        self.next_start = 0
        self.index = 0
        self._finals: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=4096)

    def add_final(self, start: int, end: int, text: str) -> None:
        self._finals.append((start, end, text))

    def transcript(self, start: int, end: int) -> str:
        """Texts of the finals overlapping [start, end), in order."""
        return " ".join(t for s, e, t in sorted(self._finals) if s < end and e > start and t)

    def ready(self, audio_end: int, unresolved_start: int | None) -> list[Window]:
        """Windows that can close now. `audio_end`: samples heard; `unresolved_start`: start of the earliest
        utterance that has no final yet (open in the VAD or waiting for the ASR), or None."""
        out = []
        while True:
            start, end = self.next_start, self.next_start + self.length
            if audio_end < end + self.margin:
                break
            waiting = unresolved_start is not None and unresolved_start < end
            if waiting and audio_end < end + self.settle_max:
                break
            self.index += 1
            out.append(Window(self.stream, self.index, start, end, self.transcript(start, end)))
            self.next_start += self.hop
        while self._finals and self._finals[0][1] <= self.next_start:
            self._finals.popleft()  # no later window can overlap it
        return out
