"""The package works outside a checkout: build the wheel from the tracked files, install it with its dependencies
into a fresh virtual environment in a temporary folder, and from there (another working directory, another home)
start the demo daemon until `/healthz` is ready, talk to it, and find the shipped training stage configs.

The install takes its dependencies from pip's cache (`constraints.txt` pins them; torch from the local CPU wheel),
so a runtime dependency missing from `pyproject.toml` fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import pytest
from daemon_harness import REPO, free_port
from websockets.sync.client import connect

pytestmark = pytest.mark.integration


def run(*cmd: str | Path, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("wheel")
    # the files git tracks (or would: untracked, not ignored), as a fresh clone has them
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    src = root / "src"
    for name in filter(None, files):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            target.symlink_to(os.readlink(REPO / name))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(root / "cache"),
        HF_HUB_OFFLINE="1",
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path("~/.cache/pip").expanduser())),
    )
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        root / "dist",
        src,
        cwd=root,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("ltu_daemon-*.whl"))
    venv.create(root / "venv", with_pip=True)
    py = root / "venv" / "bin" / "python"
    # --no-compile: byte-compiling every installed module (torch, transformers, ...) is a minute of this test;
    # Python compiles what the daemon imports when it imports it
    pip = run(
        py, "-m", "pip", "install", "-q", "--no-compile", "-c", REPO / "constraints.txt", wheel, cwd=root, env=env
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return root, env


def test_installed_package_has_its_data_and_no_checkout(installed: tuple[Path, dict[str, str]]) -> None:
    root, env = installed
    py = root / "venv" / "bin" / "python"
    probe = run(
        py,
        "-c",
        "import daemon, ltu_as, clients; from daemon.config import PROFILES; "
        "from ltu_as.training.trainer import STAGES; "
        "print(daemon.__file__, PROFILES, STAGES, sorted(p.name for p in STAGES.iterdir()), sep='\\n')",
        cwd=root,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    init, profiles, stages, names = probe.stdout.splitlines()
    venv_dir = str(root / "venv")
    assert init.startswith(venv_dir) and profiles.startswith(venv_dir) and stages.startswith(venv_dir)
    assert names == "['finetune.toml', 'stage1.toml', 'stage2.toml', 'stage3.toml']"
    helped = run(root / "venv" / "bin" / "ltu-as", "train", "--help", cwd=root, env=env)
    assert helped.returncode == 0 and "--stage" in helped.stdout
    shown = run(root / "venv" / "bin" / "ltu-as", "train", "--stage", "3", "--print-config", cwd=root, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"# {stages}/stage3.toml") and '"stage": 3' in shown.stdout
    checked = run(root / "venv" / "bin" / "ltu-daemon", "check", "--demo", cwd=root, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_installed_demo_daemon_starts_and_serves(installed: tuple[Path, dict[str, str]]) -> None:
    root, env = installed
    port = free_port()
    log = root / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(root / "venv" / "bin" / "ltu-daemon"), "start", "--demo", "--set", f"server.port={port}"],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        health: dict[str, object] = {}
        deadline = time.monotonic() + 180  # the first start builds the tiny models into the (new) user cache
        while time.monotonic() < deadline and not health.get("ready"):
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    health = json.loads(r.read())
            except (OSError, urllib.error.HTTPError, ValueError):
                time.sleep(0.2)
        assert health.get("ready") and health.get("demo"), log.read_text()[-3000:]
        with connect(f"ws://127.0.0.1:{port}", open_timeout=10) as ws:
            ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["level"]}}))
            welcome = json.loads(ws.recv(10))
            level = json.loads(ws.recv(10))
        assert welcome["type"] == "welcome" and welcome["demo"] is True
        assert {s["name"] for s in welcome["streams"]} == {"demo", "satellite"}
        assert level["type"] == "level" and level["stream"] == "demo"  # the packaged clip is playing
        assert (root / "cache" / "ltu-daemon" / "demo" / "tiny" / "ltuas_tiny.bin").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
