"""Hostile clients against the real daemon (a subprocess, on loopback): one test per attack of issue 21's table,
each named after what it defends. Every listener is attacked: the websocket (its HTTP side too), a satellite's
audio, the OpenAI-compatible HTTP API and the Wyoming port.

While each attack runs, a `Pinger` (another, well-behaved client) sends websocket pings: the event loop must keep
answering them. The bound (`STALL_S`) is generous on purpose: the attacks used to stall every client for 3-17 s or
for good, and a loaded 2-core CI machine can delay a reply by a second without anything being wrong; the measured
figures are in docs/performance.md. Memory is the daemon's RSS: after an attack it must be back within
`MEMORY_MB` of where it was before (the attacks used to keep 0.2-1.4 GB for good).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import ASSET
from daemon_harness import Daemon, free_port, tiny_asr_config
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect

pytestmark = pytest.mark.integration

TOKEN = "hostile-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STALL_S = 2.0
MEMORY_MB = 50
SHUTDOWN_S = 20.0  # the daemon's drain (10 s) plus closing what is left


class Target:
    def __init__(self, d: Daemon, wyoming: int, api: int) -> None:
        self.d, self.wyoming, self.api = d, wyoming, api

    def rss_mb(self) -> float:
        return psutil.Process(self.d.proc.pid).memory_info().rss / 2**20

    def health(self) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.d.port}/healthz", headers=AUTH)
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(json.loads(r.read()))


def config(tiny: Any, wyoming: int, api: int) -> str:
    return (
        tiny_asr_config(tiny)
        + f"""
[server]
token = "{TOKEN}"
max_clients = 8
max_connections = 48
open_timeout_s = 3.0
max_audio_ahead_s = 5.0

[store]
embeddings = false

[alerts]
max_runtime_rules = 20

[wyoming]
enabled = true
port = {wyoming}
max_connections = 4
idle_timeout_s = 2.0
max_event_bytes = 262144
max_audio_s = 20

[api]
enabled = true
port = {api}
max_connections = 4
header_timeout_s = 2.0
body_timeout_s = 3.0
max_upload_mb = 5
max_audio_s = 600

[[streams]]
name = "talk"
source = "file"
path = "{ASSET}"
realtime = true
loop = true

[[streams]]
name = "sat"
source = "remote"
"""
    )


@pytest.fixture(scope="module")
def target(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("hostile")
    wyoming, api = free_port(), free_port()
    d = Daemon(tmp, config(tiny, wyoming, api))
    t = Target(d, wyoming, api)
    yield t
    t0 = time.monotonic()
    code = d.stop(timeout=SHUTDOWN_S + 10)
    took = time.monotonic() - t0
    log = d.log()
    assert code == 0 and took < SHUTDOWN_S, (code, took, log[-3000:])  # SIGTERM still stops it, in time
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]


class Pinger(threading.Thread):
    """A well-behaved client pinging the daemon every 0.1 s; `worst` is the slowest pong (s)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.ws = sync_connect(url, additional_headers=AUTH, open_timeout=10)
        self.ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["-"]}}))
        assert json.loads(self.ws.recv(10))["type"] == "welcome"
        self.worst = 0.0
        self.pongs = 0
        self.failed: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            try:
                if not self.ws.ping().wait(30):
                    self.failed = "no pong within 30 s"
                    return
            except ConnectionClosed as e:
                self.failed = f"closed: {e}"
                return
            self.worst = max(self.worst, time.monotonic() - t0)
            self.pongs += 1
            self.halt.wait(0.1)

    def finish(self) -> None:
        deadline = time.monotonic() + 10
        while self.pongs < 3 and self.failed is None and time.monotonic() < deadline:
            time.sleep(0.05)  # a short attack: a few pongs after it still show the loop answers
        self.halt.set()
        self.join(40)
        self.ws.close()
        assert self.failed is None, self.failed
        assert self.pongs >= 3 and self.worst < STALL_S, f"the event loop stalled: worst pong {self.worst:.2f} s"
        print(f"pinger: {self.pongs} pongs, worst {self.worst * 1000:.0f} ms")


