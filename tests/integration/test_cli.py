"""`ltu-as ask` end to end as a subprocess: PyAV decoding, real faster-whisper on the converted tiny model,
the tiny LTU-AS model loaded from the authors' layout, the answer streamed to stdout."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from faster_whisper import decode_audio

from ltu_as import GenerationOptions, load_model
from ltu_as.serving.pipeline import ask
from ltu_as.serving.transcribe import AsrOptions, load_asr, transcribe

pytestmark = pytest.mark.integration
QUESTION = "What can be inferred from the audio?"


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    """12 s stereo 22.05 kHz int16 WAV: the CLI must resample and mix down (and hear only the first 10 s)."""
    rate = 22050
    t = np.arange(12 * rate) / rate
    rng = np.random.default_rng(0)
    left = 0.3 * np.sin(2 * np.pi * 330 * t) * (t % 1 < 0.5) + 0.02 * rng.standard_normal(t.size)
    right = 0.2 * np.sign(np.sin(2 * np.pi * 5 * t)) * 0.1 + 0.02 * rng.standard_normal(t.size)
    pcm = (np.stack([left, right], 1) * 32767).astype("<i2")
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    exe = [sys.executable, "-m", "ltu_as"] if module else [str(Path(sys.executable).parent / "ltu-as")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300, env=env)


def model_args(tiny) -> list[str]:
    return [
        "--checkpoint",
        str(tiny.checkpoint),
        "--whisper",
        str(tiny.whisper),
        "--llm",
        str(tiny.llm),
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize("module", [False, True], ids=["ltu-as", "python -m ltu_as"])
def test_ask_streams_the_same_answer_as_the_library(tiny, loaded, wav: Path, module: bool) -> None:
    proc = run_cli(
        "ask",
        "--audio",
        str(wav),
        "--question",
        QUESTION,
        *model_args(tiny),
        "--asr-model",
        str(tiny.whisper_ct2),
        "--asr-beam-size",
        "1",
        "--asr-max-new-tokens",
        "20",
        "--greedy",
        "--max-new-tokens",
        "16",
        module=module,
    )
    assert proc.returncode == 0, proc.stderr
    # Independent path: decode, transcribe with faster-whisper, and ask in this process.
    audio = decode_audio(str(wav), sampling_rate=16000)
    assert audio.shape == (12 * 16000,)
    transcript = transcribe(load_asr(tiny.whisper_ct2, device="cpu"), audio, AsrOptions(beam_size=1, max_new_tokens=20))
    assert f"transcript: {transcript!r}" in proc.stderr
    expected = ask(loaded, audio, QUESTION, transcript, GenerationOptions(max_new_tokens=16).greedy())
    assert expected and proc.stdout.strip() == expected


def test_ask_with_int8_weights_answers_like_the_library_quantized(tiny, wav: Path) -> None:
    proc = run_cli(
        "ask",
        "--audio",
        str(wav),
        "--question",
        QUESTION,
        "--transcript",
        "the dog is barking",
        *model_args(tiny),
        "--quantization",
        "int8",
        "--greedy",
        "--max-new-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    q = load_model(
        tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", quantization="int8", progress=False
    )
    audio = decode_audio(str(wav), sampling_rate=16000)
    expected = ask(q, audio, QUESTION, "the dog is barking", GenerationOptions(max_new_tokens=8).greedy())
    assert expected and proc.stdout.strip() == expected


def test_given_transcript_skips_asr(tiny, loaded, wav: Path) -> None:
    proc = run_cli(
        "ask",
        "--audio",
        str(wav),
        "--question",
        QUESTION,
        "--transcript",
        "the dog is barking",
        *model_args(tiny),
        "--asr-model",
        "/nonexistent",
        "--greedy",
        "--max-new-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    audio = decode_audio(str(wav), sampling_rate=16000)
    assert proc.stdout.strip() == ask(
        loaded, audio, QUESTION, "the dog is barking", GenerationOptions(max_new_tokens=8).greedy()
    )


def test_bad_inputs_exit_with_clear_errors(tiny, tmp_path: Path, wav: Path) -> None:
    missing = run_cli("ask", "--audio", str(tmp_path / "none.wav"), "--question", "q", "--no-transcript")
    assert missing.returncode == 2 and "no such audio file" in missing.stderr
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio" * 10)
    bad = run_cli("ask", "--audio", str(junk), "--question", "q", "--no-transcript")
    assert bad.returncode == 2 and "cannot decode" in bad.stderr
    no_ckpt = run_cli(
        "ask",
        "--audio",
        str(wav),
        "--question",
        "q",
        "--no-transcript",
        *model_args(tiny)[2:],
        "--checkpoint",
        str(tmp_path / "missing.bin"),
    )
    assert no_ckpt.returncode == 3 and "missing.bin" in no_ckpt.stderr
    opts = run_cli("ask", "--audio", str(wav), "--question", "q", "--no-transcript", "--top-p", "0")
    assert opts.returncode == 2 and "top_p" in opts.stderr
