"""Audio front end: 16 kHz mono waveform → Whisper log-mel → padded/trimmed to the model's frame count.

The log-mel is computed exactly as openai-whisper computes it (80 slaney mel bins, n_fft 400, hop 160, Hann
window, centred STFT with the last frame dropped, `log10(clamp(mel, 1e-10))`, clamp to `max - 8`, `(x + 4) / 4`),
on the audio *as given*; then the **mel** is zero-padded or trimmed (LTU-AS reference, section 1). Padding the
waveform first gives a different result for clips shorter than 10 s.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank


@lru_cache(maxsize=8)
def _mel_filters_np(n_mels: int, n_fft: int, sampling_rate: int) -> np.ndarray:
    # Slaney-normalised, slaney-scale filters: what librosa (and so openai-whisper's mel_filters.npz) uses.
    return mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=sampling_rate / 2,
        sampling_rate=sampling_rate,
        norm="slaney",
        mel_scale="slaney",
    ).T.astype(np.float32)  # [n_mels, n_fft // 2 + 1]


def mel_filters(
    n_mels: int, n_fft: int = 400, sampling_rate: int = 16000, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Mel filter bank, `[n_mels, n_fft // 2 + 1]` float32."""
    return torch.from_numpy(_mel_filters_np(n_mels, n_fft, sampling_rate)).to(device)


def as_waveform(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Check and convert one clip to a 1-D float32 tensor (samples at 16 kHz, roughly in [-1, 1])."""
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind in "iu":
            raise ValueError(
                f"audio must be float samples in [-1, 1], got integer dtype {audio.dtype}; "
                "divide int16 PCM by 32768 first"
            )
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not torch.is_floating_point(audio):
        raise ValueError(f"audio must be a float tensor, got {audio.dtype}")
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(
            f"audio must be mono, shape [samples]; got shape {tuple(audio.shape)} (mix channels down first)"
        )
    if audio.numel() == 0:
        raise ValueError("audio is empty")
    if not torch.isfinite(audio).all():
        raise ValueError("audio contains NaN or inf samples")
    return audio.float()


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    n_fft: int = 400,
    hop_length: int = 160,
    sampling_rate: int = 16000,
) -> torch.Tensor:
    """Whisper log-mel of a whole clip.

    Parameters
    ----------
    audio: `[samples]` float waveform at `sampling_rate` Hz.

    Returns
    -------
    `[n_mels, samples // hop_length]` float32; the `max - 8` floor uses the maximum over the whole clip.
    """
    audio = as_waveform(audio)
    if audio.numel() <= n_fft // 2:
        raise ValueError(f"audio has {audio.numel()} samples; at least {n_fft // 2 + 1} are needed for one STFT frame")
    window = torch.hann_window(n_fft, device=audio.device)
    stft = torch.stft(audio, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2  # [n_fft // 2 + 1, frames]; the last frame is dropped as in whisper
    mel = mel_filters(n_mels, n_fft, sampling_rate, audio.device) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim_mel(mel: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Zero-pad or trim the last (time) axis of a mel to `n_frames` (LTU-AS pads the mel, not the waveform)."""
    frames = mel.shape[-1]
    if frames >= n_frames:
        return mel[..., :n_frames]
    return torch.nn.functional.pad(mel, (0, n_frames - frames))


class AudioTooLong(ValueError):
    """A file holds more audio than the caller allows (the message says how much it declares or holds)."""


def load_audio(path: str | BinaryIO, sampling_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Decode any file PyAV reads (a path, or a binary file object such as an upload in `io.BytesIO`) to
    `[samples]` float32 mono at `sampling_rate`. Raises on unreadable files and on files with no audio stream.
    (faster-whisper's `decode_audio` does the same but runs a full garbage collection per call, which dominates
    on short files.)

    `max_seconds` bounds the work a file can cause: a container that declares a longer duration raises
    `AudioTooLong` before anything is decoded, and decoding stops with `AudioTooLong` as soon as more than that
    much audio came out (for containers that declare nothing, or lie)."""
    import av

    limit = None if max_seconds is None else int(max_seconds * sampling_rate)
    with av.open(path, mode="r") as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        if max_seconds is not None:
            declared = _declared_seconds(container, stream)
            if declared is not None and declared > max_seconds:
                raise AudioTooLong(f"the file declares {declared:.1f} s of audio")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        parts: list[np.ndarray] = []
        held = 0
        for frame in container.decode(stream):
            for o in resampler.resample(frame):
                parts.append(o.to_ndarray().reshape(-1))
                held += len(parts[-1])
            if limit is not None and held > limit:
                raise AudioTooLong(f"more than {max_seconds:g} s of audio decoded")
        parts += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _declared_seconds(container: Any, stream: Any) -> float | None:
    """The audio duration a container's header states (the stream's, else the container's), if any."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:  # in AV_TIME_BASE units (microseconds)
        return float(container.duration) / 1_000_000
    return None
