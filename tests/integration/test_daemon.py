"""The daemon as a subprocess, driven over real websockets: a looping real-time file source and a remote stream,
real webrtcvad and real faster-whisper on the converted tiny model (its text is garbage, so the tests assert on
ids, order, times and sequence numbers, never on words)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ASSET
from daemon_harness import Daemon, tiny_asr_config
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.capture.vad import Segmenter, SpeechEnd
from daemon.config import VadConfig
from ltu_as.serving.transcribe import AsrOptions, load_asr, transcribe_detailed

pytestmark = pytest.mark.integration

SR = 16000


def config(tiny: Any, *, extra: str = "", loop: bool = True) -> str:
    return (
        tiny_asr_config(tiny)
        + f"""
[server]
client_queue = 64
messages_burst = 5000         # the stalled client below floods replies; rate limits have their own test
send_timeout_s = 2.0
max_control_bytes = 4096
max_message_bytes = 262144

[audio]
level_interval_ms = 100
{extra}
[[streams]]
name = "talk"
source = "file"
path = "{ASSET}"
realtime = true
loop = {str(loop).lower()}

[[streams]]
name = "sat"
source = "remote"
"""
    )


@pytest.fixture(scope="module")
def daemon(tiny, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon"), config(tiny))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def expected_utterances(speech: np.ndarray) -> list[tuple[float, float, float]]:
    """(start, speech_end, end) in s of the utterances the daemon must find: our segmenter run directly on the
    independently decoded file, repeated for each pass of the loop."""
    seg = Segmenter(VadConfig())
    ends = [e for e in seg.push(speech) + seg.flush() if isinstance(e, SpeechEnd)]
    one = [(e.start, e.speech_end, e.end) for e in ends]
    return [tuple(round((v + k * len(speech)) / SR, 4) for v in u) for k in range(20) for u in one]


async def hello(ws: Any, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "protocol": 1, **fields}))
    return json.loads(await ws.recv())


async def collect(
    url: str,
    *,
    finals: int,
    events: list[str],
    streams: tuple[str, ...] = ("*",),
    timeout: float = 60,
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with connect(url) as ws:
        welcome = await hello(ws, subscribe={"streams": streams, "events": events})
        assert welcome["type"] == "welcome"
        deadline = time.monotonic() + timeout
        while sum(e["type"] == "transcript.final" for e in got) < finals:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic())))
    return got


def check_transcript_order(events: list[dict[str, Any]], expected: list[tuple[float, float, float]]) -> int:
    """Per utterance id: speech.start, then partials with rising revisions, then one final, then nothing."""
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["type"] in ("speech.start", "transcript.partial", "transcript.final"):
            by_id[e["id"]].append(e)
    complete = 0
    for uid, evs in by_id.items():
        types = [e["type"] for e in evs]
        if types[0] != "speech.start":
            continue  # we connected mid-utterance
        assert types[-1] == "transcript.final" or "transcript.final" not in types, (uid, types)
        assert types.count("transcript.final") <= 1
        partials = [e for e in evs if e["type"] == "transcript.partial"]
        assert [p["revision"] for p in partials] == sorted({p["revision"] for p in partials})
        assert all(p["start"] == evs[0]["start"] for p in partials)
        if types[-1] == "transcript.final":
            final = evs[-1]
            assert final["start"] == evs[0]["start"] < final["speech_end"] < final["end"]
            assert all(p["end"] <= final["end"] for p in partials)
            assert (final["start"], final["speech_end"], final["end"]) in expected, final
            assert final["reason"] == "silence"
            assert 0 <= final["wall_end"] - final["wall_start"] <= final["end"] - final["start"] + 0.5
            complete += 1
    finals = [e for e in events if e["type"] == "transcript.final"]
    numbers = [int(e["id"].split("/")[1]) for e in finals]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # ids are consecutive, in order
    assert [e["seq"] for e in finals] == list(range(finals[0]["seq"], finals[0]["seq"] + len(finals)))
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(finals))
    return complete


def test_health_and_welcome(daemon: Daemon) -> None:
    status, body = daemon.health()
    assert status == 200 and body["live"] and body["ready"]
    assert body["streams"]["talk"]["kind"] == "file" and body["streams"]["sat"]["kind"] == "remote"
    assert body["asr"]["loaded"] and body["asr"]["error"] is None

    async def go() -> dict[str, Any]:
        async with connect(daemon.url) as ws:
            return await hello(ws, id="h1", client="test")

    welcome = asyncio.run(go())
    assert welcome["type"] == "welcome" and welcome["re"] == "h1" and welcome["protocol"] == 1
    assert [s["name"] for s in welcome["streams"]] == ["talk", "sat"]
    assert "transcript.final" in welcome["events"]


def test_clients_get_the_same_ordered_events(daemon: Daemon, expected_utterances, tiny, speech: np.ndarray) -> None:
    async def go() -> list[list[dict[str, Any]]]:
        kinds = ["speech.start", "transcript.*"]
        return await asyncio.gather(*(collect(daemon.url, finals=3, events=kinds, streams=["talk"]) for _ in range(3)))

    runs = asyncio.run(go())
    for events in runs:
        assert check_transcript_order(events, expected_utterances) >= 2
        assert {e["stream"] for e in events} == {"talk"}
    # the ASR got exactly the utterance's audio: the same text as faster-whisper on our own decode of the file.
    # An utterance that ended in silence was decoded when the silence began (vad.speculate_ms = 90: its audio up
    # to 90 ms after the last voiced frame), and that decode stood because the hangover confirmed the end.
    asr = load_asr(tiny.whisper_ct2, device="cpu", compute_type="float32")
    options = AsrOptions(beam_size=1, max_new_tokens=24)
    finals = [e for e in runs[0] if e["type"] == "transcript.final"]
    period = len(speech) / SR
    for f in finals:
        k = int(f["start"] // period)
        end = f["speech_end"] + 0.09 if f["reason"] == "silence" else f["end"]
        a, b = round((f["start"] - k * period) * SR), round((end - k * period) * SR)
        assert f["text"] == transcribe_detailed(asr, speech[a:b], options).text
    assert any(f["text"] for f in finals)  # the tiny model writes (meaningless) text
    # the same event (stream, type, seq) is the same everywhere
    seen: dict[tuple[str, str, int], dict[str, Any]] = {}
    shared = 0
    for events in runs:
        for e in events:
            key = (e["stream"], e["type"], e["seq"])
            if key in seen:
                assert seen[key] == e
                shared += 1
            seen[key] = e
    assert shared >= 6


def test_level_events(daemon: Daemon) -> None:
    async def go() -> list[dict[str, Any]]:
        async with connect(daemon.url) as ws:
            await hello(ws, subscribe={"streams": ["talk"], "events": ["level"]})
            return [json.loads(await ws.recv()) for _ in range(15)]

    levels = asyncio.run(go())
    assert all(e["type"] == "level" and -120 <= e["rms_dbfs"] <= e["peak_dbfs"] <= 0 for e in levels)
    assert [e["seq"] for e in levels] == list(range(levels[0]["seq"], levels[0]["seq"] + 15))
    assert all(b["start"] == a["end"] for a, b in itertools.pairwise(levels))
    assert all(e["end"] - e["start"] == pytest.approx(0.1, abs=0.11) for e in levels)


def raw_stalled_client(port: int, n_subscribes: int) -> socket.socket:
    """A websocket client that says hello, asks for many large replies, and then never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101")

    def frame(text: str) -> bytes:
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    s.sendall(frame(json.dumps({"type": "hello", "protocol": 1})))
    big = {"type": "subscribe", "streams": ["x" * 60] * 30, "events": ["y" * 60] * 30}  # under max_control_bytes
    for _ in range(n_subscribes):
        s.sendall(frame(json.dumps(big)))
    return s


