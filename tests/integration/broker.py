"""A real MQTT broker (Debian's mosquitto, installed by .ci/run) on a loopback port, and a real subscriber that
records everything it receives."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    def __init__(self, folder: Path, port: int | None = None, *, persistent: bool = False) -> None:
        """`persistent`: sessions and their queued messages survive a restart (saved in `folder`)."""
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is missing: apt-get install mosquitto (.ci/run does)")
        self.exe, self.port = exe, port or free_port()
        self.conf = folder / f"mosquitto-{self.port}.conf"
        keep = f"persistence true\npersistence_location {folder}/\n" if persistent else "persistence false\n"
        # Started as root, mosquitto drops to the user "mosquitto", which cannot write its persistence file in our
        # (root-owned, 0700) tmp folder: sessions would then silently not survive a restart. Stay who we are.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{user}{keep}")
        self.log = folder / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.025)
        raise RuntimeError(f"mosquitto did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float


class Subscriber:
    """A paho client subscribed to `#` that keeps every message (and reconnects when the broker comes back). Its
    session is persistent: what is published while it reconnects waits for it at the broker (QoS 1)."""

    def __init__(self, port: int, client_id: str | None = None) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"test-sub-{port}", clean_session=False
        )
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Message(msg.topic, msg.payload, bool(msg.retain), time.time()))

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait(self, predicate: object, timeout: float = 30) -> list[Message]:
        """Wait until `predicate(messages)` is true; returns the messages then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = list(self.messages)
            if predicate(got):  # type: ignore[operator]
                return got
            time.sleep(0.05)
        raise TimeoutError(f"MQTT messages never matched; got {[(m.topic, m.payload[:80]) for m in got][-20:]}")

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
