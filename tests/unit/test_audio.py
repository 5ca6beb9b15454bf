"""Log-mel front end against an independent NumPy computation of openai-whisper's algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from ltu_as import LtuAsConfig, LtuAsProcessor
from ltu_as.model.audio import log_mel_spectrogram, pad_or_trim_mel


def numpy_log_mel(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """openai-whisper's log_mel_spectrogram in NumPy, then the mel padded/trimmed to n_frames."""
    n_fft, hop = 400, 160
    filters = WhisperFeatureExtractor(feature_size=80).mel_filters.T  # [80, 201], librosa slaney filters
    x = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    n = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[i * hop : i * hop + n_fft] * window for i in range(n)], axis=1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    mel = filters @ power[:, :-1]
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    log = (log + 4.0) / 4.0
    out = np.zeros((80, n_frames))
    k = min(n_frames, log.shape[1])
    out[:, :k] = log[:, :k]
    return out


@pytest.fixture()
def processor() -> LtuAsProcessor:
    return LtuAsProcessor(tokenizer=None, config=LtuAsConfig())


@pytest.mark.parametrize("seconds", [0.5, 3.7, 10.0, 14.2])
def test_mel_matches_numpy_reference(processor: LtuAsProcessor, seconds: float) -> None:
    rng = np.random.default_rng(int(seconds * 10))
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    audio = (0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    if seconds > 10:
        audio[12 * 16000 :] *= 20  # loud tail past 10 s: it still sets the max - 8 floor
    ours = processor.mel(audio).numpy()
    assert ours.shape == (80, 1000)
    np.testing.assert_allclose(ours, numpy_log_mel(audio, 1000), atol=2e-4)
    frames = min(n // 160, 1000)
    assert np.all(ours[:, frames:] == 0.0)  # padding is in the mel, as zeros


def test_short_clip_pads_the_mel_not_the_waveform(processor: LtuAsProcessor) -> None:
    audio = (0.1 * np.random.default_rng(0).standard_normal(3 * 16000)).astype(np.float32)
    mel_padded = processor.mel(audio)
    wave_padded = processor.mel(np.concatenate([audio, np.zeros(7 * 16000, np.float32)]))
    # Waveform padding puts log10(1e-10) → clamped floor values in the tail instead of zeros.
    assert torch.all(mel_padded[:, 300:] == 0)
    assert torch.all(wave_padded[:, 310:] < -0.1)
    assert torch.allclose(mel_padded[:, :290], wave_padded[:, :290], atol=1e-4)


def test_long_clip_floor_uses_whole_clip() -> None:
    quiet = np.full(16000 * 12, 1e-3, np.float32)
    loud = quiet.copy()
    loud[11 * 16000 :] = np.sin(np.arange(16000) / 3.0).astype(np.float32)  # loud only after 10 s
    a = pad_or_trim_mel(log_mel_spectrogram(quiet), 1000)
    b = pad_or_trim_mel(log_mel_spectrogram(loud), 1000)
    assert not torch.allclose(a, b)  # the loud tail raised the floor of the first 10 s


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros(16000, np.int16), "integer dtype"),
        (np.zeros((2, 16000), np.float32), "mono"),
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.0, np.nan] * 400, np.float32), "NaN"),
        (np.zeros(100, np.float32), "at least 201"),
    ],
)
def test_bad_audio_is_rejected_clearly(processor: LtuAsProcessor, audio: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        processor.mel(audio)
