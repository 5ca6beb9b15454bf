"""Start `ltu-daemon` as a real subprocess on a free loopback port and talk to it over real websockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_asr_config(tiny: Any, *, model: bool = False) -> str:
    """faster-whisper on the tiny CT2 model; LTU-AS (the tiny checkpoint) only when `model`."""
    return f"""
[model]
enabled = {str(model).lower()}
checkpoint = "{tiny.checkpoint}"
whisper = "{tiny.whisper}"
llm = "{tiny.llm}"
device = "cpu"
dtype = "fp32"

[asr]
model = "{tiny.whisper_ct2}"
device = "cpu"
compute_type = "float32"
beam_size = 1
max_new_tokens = 24
"""


class Daemon:
    def __init__(
        self,
        tmp: Path,
        config: str,
        *args: str,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        port: int | None = None,
        cwd: Path = REPO,
    ) -> None:
        """`cwd`: the daemon's working directory (the repository, unless a test starts it elsewhere)."""
        self.port = port or free_port()
        self.token = tomllib.loads(config).get("server", {}).get("token")  # sent for the full /healthz
        self.config_path = tmp / f"daemon-{self.port}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / f"daemon-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        # the history store only where a test asks for one ([store] in its config), and then in its tmp folder
        store = {} if "[store]" in config else {"LTU_DAEMON__STORE__ENABLED": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon.cli",
                "start",
                "--config",
                str(self.config_path),
                "--set",
                f"server.port={self.port}",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_DATA_HOME": str(tmp / "data"), **store, **(env or {})},
        )
        if wait_ready:
            self.wait_ready()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz, in full (with the daemon's token, if it has one)."""
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/healthz", headers=auth)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.health()
                if status == 200 and body["ready"]:
                    return body
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
