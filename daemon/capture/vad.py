"""Utterance segmentation: webrtcvad on fixed frames, wrapped in a pure state machine (no asyncio, no clock).

An utterance opens after `start_ms` of consecutive voiced frames and begins `pre_roll_ms` before them, so the first
word's onset is kept. It is *confirmed* (gets an id) once it holds `min_speech_ms` of voiced frames; a blip that
ends earlier is discarded without a trace. It closes after `hangover_ms` of unvoiced frames, which are kept so the
last word's tail is too, or when it reaches `max_utterance_s` (music or a tone under the speech can keep the VAD
voiced for minutes). Then it is cut at the quietest `cut_window_ms` of its last `cut_search_ms` rather than at the
cap, so the cut falls between words (a cut through a word loses it on both sides), and the rest opens the next
utterance at once.

When a confirmed utterance has been unvoiced for `speculate_ms`, a `SilenceBegins` says so: the ASR can decode
the utterance now, while the hangover decides whether it really ended (the final then costs no decode time), and
the result is dropped if speech resumes.
All positions are sample indices on the stream clock (16 kHz).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..clock import SAMPLE_RATE, ms_to_samples, s_to_samples
from ..config import VadConfig


@dataclass(frozen=True)
class SpeechStart:
    """Utterance `index` (1, 2, … per stream) is confirmed; it began at sample `start`."""

    index: int
    start: int


@dataclass(frozen=True)
class SpeechEnd:
    """Utterance `index` covers samples [start, end); its last voiced frame ends at `speech_end`.
    `reason`: silence (hangover elapsed), max_length (cut at the cap) or flush (the stream stopped)."""

    index: int
    start: int
    end: int
    speech_end: int
    reason: Literal["silence", "max_length", "flush"]


@dataclass(frozen=True)
class SilenceBegins:
    """Utterance `index` (begun at `start`) has been unvoiced from `speech_end` to `at` (`speculate_ms`): if the
    hangover confirms the end, its `SpeechEnd` has this same `speech_end`."""

    index: int
    start: int
    speech_end: int
    at: int


VadEvent = SpeechStart | SpeechEnd | SilenceBegins


def webrtc_classifier(aggressiveness: int) -> Callable[[bytes], bool]:
    import webrtcvad

    vad = webrtcvad.Vad(aggressiveness)
    return lambda frame: vad.is_speech(frame, SAMPLE_RATE)


class Segmenter:
    """Feed audio in any block size; get `SpeechStart` / `SpeechEnd` events.

    `is_speech` classifies one frame of 16-bit PCM bytes (webrtcvad by default; tests may pass their own).
    """

    def __init__(self, options: VadConfig, is_speech: Callable[[bytes], bool] | None = None) -> None:
        self.o = options
        self.frame = ms_to_samples(options.frame_ms)
        self.start_frames = max(1, -(-ms_to_samples(options.start_ms) // self.frame))  # ceil
        self.hangover_frames = max(1, -(-ms_to_samples(options.hangover_ms) // self.frame))
        # 0: never speculate; otherwise after this many unvoiced frames (ceil), always before the hangover ends
        self.speculate_frames = (
            min(self.hangover_frames - 1, max(1, -(-ms_to_samples(options.speculate_ms) // self.frame)))
            if options.speculate_ms
            else 0
        )
        self.min_speech = ms_to_samples(options.min_speech_ms)
        self.pre_roll = ms_to_samples(options.pre_roll_ms)
        self.max_len = s_to_samples(options.max_utterance_s)
        self.cut_search = max(1, ms_to_samples(options.cut_search_ms) // self.frame)
        self.cut_window = max(1, ms_to_samples(options.cut_window_ms) // self.frame)
        # (voiced, mean square) of the open utterance's most recent frames, for choosing where a long one is cut
        self._frames: collections.deque[tuple[bool, float]] = collections.deque(maxlen=self.cut_search)
        self.is_speech = is_speech or webrtc_classifier(options.aggressiveness)
        self._pending = np.zeros(0, dtype=np.float32)
        self.pos = 0  # stream index of the first sample in _pending
        self._run = 0  # consecutive voiced frames while idle
        self._floor = 0  # an utterance never starts before the previous one's end
        self.index = 0
        self._open: dict[str, int] | None = None  # start, voiced, last_voiced_end, silence, confirmed

    @property
    def open_index(self) -> int | None:
        """Index of the confirmed utterance in progress, or None."""
        return self.index if self._open is not None and self._open["confirmed"] else None

    @property
    def in_silence(self) -> bool:
        """The open utterance has had at least one unvoiced frame since its last voiced one."""
        return self._open is not None and self._open["silence"] > 0

    @property
    def open_start(self) -> int | None:
        return self._open["start"] if self._open is not None and self._open["confirmed"] else None

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed [n] float32 samples (the next ones on the stream clock)."""
        buf = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        events: list[VadEvent] = []
        n = len(buf) // self.frame
        pcm = (np.clip(buf[: n * self.frame], -1, 1) * 32767).astype("<i2")
        power = np.mean(np.square(buf[: n * self.frame].reshape(n, self.frame)), axis=1) if n else []
        for i in range(n):
            f0 = self.pos + i * self.frame
            voiced = bool(self.is_speech(pcm[i * self.frame : (i + 1) * self.frame].tobytes()))
            self._frames.append((voiced, float(power[i])))
            self._step(voiced, f0, events)
        self._pending = buf[n * self.frame :]
        self.pos += n * self.frame
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: close a confirmed utterance at the last sample fed, drop an unconfirmed one."""
        events: list[VadEvent] = []
        u, self._open = self._open, None
        end = self.pos + len(self._pending)
        if u is not None and u["confirmed"]:
            events.append(SpeechEnd(self.index, u["start"], end, u["last"], "flush"))
        self._run = 0
        self._floor = end
        return events

    def _step(self, voiced: bool, f0: int, events: list[VadEvent]) -> None:
        f1 = f0 + self.frame
        u = self._open
        if u is None:
            self._run = self._run + 1 if voiced else 0
            if self._run >= self.start_frames:
                onset = f1 - self._run * self.frame
                start = max(self._floor, onset - self.pre_roll)
                self._open = {
                    "start": start,
                    "voiced": self._run * self.frame,
                    "last": f1,
                    "silence": 0,
                    "confirmed": 0,
                }
                self._run = 0
                self._confirm(events)
            return
        if voiced:
            u["voiced"] += self.frame
            u["last"] = f1
            u["silence"] = 0
            self._confirm(events)
        else:
            u["silence"] += 1
            if u["silence"] == self.speculate_frames and u["confirmed"]:
                events.append(SilenceBegins(self.index, u["start"], u["last"], f1))
        if u["silence"] >= self.hangover_frames:
            self._close(f1, "silence", events)
        elif f1 - u["start"] >= self.max_len:
            self._cut(f1, events)

    def _cut(self, f1: int, events: list[VadEvent]) -> None:
        """The open utterance reached the cap at `f1`: close it at the quietest point of its recent frames and
        open the next one with the frames after that point (confirmed at once if they hold enough speech)."""
        frames = list(self._frames)  # the newest ends at f1
        power = np.array([p for _, p in frames])
        w = min(self.cut_window, len(frames))
        # quietest window of `w` frames, the latest among equals (the least audio carried over), cut in its middle
        sums = np.convolve(power, np.ones(w), mode="valid")
        best = len(sums) - 1 - int(np.argmin(sums[::-1]))
        keep = len(frames) - (best + w // 2)  # frames after the cut, carried into the next utterance
        cut = f1 - keep * self.frame
        tail = frames[len(frames) - keep :] if keep else []
        u = self._open
        assert u is not None
        voiced_after = [i for i, (v, _) in enumerate(tail) if v]
        if voiced_after:  # the old utterance's last voiced frame is the last one before the cut
            before = [i for i, (v, _) in enumerate(frames[: len(frames) - keep]) if v]
            u["last"] = f1 - (len(frames) - before[-1] - 1) * self.frame if before else cut
        self._close(cut, "max_length", events)
        if not voiced_after:
            return
        self._open = {
            "start": cut,
            "voiced": len(voiced_after) * self.frame,
            "last": cut + (voiced_after[-1] + 1) * self.frame,
            "silence": keep - 1 - voiced_after[-1],
            "confirmed": 0,
        }
        self._confirm(events)

    def _confirm(self, events: list[VadEvent]) -> None:
        u = self._open
        assert u is not None
        if not u["confirmed"] and u["voiced"] >= self.min_speech:
            u["confirmed"] = 1
            self.index += 1
            events.append(SpeechStart(self.index, u["start"]))

    def _close(self, end: int, reason: Literal["silence", "max_length"], events: list[VadEvent]) -> None:
        u, self._open = self._open, None
        assert u is not None
        if u["confirmed"]:
            events.append(SpeechEnd(self.index, u["start"], end, min(u["last"], end), reason))
        self._floor = end