def test_stalled_client_is_dropped_and_others_keep_receiving(daemon: Daemon) -> None:
    async def go() -> tuple[list[dict[str, Any]], float]:
        async with connect(daemon.url) as ws:
            await hello(ws, subscribe={"streams": ["talk"], "events": ["level"]})
            before = daemon.health()[1]["clients"]
            # ~5.7 MB of replies: more than the kernel can buffer (tcp_wmem max is 4 MB here)
            stalled = await asyncio.to_thread(raw_stalled_client, daemon.port, 1500)
            t0 = time.monotonic()
            while daemon.health()[1]["clients"] > before:  # wait for the stalled one to be let go
                if time.monotonic() - t0 > 30:
                    raise AssertionError(f"stalled client still connected:\n{daemon.log()[-2000:]}")
                await ws.recv()
                await asyncio.sleep(0.05)
            dropped_after = time.monotonic() - t0
            got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(10)]
            # the server closed the stalled socket: reading it now ends in EOF or a reset
            stalled.settimeout(10)
            try:
                while stalled.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            stalled.close()
            return got, dropped_after

    got, _ = asyncio.run(go())
    assert all(e["type"] == "level" for e in got)
    assert [e["seq"] for e in got] == list(range(got[0]["seq"], got[0]["seq"] + 10))
    assert "disconnected" in daemon.log()