@contextmanager
def attack(t: Target, settle_s: float = 1.0) -> Iterator[Pinger]:
    """Around an attack: the pinger runs, and the daemon's memory must come back to where it was."""
    time.sleep(settle_s)
    before = t.rss_mb()
    pinger = Pinger(t.d.url)
    pinger.start()
    yield pinger
    pinger.finish()
    after = before
    for _ in range(40):  # buffers go back as connections finish closing
        after = t.rss_mb()
        if after - before < MEMORY_MB:
            break
        time.sleep(0.25)
    print(f"rss: {before:.0f} MB before, {after:.0f} MB after")
    assert after - before < MEMORY_MB, f"the daemon kept {after - before:.0f} MB after the attack"
    assert t.health()["ready"]


async def hello(ws: Any, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["-"]}, **fields}))
    return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))


async def ask(url: str, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    async with connect(url, additional_headers=AUTH) as ws:
        await hello(ws)
        out = []
        for m in messages:
            await ws.send(json.dumps(m))
            out.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return out


# --- the websocket ---------------------------------------------------------------------------------------------


def test_a_catastrophic_regex_rule_is_matched_in_linear_time_and_rules_are_capped(target: Target) -> None:
    """`(.|.)*\\u0001` once spun the event loop at 100 % on the next final, for good (it was persisted too). Regex
    rules now run on RE2: the rule is accepted, finals go on, and nothing stalls. Python-only syntax is refused
    with a reason, and clients may add only `alerts.max_runtime_rules` rules."""
    url = target.d.url
    finals = target.health()["streams"]["talk"]["finals"]
    with attack(target) as _:
        added, refused = asyncio.run(
            ask(
                url,
                {"type": "alert.add", "id": 1, "rule": {"name": "evil", "kind": "regex", "match": "(.|.)*\u0001"}},
                {"type": "alert.add", "id": 2, "rule": {"name": "perl", "kind": "regex", "match": r"(a)\1"}},
            )
        )
        assert added["type"] == "alert.added" and added["name"] == "evil"
        assert refused["code"] == "bad_message" and "RE2" in refused["message"] and refused["re"] == 2
        deadline = time.monotonic() + 60
        while target.health()["streams"]["talk"]["finals"] < finals + 3 and time.monotonic() < deadline:
            time.sleep(0.5)  # finals keep coming, each matched against the rule
        assert target.health()["streams"]["talk"]["finals"] >= finals + 3
        rules = [{"name": f"r{i}", "kind": "regex", "match": f"word{i}"} for i in range(30)]
        replies = asyncio.run(ask(url, *({"type": "alert.add", "id": i, "rule": r} for i, r in enumerate(rules))))
    codes = [r.get("code", r["type"]) for r in replies]
    assert codes[:19] == ["alert.added"] * 19 and set(codes[19:]) == {"rule_limit"}, codes  # 20 with "evil"
    assert "alerts.max_runtime_rules" in replies[-1]["message"]
    asyncio.run(ask(url, *({"type": "alert.remove", "id": i, "name": f"r{i}"} for i in range(19))))


def test_rejected_upgrades_leave_nothing_behind(target: Target) -> None:
    """Upgrades with a valid token but a foreign Origin, and upgrades while the server is full, once kept their
    connection in the authenticated set for good (+179 MB per 6,000, +224 MB per 2,000)."""

    async def foreign(n: int) -> list[int]:
        async def one() -> int:
            try:
                async with connect(target.d.url, additional_headers=AUTH, origin="http://evil.example"):  # type: ignore[arg-type]
                    return 101
            except InvalidStatus as e:
                return e.response.status_code

        out: list[int] = []
        for _ in range(n // 20):
            out += await asyncio.gather(*(one() for _ in range(20)))
        return out

    async def while_full(n: int) -> list[Any]:
        holders = [await connect(target.d.url, additional_headers=AUTH) for _ in range(7)]  # + the pinger: 8
        for h in holders:
            await hello(h)

        async def one() -> Any:
            async with connect(target.d.url, additional_headers=AUTH) as ws:
                try:
                    await ws.recv()
                except ConnectionClosed as e:
                    return e.rcvd.code if e.rcvd else None

        try:
            out: list[Any] = []
            for _ in range(n // 10):
                out += await asyncio.gather(*(one() for _ in range(10)))
            return out
        finally:
            for h in holders:
                await h.close()

    asyncio.run(foreign(100))  # warm up the allocator before measuring
    with attack(target):
        statuses = asyncio.run(foreign(2000))
        codes = asyncio.run(while_full(800))
    assert set(statuses) == {403}
    assert set(codes) == {4003}, set(codes)


def test_a_lone_surrogate_anywhere_gets_bad_message(target: Target) -> None:
    """A JSON string escaping half a UTF-16 pair (`"ab\\ud83d"`) once closed the connection with 1011 and logged a
    traceback; in `hello` too."""

    async def go() -> tuple[list[dict[str, Any]], dict[str, Any], int | None]:
        async with connect(target.d.url, additional_headers=AUTH) as ws:
            await hello(ws)
            out = []
            for frame in (
                '{"type": "ping", "id": "ab\\ud83d"}',
                '{"type": "ping", "id": 7, "x": "\\udc00"}',
                '{"type": "history.search", "id": 8, "query": "kettle \\ud800"}',
                '{"type": "ping", "id": "ok\\ud83d\\ude00"}',
            ):
                await ws.send(frame)
                out.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        async with connect(target.d.url, additional_headers=AUTH) as ws:
            await ws.send('{"type": "hello", "protocol": 1, "client": "x\\ud83d", "id": 3}')
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as e:
                return out, refused, e.rcvd.code if e.rcvd else None
        return out, refused, None

    out, refused, code = asyncio.run(go())
    assert [(m.get("code"), m["re"]) for m in out[:3]] == [
        ("bad_message", None),
        ("bad_message", 7),
        ("bad_message", 8),
    ]
    assert "lone UTF-16 surrogate" in out[0]["message"]
    assert out[3] == {**out[3], "type": "pong", "re": "ok\U0001f600"}  # a whole pair is fine
    assert (refused["code"], refused["re"], code) == ("bad_message", 3, 4002)


def test_a_satellite_flooding_audio_is_paced_to_real_time(target: Target) -> None:
    """8 kHz audio in 1 MiB frames (65 s each) as fast as TCP takes it, ~400x real time, once kept +1.4 GB and
    stalled other clients' pings 3-17 s. A frame longer than `server.max_audio_ahead_s` is now refused before it
    is decoded (`bad_audio`), and a flood of short frames is read at real time plus `server.max_audio_ahead_s`:
    nothing is dropped, nothing piles up, and nobody else waits."""

    async def one_huge_frame() -> dict[str, Any]:
        async with connect(target.d.url, additional_headers=AUTH) as ws:
            await hello(ws)
            await ws.send(json.dumps({"type": "audio.start", "id": "a", "stream": "sat", "rate": 8000}))
            assert json.loads(await ws.recv())["type"] == "audio.ready"
            await ws.send(bytes(1 << 20))  # silence, s16le mono at 8 kHz: 65.5 s
            return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))

    refused = asyncio.run(one_huge_frame())
    assert refused["code"] == "bad_audio" and "server.max_audio_ahead_s" in refused["message"], refused
    frame = bytes(8000)  # 0.5 s at 8 kHz
    sent = 0
    claimed = 0.0

    def flood(seconds: float) -> None:
        nonlocal sent, claimed
        with sync_connect(target.d.url, additional_headers=AUTH, max_size=None) as ws:
            ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["-"]}}))
            assert json.loads(ws.recv(10))["type"] == "welcome"
            ws.send(json.dumps({"type": "audio.start", "id": "a", "stream": "sat", "rate": 8000}))
            assert json.loads(ws.recv(10))["type"] == "audio.ready"
            t0 = claimed = time.monotonic()
            done = threading.Event()

            def stop_later() -> None:  # a send blocks while the daemon paces this socket: close it from here
                done.wait(seconds)
                ws.close()

            threading.Thread(target=stop_later, daemon=True).start()
            try:
                while time.monotonic() - t0 < seconds:
                    ws.send(frame)
                    sent += 1
            except ConnectionClosed:
                pass
            done.set()

    start = target.health()["streams"]["sat"]["seconds"]
    with attack(target):
        flood(8.0)
        heard = target.health()["streams"]["sat"]["seconds"] - start
        elapsed = time.monotonic() - claimed
    # what the daemon took by then: real time, plus max_audio_ahead_s, plus the frame that went over it
    assert sent > 20 and heard <= elapsed + 5.0 + 0.5, (heard, elapsed, sent)
    print(f"satellite flood: {sent} frames sent, {heard:.1f} s of audio taken in {elapsed:.1f} s")


