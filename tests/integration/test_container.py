"""The CPU container image, built from this checkout and run with podman: the Debian base from Debian packages
(mmdebstrap, imported into podman: no registry is reachable here), the wheel and its pinned dependencies installed
with this machine's pip settings. Started with no config mounted, it runs the demo profile as an unprivileged user,
answers /healthz, passes its own health check, transcribes the demo clip with the real tiny.en over the websocket
(with the token it wrote to its data volume), and stops cleanly on SIGTERM.

On this kind of VM podman needs the runc runtime (crun refuses cgroups v1 in hybrid mode) and explicit --ulimit
values (its defaults exceed what the VM grants): docs/deploy.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import REPO, free_port
from websockets.sync.client import connect

pytestmark = pytest.mark.integration

TAG = "localhost/ltu-daemon:ci-test"


def engine_opts() -> list[str]:
    return ["--runtime", "runc"] if shutil.which("runc") else []


def ulimits() -> list[str]:
    import resource

    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["podman", *engine_opts(), *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:  # .ci/run installs both: a missing one fails rather than skips
            pytest.fail(f"{tool} is missing: apt-get install podman runc mmdebstrap")
    env = {
        **os.environ,
        "ENGINE_OPTS": " ".join(engine_opts()),
        "BUILD_OPTS": " ".join(ulimits()),
        "TORCH_INDEX": "",  # PyTorch's index is not reachable here: this machine's pip settings provide torch
        "PYTHON": str(REPO / ".venv" / "bin" / "python"),
    }
    r = subprocess.run(
        ["bash", "deploy/container/build.sh", "--local-base", "--tag", TAG],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    yield TAG
    podman("rmi", "--force", TAG, check=False)


def test_the_cpu_image_runs_the_demo_as_a_user_and_transcribes_over_the_websocket(image: str, tmp_path: Path) -> None:
    port = free_port()
    data, cache = tmp_path / "data", tmp_path / "cache"
    for d in (data, cache):
        d.mkdir()
        os.chown(d, 10001, 10001)  # the image's user owns its volumes
    name = f"ltu-test-{port}"
    podman(
        "run", "--detach", "--name", name, "--network", "host", *ulimits(),
        "--env", f"LTU_DAEMON__SERVER__PORT={port}",
        "--volume", f"{data}:/var/lib/ltu-daemon", "--volume", f"{cache}:/var/cache/ltu-daemon",
        image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        ready = False
        while not ready:
            assert time.monotonic() < deadline, podman("logs", name).stderr[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    ready = json.loads(r.read())["ready"]
            except (OSError, urllib.error.HTTPError, ValueError):
                time.sleep(1)
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        token = (data / "token").read_text().strip()
        assert len(token) >= 24 and (data / "token").stat().st_mode & 0o077 == 0
        assert (data / "history.db").exists()  # the store is in the data volume
        finals: list[dict[str, object]] = []
        with connect(f"ws://127.0.0.1:{port}", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["transcript.final"]}}))
            assert json.loads(ws.recv(10))["type"] == "welcome"
            while len(finals) < 3:  # the clip's three sentences, decoded by the real tiny.en in the image
                e = json.loads(ws.recv(120))
                if e["type"] == "transcript.final" and e["text"]:
                    finals.append(e)
        text = " ".join(str(f["text"]).lower() for f in finals)
        assert all(f["stream"] == "demo" for f in finals) and "boiling" in text, text
        podman("stop", "--time", "30", name, timeout=60)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        logs = podman("logs", name)
        assert state["ExitCode"] == 0, logs.stderr[-3000:]
        assert "running the demo profile" in logs.stderr and "stopped" in logs.stderr
    finally:
        podman("rm", "--force", name, check=False)