def test_bad_input_gets_errors_and_changes_nothing(daemon: Daemon) -> None:
    async def go() -> tuple[list[dict[str, Any]], int | None, list[dict[str, Any]]]:
        async with connect(daemon.url) as watcher, connect(daemon.url, max_size=None) as ws:
            await hello(watcher, subscribe={"streams": ["talk"], "events": ["level"]})
            await hello(ws, subscribe={"streams": ["none"], "events": ["none"]})
            replies = []
            for message in [
                "{bad json",
                json.dumps({"type": "dance", "id": 1}),
                json.dumps({"type": "ping", "id": "p", "pad": "x" * 5000}),
                json.dumps({"type": "audio.start", "stream": "nope", "rate": 16000, "id": 2}),
                json.dumps({"type": "audio.start", "stream": "talk", "rate": 16000, "id": 3}),
                json.dumps({"type": "hello", "protocol": 1, "id": 4}),
            ]:
                await ws.send(message)
                replies.append(json.loads(await ws.recv()))
            await ws.send(b"\x00\x01" * 100)  # audio before audio.start
            replies.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "audio.start", "stream": "sat", "rate": 48000, "channels": 2, "id": 5}))
            replies.append(json.loads(await ws.recv()))
            await ws.send(b"\x00\x01\x02")  # not whole 4-byte stereo s16 frames
            replies.append(json.loads(await ws.recv()))
            await ws.send(np.zeros((4800, 2), "<i2").tobytes())  # a good frame is still accepted
            await ws.send(json.dumps({"type": "ping", "id": 6}))
            replies.append(json.loads(await ws.recv()))
            await ws.send(b"\x00" * 300_000)  # over server.max_message_bytes: the connection is closed (1009)
            code = None
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
            watched = [json.loads(await asyncio.wait_for(watcher.recv(), 5)) for _ in range(5)]
            return replies, code, watched

    replies, code, watched = asyncio.run(go())
    assert [(r["type"], r.get("code"), r.get("re")) for r in replies] == [
        ("error", "bad_json", None),
        ("error", "unknown_type", 1),
        ("error", "too_large", None),
        ("error", "unknown_stream", 2),
        ("error", "unknown_stream", 3),
        ("error", "bad_message", 4),
        ("error", "not_started", None),
        ("audio.ready", None, 5),
        ("error", "bad_audio", None),
        ("pong", None, 6),
    ]
    assert "whole number" in replies[8]["message"]
    assert code == 1009
    assert all(e["type"] == "level" for e in watched)
    status, body = daemon.health()
    assert status == 200 and body["ready"] and body["streams"]["sat"]["state"] == "closed"


def test_origin_check(daemon: Daemon) -> None:
    async def go(origin: str) -> str:
        try:
            async with connect(daemon.url, origin=origin) as ws:
                return (await hello(ws))["type"]
        except InvalidStatus as e:
            return str(e.response.status_code)

    assert asyncio.run(go("http://localhost:3000")) == "welcome"
    assert asyncio.run(go("https://evil.example")) == "403"