def test_the_http_side_checks_host_and_keeps_health_details_for_the_token(target: Target) -> None:
    """A DNS-rebinding page once read `/healthz` and `/metrics` (store path, ports, stream and model names):
    requests naming another Host are refused, and with a token set, the details are the token's."""
    import http.client

    def get(path: str, host: str, auth: bool) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", target.d.port, timeout=10)
        c.request("GET", path, headers={"Host": host, **(AUTH if auth else {})})
        r = c.getresponse()
        return r.status, r.read()

    assert get("/healthz", "evil.example", True)[0] == 403
    assert get("/metrics", "evil.example:8765", True)[0] == 403
    assert get("/", "evil.example", False)[0] == 403
    status, body = get("/healthz", f"127.0.0.1:{target.d.port}", False)
    assert status == 200 and json.loads(body) == {"live": True, "ready": True}
    status, body = get("/healthz", "localhost", True)
    assert status == 200 and "streams" in json.loads(body)
    assert get("/metrics", "localhost", False)[0] == 401
    assert get("/metrics", "localhost", True)[0] == 200
    status, body = get("/favicon.ico", "localhost", False)
    assert status == 200 and body.startswith(b"<svg")
    assert target.health()["rejected_by_reason"]["host"] >= 3


def test_connections_are_capped_at_accept(target: Target) -> None:
    """Idle sockets once exhausted the process's descriptors (then /healthz and the websocket died, and the log
    took 65k tracebacks). Each listener now counts connections from accept and closes one over its cap, and an
    idle one after its timeout."""
    socks = []
    with attack(target):
        for _ in range(150):  # the websocket port: server.max_connections = 48, each idle until open_timeout_s
            socks.append(socket.create_connection(("127.0.0.1", target.d.port)))
        closed = sum(_closed_within(s, 6.0) for s in socks)  # meanwhile the pinger's connection goes on
        assert closed == len(socks)  # over the cap at once, the rest after open_timeout_s
    for s in socks:
        s.close()
    assert target.health()["rejected_by_reason"]["connections"] >= 100
    assert target.d.log().count("refused a connection at accept") <= 5  # logged once per 10 s, with a count


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except (TimeoutError, OSError) as e:
        return not isinstance(e, TimeoutError)


