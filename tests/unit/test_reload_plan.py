"""Reloading the config (SIGHUP) as pure functions: what a new config changes live and what waits for a restart,
and the alert engine taking a new set of config rules. The running daemon is tested in
tests/integration/test_reload.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, DaemonConfig
from daemon.delivery.events import AlertEvent, FinalEvent, StreamEvent
from daemon.memory.alerts import AlertEngine
from daemon.reload import in_effect, plan
from daemon.rules import AlertRule

T0 = 1_800_000_000.0


def cfg(**tree: object) -> DaemonConfig:
    return DaemonConfig.model_validate(tree)


def streams(*specs: tuple[str, str]) -> list[dict[str, object]]:
    return [{"name": n, "source": "file", "path": p} for n, p in specs]


def test_streams_are_added_removed_and_changed_by_name() -> None:
    old = cfg(streams=streams(("a", "/x.wav"), ("b", "/y.wav"), ("c", "/z.wav")))
    new = cfg(streams=streams(("d", "/w.wav"), ("c", "/z.wav"), ("b", "/other.wav")))
    p = plan(old, new)
    assert (p.added, p.removed, p.changed) == (("d",), ("a",), ("b",))
    assert not (p.rules or p.mqtt or p.retention or p.restart)
    assert p.live == ["stream d added", "stream a removed", "stream b changed"]
    assert [s.name for s in in_effect(old, new).streams] == ["d", "c", "b"]


def test_an_unchanged_config_plans_nothing() -> None:
    old = cfg(streams=streams(("a", "/x.wav")), alerts={"rules": [{"name": "k", "kind": "phrase", "match": "k"}]})
    assert plan(old, old.model_copy(deep=True)).empty


def test_restart_only_keys_are_named_and_keep_their_running_values() -> None:
    old = cfg(store={"path": "/a.db", "retention_days": 30})
    new = cfg(
        store={"path": "/b.db", "retention_days": 5, "max_mb": 10},
        asr={"beam_size": 2},
        server={"port": 9999},
        alerts={"tick_s": 0.5, "rules": [{"name": "k", "kind": "phrase", "match": "k"}]},
        mqtt={"enabled": True},
        log={"level": "debug"},
    )
    p = plan(old, new)
    assert p.restart == ("server.port", "asr.beam_size", "store.path", "alerts.tick_s")
    assert p.rules and p.mqtt and p.retention and p.log_level
    now = in_effect(old, new)
    assert now.server.port == old.server.port and now.asr.beam_size == old.asr.beam_size
    assert now.alerts.tick_s == old.alerts.tick_s and [r.name for r in now.alerts.rules] == ["k"]
    assert now.store.path == Path("/a.db") and (now.store.retention_days, now.store.max_mb) == (5, 10)
    assert now.mqtt.enabled and now.log.level == "debug"


def test_a_new_config_whose_live_part_clashes_with_the_running_one_is_refused() -> None:
    old = cfg(wyoming={"enabled": True, "stream": "voice"})
    new = cfg(wyoming={"enabled": True, "stream": "speech"}, streams=streams(("voice", "/x.wav")))
    # valid on its own (its Wyoming stream moved), but the running Wyoming stream keeps its name until a restart
    with pytest.raises(ConfigError, match=r"wyoming.stream 'voice' is also a \[\[streams\]\] name"):
        in_effect(old, new)


def final(text: str, wall: float) -> FinalEvent:
    return FinalEvent(
        stream="kitchen",
        id="kitchen/1",
        start=wall - T0,
        end=wall - T0 + 1,
        speech_end=wall - T0 + 1,
        text=text,
        outcome="speech",
        reason="silence",
        wall_start=wall,
        wall_end=wall + 1,
        dropped_segments=0,
        asr_ms=1,
        queue_ms=0,
    )


def test_new_config_rules_keep_unchanged_alerts_and_clear_changed_and_removed_ones() -> None:
    out: list[StreamEvent] = []
    kettle = AlertRule(name="kettle", kind="phrase", match="kettle", hold_s=60)
    door = AlertRule(name="door", kind="phrase", match="door", hold_s=60)
    e = AlertEngine([kettle, door], [AlertRule(name="tmp", kind="phrase", match="tmp")], out.append)
    e.on_event(final("the kettle and the door", T0))
    assert sorted(a.rule for a in e.active()) == ["door", "kettle"]
    door2 = door.model_copy(update={"match": "front door"})
    bell = AlertRule(name="tmp", kind="phrase", match="bell")  # shadows the runtime rule of that name
    e.set_config_rules([kettle, door2, bell], runtime=[AlertRule(name="tmp", kind="phrase", match="tmp")])
    assert [a.rule for a in e.active()] == ["kettle"]  # unchanged: still active, same alert
    assert [(x.type, x.rule) for x in out if x.type == "alert.cleared"] == [("alert.cleared", "door")]
    assert {(i.rule.name, i.source) for i in e.info()} == {("kettle", "config"), ("door", "config"), ("tmp", "config")}
    # the config rule goes: the runtime rule it shadowed comes back from the store's list
    e.set_config_rules([kettle], runtime=[AlertRule(name="tmp", kind="phrase", match="tmp")])
    assert {(i.rule.name, i.source) for i in e.info()} == {("kettle", "config"), ("tmp", "runtime")}
    e.on_event(final("kettle again", T0 + 5))
    fired = [x for x in out if isinstance(x, AlertEvent)]
    assert [a.id for a in fired] == ["kettle/kitchen/1", "door/kitchen/1"]  # the held kettle alert did not refire
