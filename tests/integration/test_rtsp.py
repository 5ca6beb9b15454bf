"""Camera audio over RTSP as a first-class source, against a real RTSP server (GStreamer's gst-rtsp-server, from
Debian packages, with basic auth) serving the demo clip as Opus and as AAC: both transcribed by the real tiny.en;
the server killed (the streams go lost), restarted (they come back, the time away reported as a gap); a wrong
password retried with backoff; and no password anywhere in the log, the events or /healthz."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ASSET
from daemon_harness import Daemon, free_port
from websockets.asyncio.client import connect

pytestmark = pytest.mark.integration

SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-gi and gir1.2-gst-rtsp-server-1.0 are for it alone
PASSWORD = "s3cret-Pw"
WRONG = "wr0ng-Pw"


class RtspServer:
    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RtspServer:
        if not Path(SYSTEM_PYTHON).exists():
            pytest.fail("needs /usr/bin/python3 with python3-gi and gir1.2-gst-rtsp-server-1.0 (.ci/run installs them)")
        out = open(self.log, "ab")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER), str(self.port), str(ASSET), "cam", PASSWORD], stdout=out, stderr=out
        )
        deadline = time.monotonic() + 30
        while b"ready" not in self.log.read_bytes():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RtspServer]:
    s = RtspServer(free_port(), tmp_path / "rtsp.log").start()
    yield s
    s.kill()


def config(port: int, tmp: Path) -> str:
    (tmp / "cam.password").write_text(PASSWORD + "\n")
    return f"""
[model]
enabled = false

[asr]
model = "bundled:tiny.en"
device = "cpu"
compute_type = "int8"
beam_size = 1

[[streams]]
name = "opus"
source = "rtsp"
url = "rtsp://cam:{PASSWORD}@127.0.0.1:{port}/opus"
timeout_s = 2.0
reopen_min_s = 0.5
reopen_max_s = 2.0

[[streams]]
name = "aac"
source = "rtsp"
url = "rtsp://127.0.0.1:{port}/aac"
username = "cam"
password_file = "cam.password"
timeout_s = 2.0
reopen_min_s = 0.5
reopen_max_s = 2.0

[[streams]]
name = "wrong"
source = "rtsp"
url = "rtsp://cam:{WRONG}@127.0.0.1:{port}/aac"
timeout_s = 2.0
reopen_min_s = 0.5
reopen_max_s = 1.0
"""


def test_rtsp_cameras_are_heard_lost_and_regained_with_credentials_kept_secret(
    server: RtspServer, tmp_path: Path
) -> None:
    d = Daemon(tmp_path, config(server.port, tmp_path))
    events: list[dict[str, Any]] = []

    def of(kind: str, stream: str) -> list[dict[str, Any]]:
        return [e for e in events if e["type"] == kind and e["stream"] == stream]

    def heard(stream: str) -> bool:
        return any("boiling" in e["text"].lower() for e in of("transcript.final", stream))

    def status(stream: str, state: str, after: int = 0) -> bool:
        return any(e["state"] == state for e in of("stream.status", stream)[after:])

    async def until(ws: Any, pred: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, [
                (e["type"], e["stream"], e.get("state"), e.get("text"), e.get("detail")) for e in events[-20:]
            ]
            with contextlib.suppress(TimeoutError):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 1)))

    async def go() -> tuple[float, dict[str, Any]]:
        async with connect(d.url) as ws:
            subscribe = {"events": ["transcript.final", "stream.status", "stream.gap"]}
            await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": subscribe}))
            welcome = json.loads(await ws.recv())
            await until(ws, lambda: heard("opus") and heard("aac"))
            assert not of("transcript.final", "wrong")
            await until(ws, lambda: len(of("stream.status", "wrong")) >= 3, 30)  # refused, retried with backoff
            seen = {s: len(of("stream.status", s)) for s in ("opus", "aac")}
            server.kill()
            killed = time.monotonic()
            await until(ws, lambda: status("opus", "lost", seen["opus"]) and status("aac", "lost", seen["aac"]), 30)
            noticed = time.monotonic() - killed
            await asyncio.sleep(2.0)
            server.start()
            await until(ws, lambda: bool(of("stream.gap", "opus")) and bool(of("stream.gap", "aac")), 60)
            await until(ws, lambda: status("opus", "open", seen["opus"]) and status("aac", "open", seen["aac"]), 30)
            finals = {s: len(of("transcript.final", s)) for s in ("opus", "aac")}
            await until(ws, lambda: all(len(of("transcript.final", s)) > finals[s] for s in finals), 90)
            return noticed, welcome

    try:
        noticed, welcome = asyncio.run(go())
        _, health = d.health()
    finally:
        code = d.stop()
    log = d.log()
    assert code == 0, log
    assert {s["name"]: s["kind"] for s in welcome["streams"]} == {"opus": "rtsp", "aac": "rtsp", "wrong": "rtsp"}
    assert noticed < 2.0 + 3.0  # within timeout_s of the last packet, plus the time to say so
    for stream in ("opus", "aac"):
        gap = of("stream.gap", stream)[0]
        assert gap["duration_s"] >= 2.0 and "RTSP stream lost (rtsp://***@127.0.0.1" in gap["reason"]
    wrong = of("stream.status", "wrong")  # "error" before this client came, then "reopening" at each retry
    assert {e["state"] for e in wrong} <= {"error", "reopening"} and wrong[-1]["state"] == "reopening"
    assert all("cannot open rtsp://***@127.0.0.1" in e["detail"] for e in wrong)
    assert "401 Unauthorized" in wrong[0]["detail"]  # (later ones, while the server is down: connection refused)
    everything = log + json.dumps(events) + json.dumps(health)
    assert PASSWORD not in everything and WRONG not in everything
