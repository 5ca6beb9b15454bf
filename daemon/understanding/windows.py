"""Cutting a stream into LTU-AS windows: 10 s of audio (the model's input length) every `windows.hop_s`, each
with the final-transcript text that overlaps it (the LTU-AS "input").

A window closes once the audio has passed its end and every utterance that may overlap it has its final, so its
transcript is complete; an utterance still open `windows.settle_max_s` after the window's end no longer holds it.
When the stream ends, its last window is the 10 s up to the end (overlapping the one before), so no audio is left
out of every window.
`Windower` is pure: positions are sample indices on the stream clock (`daemon.clock`). `StreamWindows` keeps a
stream's recent windows for questions (bounded by `windows.keep`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..clock import WINDOW_SAMPLES, s_to_samples, samples_to_s
from ..delivery.events import Evidence, WindowRef


@dataclass(frozen=True)
class Window:
    """Samples [start, end) of `stream`; `id` is `<stream>:w<index>`."""

    stream: str
    index: int
    start: int
    end: int
    transcript: str
    wall_start: float | None = None  # Unix time of the first and last sample, when known
    wall_end: float | None = None

    @property
    def id(self) -> str:
        return f"{self.stream}:w{self.index}"

    def evidence(self) -> Evidence:
        """How history answers and alerts cite this window."""
        return Evidence(
            id=self.id,
            stream=self.stream,
            start=samples_to_s(self.start),
            end=samples_to_s(self.end),
            wall_start=self.wall_start,
            wall_end=self.wall_end,
        )

    def ref(self) -> WindowRef:
        """How events and answers name this window."""
        return WindowRef(
            id=self.id,
            stream=self.stream,
            start=samples_to_s(self.start),
            end=samples_to_s(self.end),
            transcript=self.transcript,
        )


MIN_LAST_WINDOW = s_to_samples(0.5)  # a stream that ended with less audio than this gets no window


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

    def ready(self, audio_end: int, unresolved_start: int | None, ended: bool = False) -> list[Window]:
        """Windows that can close now. `audio_end`: samples heard; `unresolved_start`: start of the earliest
        utterance that has no final yet (open in the VAD or waiting for the ASR), or None; `ended`: the stream
        has ended (no utterance can be confirmed later, so no margin is kept)."""
        out = []
        margin = 0 if ended else self.margin
        while True:
            start, end = self.next_start, self.next_start + self.length
            if audio_end < end + margin:
                break
            waiting = unresolved_start is not None and unresolved_start < end
            if waiting and audio_end < end + self.settle_max:
                break
            self.index += 1
            out.append(Window(self.stream, self.index, start, end, self.transcript(start, end)))
            self.next_start += self.hop
        while self._finals and self._finals[0][1] <= self.next_start - self.length:
            self._finals.popleft()  # no later window (nor the last one, see `last`) can overlap it
        return out

    def last(self, audio_end: int) -> Window | None:
        """The stream ended at `audio_end` (every final in): its last window, the 10 s up to the end (from 0 for
        a stream shorter than that), if audio after the last window's start was never in a window; else None."""
        if audio_end <= self.next_start or audio_end < MIN_LAST_WINDOW:
            return None
        start = max(0, audio_end - self.length)
        self.index += 1
        self.next_start = audio_end
        return Window(self.stream, self.index, start, audio_end, self.transcript(start, audio_end))


class StreamWindows:
    """One stream's newest `keep` windows (oldest forgotten first) and access to their audio while the stream's
    ring still holds it. What a question needs to find its window."""

    def __init__(self, name: str, keep: int, read_audio: Callable[[int, int], np.ndarray]) -> None:
        """`read_audio(start, end)`: samples of the stream; raises `IndexError` once they were overwritten."""
        self.name, self.keep = name, keep
        self._read = read_audio
        self._windows: collections.OrderedDict[str, Window] = collections.OrderedDict()  # newest last

    def __len__(self) -> int:
        return len(self._windows)

    def add(self, w: Window) -> None:
        self._windows[w.id] = w
        while len(self._windows) > self.keep:
            self._windows.popitem(last=False)

    def get(self, window_id: str) -> Window | None:
        return self._windows.get(window_id)

    def latest(self) -> Window | None:
        return next(reversed(self._windows.values()), None)

    def at(self, t: float) -> Window | None:
        """The newest window whose range holds stream time `t` (s)."""
        i = s_to_samples(t)
        return next((w for w in reversed(self._windows.values()) if w.start <= i < w.end), None)

    def audio(self, w: Window) -> np.ndarray | None:
        """`[WINDOW_SAMPLES]` float32 of the window, or None once the ring has overwritten it."""
        try:
            return self._read(w.start, w.end)
        except IndexError:
            return None