def test_satellite_feeds_a_remote_stream(daemon: Daemon, expected_utterances) -> None:
    async def go() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with connect(daemon.url) as ws, connect(daemon.url) as rival:
            await hello(ws, subscribe={"streams": ["sat"], "events": ["transcript.final", "stream.status"]})
            await hello(rival, subscribe={"streams": ["none"]})
            sat = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "clients.satellite",
                "--url",
                daemon.url,
                "--stream",
                "sat",
                "--file",
                str(ASSET),
                "--fast",
            )
            got = []
            busy = None

            def closed() -> bool:
                return any(e["type"] == "stream.status" and e["state"] == "closed" for e in got)

            while not closed() or sum(e["type"] == "transcript.final" for e in got) < 5:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                if busy is None and got[-1]["type"] == "stream.status" and got[-1]["state"] == "open":
                    await rival.send(json.dumps({"type": "audio.start", "stream": "sat", "rate": 16000}))
                    busy = json.loads(await rival.recv())
            assert await sat.wait() == 0
            return got, busy or {}

    got, busy = asyncio.run(go())
    assert busy.get("code") == "stream_busy"
    finals = [e for e in got if e["type"] == "transcript.final"]
    # the satellite sends the file at its own 48 kHz: the daemon resamples with soxr, so boundaries may move by a
    # VAD frame or two against our PyAV-decoded reference
    one_pass = expected_utterances[:5]
    offset = finals[0]["start"] - one_pass[0][0]
    assert len(finals) == len(one_pass)
    for f, (start, speech_end, end) in zip(finals, one_pass, strict=True):
        assert f["start"] - offset == pytest.approx(start, abs=0.1)
        assert f["speech_end"] - offset == pytest.approx(speech_end, abs=0.1)
        assert f["end"] - offset == pytest.approx(end, abs=0.1)
    assert finals[-1]["reason"] in ("silence", "flush")


def test_token_auth(tiny, tmp_path: Path) -> None:
    d = Daemon(tmp_path, tiny_asr_config(tiny) + '\n[server]\ntoken = "s3cret-token"\n')
    try:

        async def go() -> list[object]:
            out: list[object] = []
            try:
                async with connect(d.url, additional_headers={"Authorization": "Bearer wrong"}):
                    out.append("connected")
            except InvalidStatus as e:
                out.append(e.response.status_code)
            async with connect(d.url) as ws:
                reply = await hello(ws, token="wrong")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                out += [reply["code"], closed.value.rcvd.code if closed.value.rcvd else None]
            async with connect(d.url, additional_headers={"Authorization": "Bearer s3cret-token"}) as ws:
                out.append((await hello(ws))["type"])
            async with connect(d.url) as ws:
                out.append((await hello(ws, token="s3cret-token"))["type"])
            return out

        assert asyncio.run(go()) == [401, "unauthorized", 4001, "welcome", "welcome"]
        assert d.health()[1]["rejected_connections"] == 2
        assert "s3cret-token" not in d.log()
    finally:
        assert d.stop() == 0


def test_sigterm_flushes_the_open_utterance_and_closes_clients(tiny, tmp_path: Path) -> None:
    """SIGTERM mid-sentence: the utterance is flushed to its final, and the audio since the last window goes into
    a last window (the 10 s up to the stop), stored with its transcript, so a restart can still find it."""
    store = tmp_path / "history.db"
    d = Daemon(tmp_path, config(tiny, loop=False, extra=f'[store]\npath = "{store}"\nembeddings = false\n'))

    async def go() -> tuple[list[dict[str, Any]], int | None]:
        got: list[dict[str, Any]] = []
        async with connect(d.url) as ws:
            events = ["speech.start", "transcript.final", "window"]
            await hello(ws, subscribe={"streams": ["talk"], "events": events})
            while True:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                if got[-1]["type"] == "speech.start":
                    await asyncio.sleep(0.5)  # mid-sentence
                    d.proc.send_signal(signal.SIGTERM)
                    break
            try:
                while True:
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            except ConnectionClosed as e:
                return got, e.rcvd.code if e.rcvd else None

    got, code = asyncio.run(go())
    assert d.proc.wait(30) == 0, d.log()
    d.stop()
    assert code == 1001
    last, window = got[-2:]
    assert last["type"] == "transcript.final" and last["id"] == got[0]["id"] and last["reason"] == "flush"
    assert last["end"] - last["start"] >= 0.5
    # the last window: the 10 s up to where the stream stopped, holding the flushed utterance
    assert window["type"] == "window" and window["end"] == last["end"]
    assert window["start"] == pytest.approx(max(0.0, last["end"] - 10), abs=1e-3)
    assert last["text"] in window["transcript"]
    import apsw

    rows = apsw.Connection(str(store)).execute("SELECT id, end, transcript FROM windows ORDER BY idx").fetchall()
    assert rows[-1] == (window["id"], window["end"], window["transcript"])


