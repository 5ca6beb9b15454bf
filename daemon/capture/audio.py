"""Audio values that travel from a source to its stream pipeline, PCM decoding for remote streams, and streaming
resampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import soxr

from ..clock import SAMPLE_RATE

PCM_FORMATS: dict[str, np.dtype[np.int16] | np.dtype[np.float32]] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}


@dataclass(frozen=True)
class AudioChunk:
    """`samples`: [n] float32 mono at 16 kHz in [-1, 1]; `wall`: Unix time (s) when its first sample was captured."""

    samples: np.ndarray
    wall: float


@dataclass(frozen=True)
class Gap:
    """Audio that never arrived (device lost, overflow): `duration_s` of wall time, `reason` for operators."""

    duration_s: float
    reason: str


SourceState = Literal["open", "lost", "reopening", "closed", "error"]


@dataclass(frozen=True)
class Status:
    """A source's state change (a `stream.status` event)."""

    state: SourceState
    detail: str = ""


class End:
    """A source's last item: the pipeline flushes the open utterance and stops."""


END = End()
SourceItem = AudioChunk | Gap | Status | End


class AudioFormatError(ValueError):
    """Bytes that are not whole frames of the announced PCM format."""


class Resampler:
    """Downmix to mono and resample a stream of blocks to 16 kHz, keeping filter state across blocks (soxr)."""

    def __init__(self, rate: int, channels: int = 1) -> None:
        self.rate, self.channels = rate, channels
        self._soxr = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """`block`: [frames] or [frames, channels] float32 → [frames'] float32 at 16 kHz."""
        x = np.asarray(block, dtype=np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
        if self._soxr is None:
            return np.ascontiguousarray(x)
        return self._soxr.resample_chunk(x, last=last)


def decode_pcm(data: bytes, fmt: str, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM → [frames, channels] float32. Raises `AudioFormatError` on a partial frame."""
    dtype = PCM_FORMATS[fmt]
    frame = dtype.itemsize * channels
    if len(data) == 0 or len(data) % frame:
        raise AudioFormatError(
            f"{len(data)} bytes is not a whole number of {fmt} frames of {channels} channel(s) ({frame} bytes each)"
        )
    x = np.frombuffer(data, dtype=dtype).reshape(-1, channels)
    if fmt == "s16le":
        return x.astype(np.float32) / 32768.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise AudioFormatError("f32le audio contains NaN or infinity")
    return x


def dbfs(power: float) -> float:
    """Mean power (of samples in [-1, 1]) → dBFS, floored at -120 dB for silence."""
    return float(10 * np.log10(max(power, 1e-12)))
