"""A private PulseAudio server with a 16 kHz null sink whose monitor is the default source: a virtual microphone.

What is played into the sink (`paplay`) is what sounddevice records from the `pulse` device. Recipe and traps:
`shared/recipes/environment.md` (start it before PortAudio initialises; keep the sink clocked with a keep-alive).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


class Pulse:
    def __init__(self, runtime: Path) -> None:
        missing = [t for t in ("pulseaudio", "pactl", "pacat", "paplay") if shutil.which(t) is None]
        if missing:
            raise RuntimeError(
                f"missing {missing}: apt-get install pulseaudio pulseaudio-utils libasound2-plugins "
                "libportaudio2 (.ci/run does)"
            )
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.runtime = runtime
        self.env = {"XDG_RUNTIME_DIR": str(runtime), "PULSE_SERVER": f"unix:{runtime}/native"}
        self._keepalive: subprocess.Popen[bytes] | None = None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, check=check, timeout=30)

    def start(self) -> None:
        self._run(
            "pulseaudio",
            "--daemonize=yes",
            "--exit-idle-time=-1",
            "-n",
            f"--load=module-native-protocol-unix auth-anonymous=1 socket={self.runtime}/native",
            "--load=module-null-sink sink_name=vsink rate=16000 channels=1",
        )
        for _ in range(100):
            if self._run("pactl", "info", check=False).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("pulseaudio did not come up")
        self._run("pactl", "set-default-sink", "vsink")
        self._run("pactl", "set-default-source", "vsink.monitor")
        # Keeps the null sink clocked in real time; without it capture starts late and arrives in bursts.
        self._keepalive = subprocess.Popen(
            [
                "pacat",
                "--playback",
                "--raw",
                "--rate=16000",
                "--channels=1",
                "--format=s16le",
                "--device=vsink",
                "--latency-msec=20",
                "/dev/zero",
            ],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)

    def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.kill()
            self._keepalive.wait()
            self._keepalive = None
        self._run("pulseaudio", "--kill", check=False)
        for _ in range(100):
            if self._run("pactl", "info", check=False).returncode != 0:
                return
            time.sleep(0.05)

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["paplay", "--device=vsink", str(wav)],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
