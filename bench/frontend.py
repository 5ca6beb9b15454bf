"""Front-end benchmark: end-of-speech → final-transcript latency, and CPU per stream, for the daemon as run.

    .venv/bin/python bench/frontend.py                       # tiny random ASR model (built once), 1 and 2 streams
    .venv/bin/python bench/frontend.py --asr-model large-v2 --device cuda --streams 1 4

Each run starts `ltu-daemon` as a subprocess with N real-time file streams (the demo clip, looped) and listens
for `transcript.final` events over the websocket. Baselines, measured in the same run on the same utterances:

- latency: the VAD hangover (the daemon must hear that much silence before it may close an utterance) plus the
  time faster-whisper alone takes to decode the utterance in this process. `ratio` = daemon latency / baseline.
- CPU: the CPU time that decoding the clip's utterances once costs in this process, per second of audio.
  `ratio` = the daemon's CPU per stream per second of audio / that (what partials, VAD, resampling and the
  websocket add on top of the unavoidable final decode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "daemon" / "assets" / "demo_speech.ogg"
sys.path.insert(0, str(REPO))

from daemon.capture.vad import Segmenter, SpeechEnd  # noqa: E402 (after the sys.path setup above)
from daemon.config import VadConfig  # noqa: E402
from ltu_as.model.audio import load_audio  # noqa: E402
from ltu_as.serving.transcribe import AsrOptions, load_asr, transcribe_detailed  # noqa: E402


def baseline(args: argparse.Namespace, audio: np.ndarray) -> tuple[float, float, float]:
    """(median decode s per utterance, CPU s per audio s, hangover s) for this clip, decoded in-process."""
    seg = Segmenter(VadConfig())
    utts = [e for e in seg.push(audio) + seg.flush() if isinstance(e, SpeechEnd)]
    model = load_asr(args.asr_model, args.device, args.compute_type)
    opts = AsrOptions(beam_size=args.beam_size, max_new_tokens=args.max_new_tokens)
    transcribe_detailed(model, np.zeros(16000, np.float32), opts)  # warm-up, as the daemon does
    times = []
    cpu0 = time.process_time()
    for u in utts:
        t0 = time.perf_counter()
        transcribe_detailed(model, audio[u.start : u.end], opts)
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    return statistics.median(times), cpu / (len(audio) / 16000), VadConfig().hangover_ms / 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def listen(url: str, seconds: float) -> list[tuple[float, dict]]:
    from websockets.asyncio.client import connect

    got = []
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["transcript.final"]}}))
        await ws.recv()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            got.append((time.time(), json.loads(raw)))
    return got


def run_daemon(args: argparse.Namespace, n_streams: int, tmp: Path) -> tuple[list[float], float, float]:
    """Latencies (s) of every final, daemon CPU s per stream per audio s, and the audio seconds listened to."""
    port = free_port()
    streams = "".join(
        f'\n[[streams]]\nname = "s{i}"\nsource = "file"\npath = "{ASSET}"\nrealtime = true\nloop = true\n'
        for i in range(n_streams)
    )
    cfg = tmp / f"bench-{n_streams}.toml"
    cfg.write_text(
        f"[server]\nport = {port}\n[model]\nenabled = false\n"
        f'[asr]\nmodel = "{args.asr_model}"\ndevice = "{args.device}"\n'
        f'compute_type = "{args.compute_type}"\nbeam_size = {args.beam_size}\n'
        + (f"max_new_tokens = {args.max_new_tokens}\n" if args.max_new_tokens else "")
        + streams
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "start", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
    )
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if json.loads(r.read())["ready"]:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        ps = psutil.Process(proc.pid)
        c0 = sum(ps.cpu_times()[:2])
        t0 = time.time()
        got = asyncio.run(listen(f"ws://127.0.0.1:{port}", args.seconds))
        wall = time.time() - t0
        cpu = sum(ps.cpu_times()[:2]) - c0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    latencies = [received - e["wall_end"] for received, e in got if e.get("wall_end")]
    return latencies, cpu / n_streams / wall, wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asr-model", help="faster-whisper model (default: the tiny random one, built once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=25.0, help="listening time per run")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.asr_model is None:
        tiny = REPO / ".cache" / "demo" / "tiny"
        if not (tiny / "ltuas_tiny.bin").is_file():
            from ltu_as.testing import build_tiny_models

            build_tiny_models(tiny)
        args.asr_model = str(tiny / "whisper-ct2")
    audio = load_audio(str(ASSET))
    decode_s, cpu_per_audio_s, hangover = baseline(args, audio)
    base_latency = hangover + decode_s
    print(
        f"model {args.asr_model} on {args.device} ({args.compute_type}, beam {args.beam_size}); {os.cpu_count()} CPUs"
    )
    print(
        f"baseline: hangover {hangover * 1000:.0f} ms + in-process decode {decode_s * 1000:.1f} ms = "
        f"{base_latency * 1000:.0f} ms; decode CPU {cpu_per_audio_s * 100:.2f}% of one core per stream"
    )
    print(
        f"{'streams':>7} {'finals':>6} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'ratio':>6} "
        f"{'CPU %/stream':>12} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.streams:
            lat, cpu, _wall = run_daemon(args, n, Path(tmp))
            if not lat:
                print(f"{n:>7} no finals received")
                continue
            q = np.percentile(np.array(lat) * 1000, [50, 90, 100])
            print(
                f"{n:>7} {len(lat):>6} {q[0]:>8.0f} {q[1]:>8.0f} {q[2]:>8.0f} {q[0] / 1000 / base_latency:>6.2f} "
                f"{cpu * 100:>12.2f} {cpu / cpu_per_audio_s:>6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
