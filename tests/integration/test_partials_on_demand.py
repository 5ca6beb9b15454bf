"""Partials cost ASR time only while someone reads them: the daemon as a subprocess with a real-time looping file
stream (real webrtcvad, real faster-whisper on the converted tiny model). With clients subscribed to everything
but partials, not one partial decode runs (counted in /healthz and /metrics); once a client subscribes to the
stream's partials they are decoded and arrive; when it leaves they stop again."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest
from conftest import ASSET
from daemon_harness import Daemon, tiny_asr_config
from websockets.asyncio.client import connect

pytestmark = pytest.mark.integration


def _config(tiny: Any) -> str:
    return (
        tiny_asr_config(tiny)
        + f"""
[[streams]]
name = "talk"
source = "file"
path = "{ASSET}"
realtime = true
loop = true

[[streams]]
name = "other"
source = "remote"
"""
    )


async def _events(url: str, subscribe: dict[str, Any], until: str, count: int, timeout: float = 90) -> list[dict]:
    got: list[dict] = []
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": subscribe}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        deadline = time.monotonic() + timeout
        while sum(e["type"] == until for e in got) < count:
            e = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
            got.append(e)
    return got


def _metric(d: Daemon, name: str, label: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f"{name}{{{label}}}"))
    return float(line.split()[-1])


def test_partials_are_decoded_only_while_a_client_reads_them(tiny, tmp_path) -> None:
    d = Daemon(tmp_path, _config(tiny))
    try:
        # a client that wants finals, and one that wants the partials of another stream only
        unread = {"streams": ["talk"], "events": ["speech.start", "transcript.final", "stream.*"]}
        other = {"streams": ["other"], "events": ["transcript.partial"]}

        async def without_readers() -> list[dict]:
            async with connect(d.url) as ws:
                await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": other}))
                await ws.recv()
                return await _events(d.url, unread, "transcript.final", 3)

        got = asyncio.run(without_readers())
        assert not [e for e in got if e["type"] == "transcript.partial"]
        _, h = d.health()
        assert h["asr"]["decodes"]["partial"] == 0
        assert h["asr"]["partials_skipped"]["unread"] >= 3  # due while the talk stream spoke, not decoded
        assert h["streams"]["talk"]["partials_unread"] == h["asr"]["partials_skipped"]["unread"]
        assert h["asr"]["decodes"]["speculative"] + h["asr"]["decodes"]["final"] >= 3
        assert _metric(d, "ltu_asr_decodes_total", 'kind="partial"') == 0
        assert h["asr"]["mode"] == "normal" and h["asr"]["lanes"] == 2

        # a reader of the talk stream's partials: they are decoded and arrive, before their finals
        got = asyncio.run(_events(d.url, {"streams": ["talk"], "events": ["transcript.*"]}, "transcript.partial", 2))
        _, h = d.health()
        assert h["asr"]["decodes"]["partial"] >= 2
        assert _metric(d, "ltu_asr_decodes_total", 'kind="partial"') >= 2

        # it left: no partial decode starts any more (one already queued may still finish)
        time.sleep(1.0)
        before = d.health()[1]["asr"]["decodes"]["partial"]
        asyncio.run(_events(d.url, unread, "transcript.final", 2))
        after = d.health()[1]
        assert after["asr"]["decodes"]["partial"] == before
        assert after["asr"]["partials_skipped"]["unread"] > h["asr"]["partials_skipped"]["unread"]
    finally:
        assert d.stop() == 0, d.log()
