"""Reloading the config of a running daemon (SIGHUP), as a subprocess with a real store, a real mosquitto and a
real websocket client that stays connected throughout: streams added, removed and changed, alert rules, MQTT and
retention applied live; restart-only keys named; an invalid config refused with the old one kept."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto, Subscriber
from conftest import ASSET
from daemon_harness import Daemon, tiny_asr_config
from websockets.asyncio.client import connect

pytestmark = pytest.mark.integration


def config(tiny: Any, tmp: Path, *, streams: str, rules: str = "", mqtt_port: int = 0, extra: str = "") -> str:
    mqtt = f'[mqtt]\nenabled = true\nurl = "mqtt://127.0.0.1:{mqtt_port}"\nkeepalive_s = 5\n' if mqtt_port else ""
    return (
        tiny_asr_config(tiny)
        + f"""
[windows]
hop_s = 2.0

[store]
path = "{tmp / "history.db"}"
embeddings = false
{extra}
{mqtt}
[alerts]
tick_s = 0.2
{rules}
{streams}
"""
    )


TALK = f'[[streams]]\nname = "talk"\nsource = "file"\npath = "{ASSET}"\nrealtime = true\nloop = true\n'
KITCHEN = f'[[streams]]\nname = "kitchen"\nsource = "file"\npath = "{ASSET}"\nrealtime = true\nloop = true\n'
GARAGE = f'[[streams]]\nname = "garage"\nsource = "file"\npath = "{ASSET}"\nrealtime = false\n'
# the tiny random ASR writes noise: any text it hears fires this rule
KETTLE = '[[alerts.rules]]\nname = "kettle"\nkind = "regex"\nmatch = "."\nstreams = ["garage"]\n'


def test_sighup_applies_streams_rules_mqtt_and_retention_live_and_refuses_a_bad_config(
    tiny: Any, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path).start()
    sub = Subscriber(broker.port)
    d = Daemon(tmp_path, config(tiny, tmp_path, streams=TALK + KITCHEN))
    events: list[dict[str, Any]] = []

    def reload(text: str) -> None:
        d.config_path.write_text(text)
        d.proc.send_signal(signal.SIGHUP)

    async def until(pred: Callable[[], bool], ws: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            assert left > 0, [(e["type"], e.get("stream"), e.get("state"), e.get("text")) for e in events[-30:]]
            with contextlib.suppress(TimeoutError):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), left)))

    def of(kind: str, stream: str | None = None) -> list[dict[str, Any]]:
        return [e for e in events if e["type"] == kind and stream in (None, e["stream"])]

    async def go() -> dict[str, Any]:
        async with connect(d.url) as ws:  # one connection throughout: no reload may drop it
            await ws.send(
                json.dumps(
                    {
                        "type": "hello",
                        "protocol": 1,
                        "subscribe": {"events": ["window", "transcript.final", "alert*", "stream.status"]},
                    }
                )
            )
            assert json.loads(await ws.recv())["type"] == "welcome"
            await until(lambda: len(of("window", "talk")) >= 2 and len(of("transcript.final", "kitchen")) >= 1, ws)

            # 1. kitchen goes, garage comes with a rule watching it, MQTT starts, retention shrinks; the ASR's
            # beam (shared by every stream) waits for a restart
            reload(
                config(
                    tiny,
                    tmp_path,
                    streams=TALK + GARAGE,
                    rules=KETTLE,
                    mqtt_port=broker.port,
                    extra="retention_days = 5.0\n",
                ).replace("beam_size = 1", "beam_size = 2")
            )
            await until(lambda: any(e["state"] == "closed" for e in of("stream.status", "garage")), ws)
            await until(lambda: len(of("alert", "garage")) >= 1, ws)
            _, h1 = d.health()

            # 2. a config that does not validate: refused, nothing changes
            bad = config(tiny, tmp_path, streams=TALK + GARAGE, rules=KETTLE).replace("hop_s = 2.0", "hop_s = 99")
            reload(bad)
            await until(lambda: d.health()[1]["reloads"]["refused"] >= 1, ws, 30)  # reading on: talk goes on
            _, h2 = d.health()

            # 3. garage changes (its chunk size): it restarts and reads the file again, numbering on; the rule goes
            seen = len(of("transcript.final", "garage"))
            changed = GARAGE.replace("realtime", "chunk_ms = 200\nrealtime")
            reload(
                config(tiny, tmp_path, streams=TALK + changed, mqtt_port=broker.port, extra="retention_days = 5.0\n")
            )
            await until(lambda: len(of("transcript.final", "garage")) >= 2 * seen, ws)
            talk = len(of("window", "talk"))
            await until(lambda: len(of("window", "talk")) > talk, ws)  # talk still windows after all three
            return {"h1": h1, "h2": h2, "seen": seen, "open": ws.state.name}

    try:
        out = asyncio.run(go())
        _, h3 = d.health()
    finally:
        code = d.stop()
        sub.stop()
        broker.stop()
    log = d.log()
    assert code == 0, log
    h1, h2 = out["h1"], out["h2"]
    assert out["open"] == "OPEN"

    # 1. applied live
    assert sorted(h1["streams"]) == ["garage", "talk"]
    kitchen = of("stream.status", "kitchen")
    assert kitchen[-1]["state"] == "closed" and kitchen[-1]["detail"] == "removed from the config"
    last = h1["reloads"]["last"]
    assert last["ok"] and last["restart_needed"] == ["asr.beam_size"]
    assert set(last["applied"]) == {
        "stream garage added",
        "stream kitchen removed",
        "alert rules",
        "mqtt",
        "store retention",
    }
    assert h1["store"]["retention_days"] == 5.0 and h1["alerts"]["rules"] == 1
    alert = of("alert", "garage")[0]
    assert alert["rule"] == "kettle" and alert["id"].startswith("kettle/garage/")
    assert "config reload: these keys changed but apply only on restart: asr.beam_size" in log
    got = sub.wait(lambda m: any(x.topic.endswith("_garage/scene/config") and x.payload for x in m))
    assert any(x.topic == "ltu/availability" and x.payload == b"online" for x in got)
    assert not any("_kitchen/" in x.topic for x in got)  # announced only for the streams configured now

    # 2. refused, the running config kept
    assert h2["reloads"]["refused"] == 1 and h2["reloads"]["count"] == 1
    assert "windows.hop_s: Input should be less than or equal to 10" in h2["reloads"]["last"]["error"]
    assert sorted(h2["streams"]) == ["garage", "talk"]
    assert "config reload refused; the running config stays" in log

    # 3. a changed stream restarts alone and its ids go on; the removed rule is gone
    garage = of("stream.status", "garage")
    assert any(e["detail"] == "restarting: its config changed" for e in garage)
    ids = [e["id"] for e in of("transcript.final", "garage")]
    assert len(ids) == len(set(ids)) >= 2 * out["seen"]
    assert h3["alerts"]["rules"] == 0 and h3["reloads"]["count"] == 2

    # throughout: the talk stream never restarted and its windows are numbered without a gap
    assert not any(e["state"] in ("closed", "starting") for e in of("stream.status", "talk"))
    talk = [int(e["id"].rsplit(":w", 1)[1]) for e in of("window", "talk")]
    assert talk == list(range(talk[0], talk[0] + len(talk))) and len(talk) >= 3