# --- the OpenAI-compatible HTTP API ------------------------------------------------------------------------------


def _api(t: Target) -> socket.socket:
    return socket.create_connection(("127.0.0.1", t.api), timeout=10)


def test_http_api_closes_slow_headers_slow_bodies_and_idle_sockets(target: Target) -> None:
    """1 byte every 2 s of headers or body kept API connections open for good; so did idle sockets."""
    with attack(target):
        idle = _api(target)
        slow_headers = _api(target)
        slow_headers.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(3):  # one more header line every second: never done within header_timeout_s (2 s)
            time.sleep(1.0)
            try:
                slow_headers.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        assert _closed_within(idle, 5.0) and _closed_within(slow_headers, 5.0)
        slow_body = _api(target)
        slow_body.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=xx\r\nContent-Length: 100000\r\n\r\n--xx\r\n"
        )  # fmt: skip
        answer = b""
        slow_body.settimeout(10)
        for _ in range(20):  # 1 byte every 0.5 s: body_timeout_s (3 s) ends it with a 408
            try:
                slow_body.sendall(b"a")
                slow_body.setblocking(False)
                answer += slow_body.recv(65536)
            except (BlockingIOError, OSError):
                pass
            finally:
                slow_body.setblocking(True)
            if answer:
                break
            time.sleep(0.5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"api.body_timeout_s" in answer


def test_http_api_connections_are_capped(target: Target) -> None:
    with attack(target):
        socks = [_api(target) for _ in range(40)]  # api.max_connections = 4
        over = []
        for s in socks[4:]:
            s.settimeout(5)
            over.append(s.recv(1000))
        assert all(r.startswith(b"HTTP/1.1 503") and b'"code": "busy"' in r for r in over), over[:3]
        for s in socks:
            s.close()
        time.sleep(0.5)
        status, _ = _post_models(target)  # the slots came back
        assert status == 200


def _post_models(t: Target, host: str = "localhost") -> tuple[int, dict[str, Any]]:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", t.api, timeout=10)
    c.request("GET", "/v1/models", headers={"Host": host, **AUTH})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def test_http_api_checks_host_and_lists_its_model_with_an_integer_created(target: Target) -> None:
    status, body = _post_models(target, "evil.example")
    assert status == 403 and body["error"]["code"] == "host_not_allowed"
    status, body = _post_models(target)
    assert status == 200 and isinstance(body["data"][0]["created"], int) and body["data"][0]["created"] > 1.7e9


def test_http_api_refuses_hours_of_audio_before_decoding_it(target: Target, tmp_path: Any) -> None:
    """A 3 MB FLAC of 5 h of silence once cost 3.5 GB and 70 s of CPU before its 413: the whole upload was
    decoded before `api.max_audio_s` was checked. The container's own duration is checked first now."""
    import subprocess

    import aiohttp

    flac = tmp_path / "five_hours.flac"
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", str(flac), "trim", "0", "18000"], check=True)

    async def post() -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData()
        form.add_field("file", flac.read_bytes(), filename="a.flac", content_type="audio/flac")
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{target.api}/v1/audio/transcriptions", data=form, headers=AUTH) as r,
        ):
            return r.status, await r.json()

    with attack(target):
        status, body = asyncio.run(post())
    assert status == 413 and body["error"]["code"] == "audio_too_long", body
    assert "declares 18000.0 s" in body["error"]["message"]


