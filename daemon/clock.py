"""The stream clock, defined by the model: every stage after a source sees mono audio at LTU-AS's sample rate, and
a stream's sample `i` is at `i / SAMPLE_RATE` s. A window is what the model reads at once (10 s of 1000 mel
frames). Both come from `ltu_as`'s architecture config, so they are written down in exactly one place; the model
worker checks that the loaded checkpoint agrees."""

from __future__ import annotations

from ltu_as.model.config import LtuAsConfig

_ARCH = LtuAsConfig()
SAMPLE_RATE: int = _ARCH.sampling_rate  # Hz (16000: Whisper's)
WINDOW_SAMPLES: int = _ARCH.clip_samples  # samples per window (160000 = 10 s)


def ms_to_samples(ms: float) -> int:
    """Milliseconds → whole samples on the stream clock (rounded down)."""
    return int(ms * SAMPLE_RATE // 1000)


def s_to_samples(s: float) -> int:
    """Seconds → whole samples on the stream clock (rounded down)."""
    return int(s * SAMPLE_RATE)


def samples_to_s(n: int) -> float:
    """Samples → seconds on the stream clock, rounded to 0.1 ms (what events carry)."""
    return round(n / SAMPLE_RATE, 4)
