"""Microphone capture for real: sounddevice (PortAudio → ALSA → PulseAudio) records a virtual microphone into
which the test plays audio with paplay. The pulse device runs at 44.1 kHz, so the daemon's resampler is in the
path too."""

from __future__ import annotations

import asyncio
import json
import os
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import Daemon, tiny_asr_config
from pulse import Pulse
from websockets.asyncio.client import connect

from daemon.capture.audio import AudioChunk, Gap, Status
from daemon.config import MicStream

pytestmark = pytest.mark.integration
SR = 16000


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    p = Pulse(tmp_path_factory.mktemp("pulse"))
    p.start()
    saved = {k: os.environ.get(k) for k in p.env}
    os.environ.update(p.env)  # PortAudio reads these when it (re)initialises
    import sounddevice as sd

    sd._terminate()  # PortAudio enumerates devices once; make it see this server (private but stable API)
    sd._initialize()
    yield p
    p.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def speech_wav(speech: np.ndarray, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wav") / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes())
    return path


async def capture(cfg: MicStream, seconds: float, during: Any = None) -> tuple[np.ndarray, list[object]]:
    """Run a MicSource for `seconds`; `during(t)` is called each loop turn with the elapsed time."""
    from daemon.capture.sources import MicSource

    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1000)
    source = MicSource(cfg)
    source.start(asyncio.get_running_loop(), queue)
    chunks: list[np.ndarray] = []
    other: list[object] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            item = await asyncio.wait_for(queue.get(), 0.1)
        except TimeoutError:
            item = None
        if isinstance(item, AudioChunk):
            chunks.append(item.samples)
        elif item is not None:
            other.append(item)
        if during is not None:
            await during(time.monotonic() - t0, other)
    source.stop()
    await asyncio.to_thread(source.join, 5)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), other


def best_correlation(recorded: np.ndarray, played: np.ndarray) -> float:
    """Pearson r of `played` against `recorded` at the best lag (found by FFT cross-correlation)."""
    n = len(recorded) + len(played)
    xc = np.fft.irfft(np.fft.rfft(recorded, n) * np.conj(np.fft.rfft(played, n)), n)
    lag = int(np.argmax(xc[: len(recorded)]))
    seg = recorded[lag : lag + len(played)]
    return float(np.corrcoef(seg, played[: len(seg)])[0, 1])


def test_microphone_records_what_is_played(pulse: Pulse, speech: np.ndarray, speech_wav: Path) -> None:
    played: dict[str, Any] = {}

    async def during(t: float, other: list[object]) -> None:
        if "p" not in played and any(isinstance(o, Status) and o.state == "open" for o in other) and t > 0.3:
            played["p"] = pulse.play(speech_wav)

    recorded, other = asyncio.run(capture(MicStream(name="mic", source="mic", device="pulse"), 8.0, during))
    played["p"].kill()
    played["p"].wait()
    assert isinstance(other[0], Status) and other[0].state == "open" and "44100 Hz" in other[0].detail
    assert 6.5 * SR < len(recorded) <= 8.0 * SR  # the device takes a moment to start
    # seconds 1-6 of the clip hold a sentence and the tone: they must be in the recording, sample for sample
    assert best_correlation(recorded, speech[SR : 6 * SR]) > 0.99


def test_vanished_device_is_reopened_with_a_gap(pulse: Pulse) -> None:
    events: dict[str, float] = {}

    async def during(t: float, other: list[object]) -> None:
        if "killed" not in events and t > 1.5:
            await asyncio.to_thread(pulse.stop)
            events["killed"] = t
        if "killed" in events and "restarted" not in events and t > events["killed"] + 2:
            await asyncio.to_thread(pulse.start)
            events["restarted"] = t

    cfg = MicStream(name="mic", source="mic", device="pulse", stall_s=1.0, reopen_min_s=0.2, reopen_max_s=1.0)
    recorded, other = asyncio.run(capture(cfg, 9.0, during))
    states = [o.state for o in other if isinstance(o, Status)]
    assert states[0] == "open" and "lost" in states
    assert states[-1] == "open", states  # reopened once the server came back
    gaps = [o for o in other if isinstance(o, Gap)]
    assert len(gaps) == states.count("lost") and gaps[0].reason == "input device lost", (states, gaps)
    assert gaps[0].duration_s >= 2.0
    assert len(recorded) > 4 * SR  # audio before and after the outage


def test_daemon_transcribes_the_microphone(pulse: Pulse, tiny, tmp_path: Path, speech_wav: Path) -> None:
    d = Daemon(
        tmp_path,
        tiny_asr_config(tiny) + '\n[[streams]]\nname = "room"\nsource = "mic"\ndevice = "pulse"\n',
        env=pulse.env,
    )
    try:

        async def go() -> list[dict[str, Any]]:
            async with connect(d.url) as ws:
                await ws.send(
                    json.dumps(
                        {"type": "hello", "protocol": 1, "subscribe": {"events": ["transcript.final", "stream.*"]}}
                    )
                )
                assert json.loads(await ws.recv())["type"] == "welcome"
                player = pulse.play(speech_wav)
                got: list[dict[str, Any]] = []
                while sum(e["type"] == "transcript.final" for e in got) < 5:
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 40)))
                player.wait(30)
                return got

        got = asyncio.run(go())
    finally:
        assert d.stop() == 0
    finals = [e for e in got if e["type"] == "transcript.final"]
    # the clip: sentence, tone, sentence, noise burst, sentence (webrtcvad counts the tone and the burst as voiced)
    durations = [e["end"] - e["start"] for e in finals]
    assert durations == pytest.approx([2.91, 2.40, 3.63, 1.86, 3.18], abs=0.2)
    assert [e["id"] for e in finals] == [f"room/{i}" for i in range(1, 6)]


def test_devices_lists_the_virtual_microphone(pulse: Pulse) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "devices"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **pulse.env},
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line.strip() and line.strip()[0].isdigit()]
    assert any(r[-1] == "pulse" for r in rows), out.stdout
