"""Real speech for the tests and `bench/asr_peers.py`: espeak-ng sentences laid out with pauses, noise at a chosen
SNR, music (chords) under the speech, and the word error rate against the script.

espeak-ng speaks each sentence (22.05 kHz), sox resamples it to 16 kHz float32; leading and trailing silence is
trimmed, so each placed sentence's (start, end) is where its voice really starts and stops (±10 ms).
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16000

# Household sentences of plain words (no digits or names whose spelling Whisper may normalise differently).
SCRIPT = (
    "the kettle in the kitchen is boiling",
    "someone left the back door open again",
    "please turn off the lights in the hallway",
    "the washing machine finished its cycle",
    "the baby is crying in the bedroom",
    "can you check whether the garage is locked",
    "the dog wants to go outside now",
    "dinner will be ready in twenty minutes",
    "the smoke alarm needs a new battery",
    "there is a package waiting at the front door",
    "the heating is too warm in the living room",
    "remember to water the plants tomorrow morning",
)

# (espeak-ng voice, words per minute): two accents, a female variant, slow to fast
VOICES = (("en-us", 160), ("en", 175), ("en-us+f3", 145), ("en+m3", 190))


@dataclass(frozen=True)
class Placed:
    """A sentence in a clip: its words and where its voice starts and ends (s)."""

    text: str
    start_s: float
    end_s: float


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


@functools.lru_cache(maxsize=256)
def _say(text: str, voice: str, rate: int) -> bytes:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text], capture_output=True, check=True)
    raw = subprocess.run(
        ["sox", "-t", "wav", "-", "-r", str(RATE), "-c", "1", "-t", "raw", "-e", "floating-point", "-b", "32", "-"],
        input=wav.stdout,
        capture_output=True,
        check=True,
    )
    return raw.stdout


def say(text: str, voice: str = "en-us", rate: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng: [n] float32 at 16 kHz, peak 0.5, silence trimmed at both ends."""
    audio = np.frombuffer(_say(text, voice, rate), dtype=np.float32).copy()
    voiced = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    audio = audio[voiced[0] : voiced[-1] + 1]
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)


def conversation(
    sentences: tuple[str, ...] | list[str] = SCRIPT,
    *,
    pause_s: float = 2.0,
    lead_s: float = 1.0,
    tail_s: float = 2.0,
    voices: tuple[tuple[str, int], ...] = VOICES,
) -> tuple[np.ndarray, list[Placed]]:
    """The sentences one after another, voices and rates taking turns, with `pause_s` of silence between them,
    `lead_s` before the first and `tail_s` after the last. Returns ([n] float32, where each sentence is)."""
    parts = [np.zeros(round(lead_s * RATE), np.float32)]
    placed: list[Placed] = []
    at = len(parts[0])
    for i, text in enumerate(sentences):
        voice, rate = voices[i % len(voices)]
        speech = say(text, voice, rate)
        placed.append(Placed(text, at / RATE, (at + len(speech)) / RATE))
        gap = np.zeros(round((pause_s if i < len(sentences) - 1 else tail_s) * RATE), np.float32)
        parts += [speech, gap]
        at += len(speech) + len(gap)
    return np.concatenate(parts), placed


def with_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """`audio` plus white noise `snr_db` below the RMS of its voiced samples."""
    voiced = audio[np.abs(audio) > 1e-4]
    noise = np.random.default_rng(seed).standard_normal(len(audio)).astype(np.float32)
    noise *= float(np.sqrt(np.mean(voiced**2))) / 10 ** (snr_db / 20)
    return (audio + noise).astype(np.float32)


def music(seconds: float, seed: int = 0, level: float = 0.1) -> np.ndarray:
    """Piano-like chords: a new triad every 0.5 s with a decaying envelope and harmonics, peak about `level`."""
    rng = np.random.default_rng(seed)
    n, beat = round(seconds * RATE), RATE // 2
    t = np.arange(beat) / RATE
    env = np.exp(-4 * t) * np.minimum(1, t / 0.01)
    out = np.zeros(n + beat, np.float32)
    for at in range(0, n, beat):
        root = 220 * 2 ** (rng.integers(0, 12) / 12)
        for ratio in (1.0, 1.26, 1.5):
            for h, amp in ((1, 1.0), (2, 0.4), (3, 0.2)):
                out[at : at + beat] += amp * env * np.sin(2 * np.pi * root * ratio * h * t)
    out = out[:n]
    return (level * out / np.abs(out).max()).astype(np.float32)


def tones(seconds: float, freqs: tuple[float, ...] = (440.0, 880.0, 1000.0), level: float = 0.2) -> np.ndarray:
    """Beeps: each frequency for 0.4 s with 0.2 s gaps, cycling (an alarm or a microwave)."""
    n, on, period = round(seconds * RATE), round(0.4 * RATE), round(0.6 * RATE)
    out = np.zeros(n, np.float32)
    for k, at in enumerate(range(0, n, period)):
        m = min(on, n - at)
        out[at : at + m] = level * np.sin(2 * np.pi * freqs[k % len(freqs)] * np.arange(m) / RATE)
    return out


def wav_bytes(audio: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    """`audio` ([n] float32) as a 16-bit PCM WAV file, the same samples on every channel."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())
    return buf.getvalue()


def write_wav(path: Path, audio: np.ndarray) -> Path:
    """`audio` ([n] float32, 16 kHz) as a 16-bit mono WAV file at `path`."""
    path.write_bytes(wav_bytes(audio))
    return path


def read_wav(path: Path) -> np.ndarray:
    """What the daemon hears (16-bit quantised), so both sides decode the same samples."""
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


# Spellings Whisper may choose for the script's words, folded before scoring.
_FOLD = {"20": "twenty", "okay": "ok"}


def normalise(text: str) -> list[str]:
    """Lower case, punctuation and hyphens dropped, a few equivalent spellings folded: the words to score."""
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()
    return [_FOLD.get(w, w) for w in words]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate (substitutions + deletions + insertions) / reference words, after `normalise`."""
    import jiwer

    ref, hyp = " ".join(normalise(reference)), " ".join(normalise(hypothesis))
    if not hyp:
        return 1.0
    return float(jiwer.wer(ref, hyp))