def test_http_api_bounds_every_form_part_before_holding_it(target: Target) -> None:
    """A form field other than `file` was read whole before its length was checked: with a chunked body (no
    Content-Length to refuse early) a 50 MB `model` field was buffered, and `decode=True` would have inflated a
    gzip-encoded one. Every part is now read raw in chunks, against one budget for the whole form."""

    def chunked(body_parts: Any) -> tuple[int, bytes]:
        s = _api(target)
        s.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=xx\r\nTransfer-Encoding: chunked\r\n\r\n"
        )  # fmt: skip
        try:
            for piece in body_parts:
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        except OSError:
            pass  # the daemon answered and closed before the client was done: what this test wants
        s.settimeout(10)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, OSError):
            pass
        s.close()
        return int(answer.split(b" ", 2)[1]), answer

    def huge_field() -> Any:
        yield b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        for _ in range(100 * 16):  # 100 MB of one field, 64 KB at a time
            yield b"a" * 65536

    peak = 0.0
    sampling = threading.Event()

    def sample() -> None:  # the daemon's memory while the field arrives: reading it whole shows as +100 MB
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, target.rss_mb())
            time.sleep(0.01)

    many = b"".join(f'--xx\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode() for i in range(40))
    with attack(target):
        before = target.rss_mb()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status, answer = chunked(huge_field())
        sampling.set()
        sampler.join(5)
        assert status == 400 and b"form field 'model' is too long" in answer, answer[:300]
        assert peak - before < MEMORY_MB, f"a form field was held whole: +{peak - before:.0f} MB while it arrived"
        status, answer = chunked([many + b"--xx--\r\n", b""])
        assert status == 400 and b"more than 32 form parts" in answer, answer[:300]


# --- Wyoming ---------------------------------------------------------------------------------------------------


def _wyoming(t: Target) -> socket.socket:
    return socket.create_connection(("127.0.0.1", t.wyoming), timeout=10)


def _event(kind: str, data: dict[str, Any] | None = None, payload: bytes = b"", **header: Any) -> bytes:
    head: dict[str, Any] = {"type": kind, **header}
    body = json.dumps(data).encode() if data else b""
    if body:
        head["data_length"] = len(body)
    if payload:
        head["payload_length"] = len(payload)
    return json.dumps(head).encode() + b"\n" + body + payload


def _errors(s: socket.socket, seconds: float = 10.0) -> tuple[list[dict[str, Any]], bool]:
    """The error events a Wyoming connection got, and whether the daemon then closed it."""
    s.settimeout(seconds)
    buf = b""
    try:
        while chunk := s.recv(65536):
            buf += chunk
        closed = True
    except TimeoutError:
        closed = False
    out = []
    lines = buf.split(b"\n")
    i = 0
    while i < len(lines) - 1:
        head = json.loads(lines[i])
        i += 1
        if head.get("data_length"):
            rest = b"\n".join(lines[i:])
            data, rest = rest[: head["data_length"]], rest[head["data_length"] :]
            lines = lines[:i] + rest.split(b"\n")
            head["data"] = json.loads(data)
        if head["type"] == "error":
            out.append(head.get("data", {}))
    return out, closed


def test_wyoming_closes_idle_and_stalled_requests_and_caps_connections(target: Target) -> None:
    """`audio-start` then nothing, and idle sockets, once stayed open for good."""
    with attack(target):
        stalled = _wyoming(target)
        stalled.sendall(_event("audio-start", {"rate": 16000, "width": 2, "channels": 1}))
        idle = [_wyoming(target) for _ in range(12)]  # wyoming.max_connections = 4 (the stalled one is the 1st)
        errors, closed = _errors(stalled)
        assert closed and [e["code"] for e in errors] == ["timeout"] and "wyoming.idle_timeout_s" in errors[0]["text"]
        outcomes = [_errors(s) for s in idle]
        codes = sorted(e[0]["code"] for e, _ in outcomes)
        assert all(c for _, c in outcomes) and codes == ["busy"] * 9 + ["timeout"] * 3, codes
        for s in idle:
            s.close()


def test_wyoming_checks_sizes_and_rates_before_any_work(target: Target) -> None:
    """A 400 MiB `payload_length` was read into memory before any check; a chunk claiming rate 1 was resampled
    (16 KB → 256 MB) before its size was counted; rate 0 or -5 raised an unhandled error."""
    with attack(target):
        big = _wyoming(target)
        big.sendall(json.dumps({"type": "audio-chunk", "payload_length": 400 << 20}).encode() + b"\n" + bytes(1000))
        errors, closed = _errors(big)
        assert closed and [e["code"] for e in errors] == ["too-large"], errors
        deep = _wyoming(target)  # nested past what json can read: a RecursionError, not a ValueError
        deep.sendall(b"[" * 30000 + b"]" * 30000 + b"\n")
        errors, closed = _errors(deep)
        assert closed and [e["code"] for e in errors] == ["bad-event"], errors
        for rate in (1, 0, -5, "x", 10**9):
            s = _wyoming(target)
            s.sendall(_event("audio-start", {"rate": 16000, "width": 2, "channels": 1}))
            s.sendall(_event("audio-chunk", {"rate": rate, "width": 2, "channels": 1}, payload=bytes(16384)))
            errors, closed = _errors(s)
            assert closed and [e["code"] for e in errors] == ["bad-audio"], (rate, errors)
        s = _wyoming(target)  # a valid rate, but more converted audio than wyoming.max_audio_s: counted, not made
        s.sendall(_event("audio-start", {"rate": 8000, "width": 2, "channels": 1}))
        for _ in range(20):  # 20 x 16 s at 8 kHz = 320 s > 20 s
            s.sendall(_event("audio-chunk", {"rate": 8000, "width": 2, "channels": 1}, payload=bytes(256000)))
        s.sendall(_event("audio-stop"))
        errors, closed = _errors(s, 4.0)
        assert errors[0]["code"] == "audio-too-long" and {e["code"] for e in errors[1:]} <= {"timeout"}, errors
        s.close()


def test_a_refused_connection_gets_its_error_not_a_reset(target: Target) -> None:
    """A client still sending when its connection is refused: the daemon closed with that input unread, the kernel
    answered with a reset, and the reset discarded the error event waiting in the client's buffer
    (`ConnectionResetError` in the fuzz test). Now the error arrives, then the close."""
    bad = _event("audio-chunk", {"rate": 1, "width": 2, "channels": 1}, payload=bytes(16))
    rest = _event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, payload=bytes(60000)) + _event("describe")
    for _ in range(5):
        s = _wyoming(target)
        s.sendall(bad + rest * 4)
        errors, closed = _errors(s)  # raises ConnectionResetError on a reset
        assert closed and [e["code"] for e in errors] == ["bad-audio"], errors
        s.close()


def test_the_daemon_still_transcribes_for_well_behaved_clients(target: Target) -> None:
    """After every attack above: a satellite's audio still becomes finals (the stream was never wedged)."""
    from ltu_as.model.audio import load_audio

    pcm = (np.clip(load_audio(str(ASSET))[: 16000 * 5], -1, 1) * 32767).astype("<i2").tobytes()

    async def go() -> list[dict[str, Any]]:
        async with connect(target.d.url, additional_headers=AUTH) as ws:
            await hello(ws, subscribe={"streams": ["sat"], "events": ["transcript.final"]})
            await ws.send(json.dumps({"type": "audio.start", "id": 1, "stream": "sat", "rate": 16000}))
            assert json.loads(await ws.recv())["type"] == "audio.ready"
            for i in range(0, len(pcm), 3200):
                await ws.send(pcm[i : i + 3200])
            await ws.send(json.dumps({"type": "audio.stop", "id": 2}))
            got = []
            while not got or got[-1]["type"] != "transcript.final":
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            return got

    got = asyncio.run(go())
    assert got[-1]["stream"] == "sat" and got[-1]["outcome"] in ("speech", "no_speech")