def test_config_typo_and_check(tiny, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad]\nhangover = 300\n")

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *a],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_DATA_HOME": str(tmp_path / "data")},
        )

    started = run("start", "--config", str(bad))
    assert started.returncode == 2 and "vad.hangover: unknown key" in started.stderr
    good = tmp_path / "good.toml"
    good.write_text(config(tiny))
    assert run("check", "--config", str(good)).returncode == 0
    missing = tmp_path / "missing.toml"
    missing.write_text(
        config(tiny)
        .replace(str(ASSET), str(tmp_path / "gone.ogg"))
        .replace(str(tiny.whisper_ct2), str(tmp_path))
        .replace("enabled = false", "enabled = true")
        .replace(str(tiny.checkpoint), str(tmp_path / "nope.bin"))
    )
    checked = run("check", "--config", str(missing))
    assert checked.returncode == 1
    assert "gone.ogg" in checked.stdout and "not a CTranslate2 Whisper folder" in checked.stdout
    assert "model.checkpoint" in checked.stdout and "nope.bin" in checked.stdout
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = closed.getsockname()[1]
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(
        config(tiny) + f'[mqtt]\nenabled = true\nurl = "mqtt://127.0.0.1:{port}"\n'
        '[store]\npath = "/proc/no-such-dir/history.db"\n'
    )
    checked = run("check", "--config", str(unreachable))
    closed.close()
    assert checked.returncode == 1
    assert f"mqtt: cannot reach the broker at 127.0.0.1:{port}" in checked.stdout
    assert "store: cannot open the history store /proc/no-such-dir/history.db" in checked.stdout


def test_memory_plan_check_and_refusal(tiny, tmp_path: Path) -> None:
    """`check --memory` prints the plan; a plan that does not fit makes `check` fail and `start` refuse (exit 3),
    both naming the setting to change. engine.memory_budget_gb stands in for a small card."""
    cfg = tmp_path / "model.toml"
    cfg.write_text(config(tiny).replace("enabled = false", "enabled = true"))

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *a, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_DATA_HOME": str(tmp_path / "data")},
        )

    fits = run("check", "--memory")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert (
        "memory plan (model.quantization = none, model.encoder_quantization = none, llm.backend = local)" in fits.stdout
    )
    assert "LLM weights (float32)" in fits.stdout and "KV cache: 64 slots" in fits.stdout and "\n  fits" in fits.stdout
    small = ("--set", "engine.memory_budget_gb=0.0005")
    checked = run("check", "--memory", *small)
    assert checked.returncode == 1 and "DOES NOT FIT" in checked.stdout
    assert 'model.quantization = "int8"' in checked.stdout
    started = run("start", *small)
    assert started.returncode == 3
    assert "LTU-AS does not fit in memory" in started.stderr and 'model.quantization = "int8"' in started.stderr


def test_the_web_page_is_served_beside_the_websocket(daemon: Daemon) -> None:
    """GET / without an upgrade is the page (the websocket stays at / for clients that upgrade); everything it
    loads comes from the daemon, under a policy that allows no inline or foreign code."""
    import re
    import urllib.request

    def get(path: str) -> tuple[str, dict[str, str]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}{path}", timeout=10) as r:
            return r.read().decode(), dict(r.headers)

    html, headers = get("/")
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    loads = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert loads and all(u.startswith("/") and not u.startswith("//") for u in loads), loads  # no CDN
    for url in loads:
        body, h = get(url)
        assert body and h["Content-Type"].split(";")[0] in ("text/javascript", "text/css", "image/svg+xml")
    assert get("/favicon.ico")[1]["Content-Type"] == "image/svg+xml"  # no 404 in every browser's console
    js, _ = get("/app.js")
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js  # text only
