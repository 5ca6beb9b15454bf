"""Soak benchmark (not in CI): many clients for a long time against the demo daemon, with questions, scenes and
stalled clients.

    .venv/bin/python bench/soak.py                          # 500 clients x 30 min (the target)
    .venv/bin/python bench/soak.py --clients 100 --minutes 2

The daemon runs the demo profile (tiny random models, the packaged clip looping in real time: finals, partials,
levels, 10 s windows and their scene descriptions). N healthy clients subscribe to every event of the stream;
some of them ask questions (answers stream back; `busy` is retried as told). Every `--stall-every` seconds a
client connects, subscribes to everything and never reads again, for half the period; its queue and socket fill
up while everyone else must go on undisturbed (the daemon closes it once its queue overflows with events that
cannot be shed or a send takes longer than `server.send_timeout_s`). Reported, against the daemon's own numbers
in the same run:

- RSS growth of the daemon from the end of the warm-up to the end (target < 5 %);
- finals missed by healthy clients: a gap in a client's `transcript.final` seq, or fewer finals than the daemon
  published while the client was connected (target 0);
- delivery delay (receive time − the event's `time`) of healthy clients' events, while a stalled client is
  connected and while none is; the difference is the worst delay a stalled client causes others (target < 100 ms).

Client and daemon share this machine's cores, so the absolute delays include the clients' own scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What can be inferred from the audio?", "Is anyone speaking?", "What did they say?", "Is it loud?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()))


@dataclass
class Stats:
    delays_stalled: list[float] = field(default_factory=list)  # s, events received while a stalled client was on
    delays_clear: list[float] = field(default_factory=list)
    answers: int = 0
    busy: int = 0
    answer_errors: dict[str, int] = field(default_factory=dict)
    missed: int = 0
    finals_seen: list[int] = field(default_factory=list)  # per client
    disconnected: int = 0
    stalled_dropped: int = 0  # stalled clients the daemon closed before the bench did
    stalled_total: int = 0
    stalled_on: int = 0  # how many stalled clients are connected now


async def healthy(
    url: str, i: int, stats: Stats, stop: asyncio.Event, ask_every_s: float, published_finals: list[int]
) -> None:
    """One client: every event, seq checked for finals, a question every `ask_every_s` (0: never)."""
    seqs: list[int] = []
    start_published = published_finals[-1]
    try:
        async with connect(url, max_size=None, open_timeout=60, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": 1, "client": f"soak-{i}"}))
            json.loads(await ws.recv())
            start_published = published_finals[-1]
            next_ask = time.monotonic() + (ask_every_s * (i % 97) / 97 if ask_every_s else float("inf"))
            asking = False
            n = 0
            while not stop.is_set():
                if not asking and time.monotonic() >= next_ask:
                    n += 1
                    await ws.send(
                        json.dumps(
                            {
                                "type": "ask",
                                "id": f"q{n}",
                                "question": QUESTIONS[n % 4],
                                "greedy": True,
                                "max_new_tokens": 16,
                            }
                        )
                    )
                    asking = True
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                now = time.time()
                e = json.loads(raw)
                (stats.delays_stalled if stats.stalled_on else stats.delays_clear).append(now - e["time"])
                t = e["type"]
                if t == "transcript.final":
                    seqs.append(e["seq"])
                elif t == "answer.done":
                    stats.answers += 1
                    asking = False
                    next_ask = time.monotonic() + ask_every_s
                elif t == "error" and e.get("re", "").startswith("q"):
                    asking = False
                    if e["code"] == "busy":
                        stats.busy += 1
                        next_ask = time.monotonic() + e["retry_after_s"]
                    else:
                        stats.answer_errors[e["code"]] = stats.answer_errors.get(e["code"], 0) + 1
                        next_ask = time.monotonic() + ask_every_s
    except (ConnectionClosed, OSError):
        stats.disconnected += 1
    end_published = published_finals[-1]
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(seqs))
    # finals the daemon published while this client was connected that it never got (the first and last may
    # straddle the connect / disconnect)
    expected = max(0, end_published - start_published - 1)
    stats.missed += gaps + max(0, expected - len(seqs))
    stats.finals_seen.append(len(seqs))


def frame(text: str) -> bytes:
    """One masked client text frame."""
    data = text.encode()
    mask = os.urandom(4)
    n = len(data)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


# a subscribe whose `subscribed` reply echoes ~8 KB: a stalled client asking for these fills its socket quickly
BIG_SUBSCRIBE = frame(json.dumps({"type": "subscribe", "streams": ["s" * 60] * 64, "events": ["*"] * 63 + ["e" * 60]}))


def stalled_socket(port: int) -> socket.socket:
    """A client that says hello (subscribed to everything), then never reads: its TCP window fills up."""
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
    s.sendall(frame(json.dumps({"type": "hello", "protocol": 1})))
    return s


async def stall_loop(port: int, every_s: float, stats: Stats, stop: asyncio.Event) -> None:
    """A stalled client for the first half of every period: it asks for big replies within its rate limit (40/s)
    and reads none, so the daemon's send to it blocks and it is let go after `server.send_timeout_s`."""
    while not stop.is_set():
        sock = await asyncio.to_thread(stalled_socket, port)
        sock.setblocking(False)
        stats.stalled_on += 1
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < every_s / 2:
            await asyncio.sleep(0.1)
            try:
                for _ in range(4):
                    sock.send(BIG_SUBSCRIBE)  # a full buffer is fine: it is a stalled client
            except BlockingIOError:
                pass
            except OSError:  # reset: the daemon let it go
                stats.stalled_dropped += 1
                break
        stats.stalled_on -= 1
        stats.stalled_total += 1
        sock.close()
        while not stop.is_set() and time.monotonic() - t0 < every_s:
            await asyncio.sleep(0.5)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp())
    log = open(tmp / "daemon.log", "w")  # noqa: SIM115 (closed at the end)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "start",
            "--demo",
            "--set",
            f"server.port={port}",
            "--set",
            f"server.max_clients={args.clients + 16}",
            "--set",
            "server.send_timeout_s=5.0",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        for _ in range(1200):
            try:
                if health(port).get("ready"):
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        daemon = psutil.Process(proc.pid)
        url = f"ws://127.0.0.1:{port}"
        stats = Stats()
        stop = asyncio.Event()
        published = [0]

        async def watch_published() -> None:
            while not stop.is_set():
                published.append(health(port)["events"].get("transcript.final", 0))
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch_published())
        await asyncio.sleep(0.6)
        clients = []
        for i in range(args.clients):  # connect gradually: a few per tick
            clients.append(
                asyncio.create_task(healthy(url, i, stats, stop, args.ask_every_s if i < args.askers else 0, published))
            )
            if i % 20 == 19:
                await asyncio.sleep(0.05)
        stall = asyncio.create_task(stall_loop(port, args.stall_every, stats, stop))
        t0 = time.monotonic()
        duration = args.minutes * 60
        rss: list[tuple[float, int]] = []
        while (elapsed := time.monotonic() - t0) < duration:
            rss.append((elapsed, daemon.memory_info().rss))
            if len(rss) % 6 == 1:
                print(
                    f"{elapsed:6.0f}/{duration:.0f} s  rss {rss[-1][1] / 2**20:7.1f} MB  answers {stats.answers}"
                    f"  busy {stats.busy}  stalled clients let go {stats.stalled_dropped}/{stats.stalled_total}",
                    file=sys.stderr,
                )
            await asyncio.sleep(min(10.0, max(1.0, duration / 200)))
        rss.append((time.monotonic() - t0, daemon.memory_info().rss))
        stop.set()
        await asyncio.gather(*clients, stall, watcher)
        h = health(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    # RSS moves by tens of MB while a batch runs: compare medians of the first 10 % after the warm-up and the last 10 %
    after = [r for t, r in rss if duration * args.warmup <= t <= duration * (args.warmup + 0.1)] or [rss[0][1]]
    last = [r for t, r in rss if t >= duration * 0.9] or [rss[-1][1]]
    warm, end = statistics.median(after), statistics.median(last)
    logged = (tmp / "daemon.log").read_text()
    result = {
        "clients": args.clients,
        "minutes": args.minutes,
        "askers": args.askers,
        "rss_mb_after_warmup": round(warm / 2**20, 1),
        "rss_mb_end": round(end / 2**20, 1),
        "rss_mb_peak": round(max(r for _, r in rss) / 2**20, 1),
        "rss_growth_pct": round(100 * (end - warm) / warm, 2),
        "finals_published": h["events"].get("transcript.final", 0),
        "finals_per_client_min": min(stats.finals_seen, default=0),
        "finals_missed": stats.missed,
        "healthy_disconnected": stats.disconnected,
        "answers": stats.answers,
        "busy": stats.busy,
        "answer_errors": stats.answer_errors,
        "scenes": h["model"]["counts"]["scenes"],
        "stalled_clients": stats.stalled_total,
        "stalled_let_go": stats.stalled_dropped,
        "daemon_logged_stopped_reading": logged.count("stopped reading"),
        "delay_ms_clear": {
            "p50": round(1000 * pct(stats.delays_clear, 0.5), 1),
            "p99": round(1000 * pct(stats.delays_clear, 0.99), 1),
            "max": round(1000 * max(stats.delays_clear, default=float("nan")), 1),
            "n": len(stats.delays_clear),
        },
        "delay_ms_stalled": {
            "p50": round(1000 * pct(stats.delays_stalled, 0.5), 1),
            "p99": round(1000 * pct(stats.delays_stalled, 0.99), 1),
            "max": round(1000 * max(stats.delays_stalled, default=float("nan")), 1),
            "n": len(stats.delays_stalled),
        },
        "tracebacks_in_log": logged.count("Traceback"),
    }
    result["stall_cost_ms_p99"] = round(result["delay_ms_stalled"]["p99"] - result["delay_ms_clear"]["p99"], 1)
    result["stall_cost_ms_p50"] = round(result["delay_ms_stalled"]["p50"] - result["delay_ms_clear"]["p50"], 1)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--askers", type=int, default=50, help="clients that ask questions")
    p.add_argument("--ask-every-s", type=float, default=60.0, help="each asker's pause between questions")
    p.add_argument("--stall-every", type=float, default=60.0, help="a new stalled client every this many seconds")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the run before RSS is the baseline")
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args()
    out = asyncio.run(main(a))
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
