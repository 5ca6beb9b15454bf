"""Alert rules as a pure state machine: firing, debounce, hold and clear, cooldown, active hours, streams, kinds."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydantic import ValidationError

from daemon.delivery.events import (
    AlertClearedEvent,
    AlertEvent,
    Evidence,
    FinalEvent,
    LevelEvent,
    SceneEvent,
    StreamEvent,
)
from daemon.memory.alerts import AlertEngine, RuleLimit
from daemon.rules import MAX_PROGRAM, AlertRule, matcher

T0 = 1_800_000_000.0


def final(text: str, wall: float, stream: str = "kitchen") -> FinalEvent:
    return FinalEvent(
        stream=stream,
        id=f"{stream}/1",
        start=wall - T0,
        end=wall - T0 + 1,
        speech_end=wall - T0 + 1,
        text=text,
        outcome="speech" if text else "no_speech",
        reason="silence",
        wall_start=wall,
        wall_end=wall + 1,
        dropped_segments=0,
        asr_ms=1,
        queue_ms=0,
    )


def level(rms: float, wall: float, stream: str = "kitchen") -> LevelEvent:
    return LevelEvent(stream=stream, start=wall - T0, end=wall - T0 + 0.25, rms_dbfs=rms, peak_dbfs=rms + 3, time=wall)


def engine(*rules: AlertRule, hour: int = 12) -> tuple[AlertEngine, list[StreamEvent]]:
    out: list[StreamEvent] = []
    e = AlertEngine(rules, [], out.append, local_time=lambda t: datetime(2026, 11, 26, hour, 0))
    return e, out


def kinds(out: list[StreamEvent]) -> list[tuple[str, str]]:
    return [(o.type, o.id) for o in out if isinstance(o, AlertEvent | AlertClearedEvent)]


def test_phrase_fires_once_per_occurrence_holds_clears_and_cools_down() -> None:
    e, out = engine(AlertRule(name="kettle", kind="phrase", match="kettle is boiling", hold_s=10, cooldown_s=60))
    e.on_event(final("The KETTLE   is boiling!", T0))
    e.on_event(final("the kettle is boiling again", T0 + 5))  # within hold: the same alert goes on
    e.on_event(final("a kettles is boilingly", T0 + 6))  # not the whole words
    e.tick(T0 + 14)
    assert kinds(out) == [("alert", "kettle/kitchen/1")]
    alert = out[0]
    assert isinstance(alert, AlertEvent) and alert.evidence == "The KETTLE   is boiling!" and alert.wall == T0
    e.tick(T0 + 15.1)  # 10 s after the last hit
    assert kinds(out)[-1] == ("alert.cleared", "kettle/kitchen/1")
    assert isinstance(out[-1], AlertClearedEvent) and out[-1].active_s == pytest.approx(15.1)
    e.on_event(final("kettle is boiling", T0 + 30))  # within the cooldown (60 s after firing): nothing
    e.tick(T0 + 50)
    e.on_event(final("kettle is boiling", T0 + 61))
    assert kinds(out)[-1] == ("alert", "kettle/kitchen/2")


def test_regex_label_streams_and_active_hours() -> None:
    rx = AlertRule(name="router", kind="regex", match=r"restart\w* the (router|modem)", streams=["office*"])
    label = AlertRule(name="dog", kind="label", match="dog barking")
    night = AlertRule(name="night", kind="phrase", match="hello", active_hours="22:00-06:00")
    e, out = engine(rx, label, night)
    e.on_event(final("please restarting the Modem", T0, "office-2"))
    e.on_event(final("please restart the router", T0, "kitchen"))  # not watched
    e.on_event(final("hello there", T0))  # noon: outside the night rule's hours
    w = Evidence(id="yard:w3", stream="yard", start=20, end=30, wall_start=None, wall_end=None)
    e.on_event(
        SceneEvent(
            stream="yard",
            window={"id": "yard:w3", "stream": "yard", "start": 20, "end": 30, "transcript": ""},
            text="A dog barking loudly.",
            tokens=5,
            skipped=0,
            timings={"queue_ms": 0, "features_ms": 0, "generate_ms": 0, "batch": 1},
        )
    )
    assert kinds(out) == [("alert", "router/office-2/1"), ("alert", "dog/yard/1")]
    dog = out[1]
    assert isinstance(dog, AlertEvent) and dog.window == w and dog.kind == "label"
    e2, out2 = engine(night, hour=23)
    e2.on_event(final("hello there", T0))
    assert kinds(out2) == [("alert", "night/kitchen/1")]


def test_level_rule_needs_the_level_to_hold_for_the_debounce() -> None:
    loud = AlertRule(name="loud", kind="level", above_dbfs=-20, debounce_s=1.0, hold_s=0.5, cooldown_s=0)
    e, out = engine(loud)
    for i in range(3):  # 0.75 s loud, then a quiet block: not long enough
        e.on_event(level(-10, T0 + 0.25 * i))
    e.on_event(level(-40, T0 + 0.75))
    for i in range(6):  # 1.5 s loud
        e.on_event(level(-10, T0 + 1 + 0.25 * i))
    assert kinds(out) == [("alert", "loud/kitchen/1")]
    assert isinstance(out[0], AlertEvent) and out[0].score == -10 and out[0].wall == T0 + 2.0  # held 1 s from T0 + 1
    e.on_event(level(-40, T0 + 2.5))
    e.tick(T0 + 2.8)
    assert kinds(out)[-1] == ("alert.cleared", "loud/kitchen/1")


def test_question_rules_fire_on_the_threshold_and_are_listed_per_stream() -> None:
    q = AlertRule(
        name="smoke", kind="question", question="Is a smoke alarm beeping?", threshold=0.8, streams=["kitchen"]
    )
    e, out = engine(q)
    assert e.questions("kitchen") == [q] and e.questions("porch") == []
    w = Evidence(id="kitchen:w7", stream="kitchen", start=60, end=70, wall_start=T0, wall_end=T0 + 10)
    e.on_check("kitchen", w, T0, {"smoke": 0.79})
    assert out == []
    e.on_check("kitchen", w, T0 + 10, {"smoke": 0.93, "gone": 1.0})
    assert kinds(out) == [("alert", "smoke/kitchen/1")]
    assert isinstance(out[0], AlertEvent) and out[0].score == 0.93 and out[0].window == w


def test_runtime_rules_add_remove_and_config_rules_are_fixed() -> None:
    fixed = AlertRule(name="fixed", kind="phrase", match="x")
    e, out = engine(fixed)
    with pytest.raises(KeyError):
        e.add(AlertRule(name="fixed", kind="phrase", match="y"))
    e.add(AlertRule(name="tmp", kind="phrase", match="door open"))
    e.on_event(final("the door open again", T0))
    assert [i.rule.name for i in e.info()] == ["fixed", "tmp"] and e.info()[1].active == ["kitchen"]
    e.remove("tmp")  # its active alert clears with it
    assert kinds(out) == [("alert", "tmp/kitchen/1"), ("alert.cleared", "tmp/kitchen/1")]
    with pytest.raises(KeyError):
        e.remove("fixed")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "phrase"}, "needs `match`"),
        ({"kind": "question"}, "needs `question`"),
        ({"kind": "level"}, "needs above_dbfs or below_dbfs"),
        ({"kind": "phrase", "match": "a", "above_dbfs": -3.0}, "does not use above_dbfs"),
        ({"kind": "regex", "match": "(unclosed"}, "not a regular expression RE2 accepts: missing \\)"),
        ({"kind": "regex", "match": r"(a)\1"}, "no backreferences or lookaround"),
        ({"kind": "regex", "match": r"(?<=x)y"}, "no backreferences or lookaround"),
        ({"kind": "regex", "match": r"[\w\s]{1,100}x"}, "too complex: 1204 RE2 instructions, at most 500"),
        ({"kind": "regex", "match": r"(\w+\s?){1000}"}, "pattern too large"),
        ({"kind": "phrase", "match": "a", "active_hours": "24:00-01:00"}, "hours 00-23"),
        ({"kind": "phrase", "match": "a", "name": "Bad Name"}, "name"),
    ],
)
def test_bad_rules_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AlertRule.model_validate({"name": "r", **fields})


def test_a_catastrophic_regex_is_matched_in_linear_time() -> None:
    """`(.|.)*\\x01` backtracks 2^n ways in Python's `re` (a 60-character transcript would never finish, and the
    event loop with it). Regex rules run on RE2, which matches it in one pass."""
    bad = AlertRule(name="bad", kind="regex", match="(.|.)*\u0001")
    assert type(matcher(bad)).__module__.startswith("re2"), "regex rules must not run on a backtracking engine"
    good = AlertRule(name="router", kind="regex", match=r"restart\w* the (router|modem)")
    e, out = engine(bad, good)
    e.on_event(final("a" * 3000 + " please restart the router", T0))
    assert kinds(out) == [("alert", "router/kitchen/1")]
    assert matcher(good).programsize <= MAX_PROGRAM  # type: ignore[union-attr]


def test_clients_may_add_only_so_many_rules() -> None:
    e = AlertEngine([AlertRule(name="cfg", kind="phrase", match="x")], [], lambda _e: None, max_runtime=2)
    e.add(AlertRule(name="a", kind="phrase", match="a"))
    e.add(AlertRule(name="b", kind="phrase", match="b"))
    e.add(AlertRule(name="b", kind="phrase", match="bee"))  # replacing one is not adding one
    with pytest.raises(RuleLimit):
        e.add(AlertRule(name="c", kind="phrase", match="c"))
    e.remove("a")
    e.add(AlertRule(name="c", kind="phrase", match="c"))
    assert sorted(r.rule.name for r in e.info()) == ["b", "c", "cfg"]
    # more stored than allowed (a lower cap after a restart): the oldest are kept, the rest skipped
    stored = [AlertRule(name=n, kind="phrase", match=n) for n in ("p", "q", "r")]
    e = AlertEngine([], stored, lambda _e: None, max_runtime=2)
    assert [r.rule.name for r in e.info()] == ["p", "q"]
