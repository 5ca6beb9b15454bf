"""Alert rules: a pure state machine per (rule, stream) fed with transcripts, scenes, levels and yes/no checks.

For each rule and stream the *condition* begins at a hit (a phrase or regex in a final transcript, a label in a
scene description, P(yes) ≥ threshold for a window, the level beyond its bound) and holds while hits keep coming
within `hold_s` of each other (level rules: while the level stays beyond the bound). The alert fires once the
condition has held `debounce_s` (0: at once), at most once per `cooldown_s` per stream, and only within
`active_hours`; it clears (`alert.cleared`) when the condition has been absent for `hold_s`.

No asyncio, no I/O: events come in through `on_event` / `on_check`, time through `tick`; alerts go out through
`publish`. The service calls `tick` every `alerts.tick_s`. Matching runs on the event loop, so its cost is bounded
(`daemon.rules`: RE2 for regex rules, a program-size cap), and so is the number of rules clients may add
(`alerts.max_runtime_rules`).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from ..delivery.events import (
    AlertClearedEvent,
    AlertEvent,
    Evidence,
    FinalEvent,
    LevelEvent,
    RuleInfo,
    SceneEvent,
    StreamEvent,
)
from ..rules import MAX_MATCH_CHARS, AlertRule, Matcher, matcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One observation that satisfies a rule."""

    stream: str
    wall: float  # when it was observed (Unix s): the engine's clock for debounce, hold and cooldown
    at: float  # stream clock, s
    evidence: str
    score: float | None = None
    window: Evidence | None = None


@dataclass
class _State:
    since: float | None = None  # the condition began (wall); None: not holding
    last: float = 0.0  # the latest hit (wall)
    hit: Hit | None = None  # the latest hit
    active: AlertEvent | None = None
    fired: float | None = None  # last firing (wall), for the cooldown
    count: int = 0


@dataclass
class _Rule:
    rule: AlertRule
    source: Literal["config", "runtime"]
    pattern: Matcher | None = None
    states: dict[str, _State] = field(default_factory=dict)

    def watches(self, stream: str) -> bool:
        return any(fnmatch.fnmatchcase(stream, g) for g in self.rule.streams)


class RuleLimit(Exception):
    """A client's rule would go over `alerts.max_runtime_rules`."""


class AlertEngine:
    def __init__(
        self,
        rules: Iterable[AlertRule],
        runtime: Iterable[AlertRule],
        publish: Callable[[StreamEvent], object],
        *,
        clip: Callable[[AlertEvent, AlertRule], str | None] | None = None,
        counts: dict[tuple[str, str], int] | None = None,
        local_time: Callable[[float], datetime] = datetime.fromtimestamp,
        max_runtime: int = 32,
    ) -> None:
        """`rules` from the config, `runtime` ones from the store (at most `max_runtime` of them, oldest first);
        `publish` gets every alert and alert.cleared; `clip(alert, rule)` may keep audio and return the clip's
        name (rules with `clip = true`); `counts`: (rule, stream) → the last alert number stored, so ids stay
        unique across restarts."""
        self.publish, self.clip, self.local_time = publish, clip, local_time
        self.max_runtime = max_runtime
        self._counts = dict(counts or {})
        self._rules: dict[str, _Rule] = {}
        for r in rules:
            self._rules[r.name] = _Rule(r, "config", matcher(r))
        for r in runtime:
            if r.name in self._rules:
                log.warning("runtime alert rule %r is shadowed by the config rule of that name", r.name)
            elif self.runtime_count() >= max_runtime:
                log.warning("runtime alert rule %r not loaded: over alerts.max_runtime_rules = %d", r.name, max_runtime)
            else:
                self._rules[r.name] = _Rule(r, "runtime", matcher(r))
        self.fired = 0
        self.cleared = 0

    # --- rules ---

    def runtime_count(self) -> int:
        return sum(r.source == "runtime" for r in self._rules.values())

    def add(self, rule: AlertRule) -> None:
        """Add a runtime rule (replacing a runtime rule of that name). Raises `KeyError` for a config rule and
        `RuleLimit` for a new rule beyond `max_runtime`."""
        old = self._rules.get(rule.name)
        if old is not None and old.source == "config":
            raise KeyError(rule.name)
        if old is None and self.runtime_count() >= self.max_runtime:
            raise RuleLimit(rule.name)
        if old is not None:
            self._clear_all(old, time.time())
        self._rules[rule.name] = _Rule(rule, "runtime", matcher(rule))

    def remove(self, name: str) -> None:
        """Remove a runtime rule (its active alerts clear). Raises `KeyError` if there is no such runtime rule."""
        r = self._rules.get(name)
        if r is None or r.source != "runtime":
            raise KeyError(name)
        self._clear_all(r, time.time())
        del self._rules[name]

    def set_config_rules(self, rules: Iterable[AlertRule], runtime: Iterable[AlertRule] = ()) -> None:
        """Replace the config's rules (a reload). A rule that is unchanged keeps its state (an active alert stays
        active); a removed or changed one clears its alerts first. A runtime rule named like a new config rule is
        shadowed, as at start; one that a removed config rule shadowed comes back from `runtime` (the store's)."""
        now = time.time()
        new = {r.name: r for r in rules}
        for name, r in list(self._rules.items()):
            if (r.source == "config" and new.get(name) != r.rule) or (r.source == "runtime" and name in new):
                if r.source == "runtime":
                    log.warning("runtime alert rule %r is shadowed by the new config rule of that name", name)
                self._clear_all(r, now)
                del self._rules[name]
        for name, rule in new.items():
            if name not in self._rules:
                self._rules[name] = _Rule(rule, "config", matcher(rule))
        for rule in runtime:
            if rule.name not in self._rules and self.runtime_count() < self.max_runtime:
                self._rules[rule.name] = _Rule(rule, "runtime", matcher(rule))

    def source(self, name: str) -> Literal["config", "runtime"] | None:
        r = self._rules.get(name)
        return r.source if r else None

    def info(self) -> list[RuleInfo]:
        return [
            RuleInfo(rule=r.rule, source=r.source, active=sorted(s for s, st in r.states.items() if st.active))
            for r in self._rules.values()
        ]

    def questions(self, stream: str) -> list[AlertRule]:
        """The yes/no rules that watch `stream`: each of its windows is checked against them."""
        return [r.rule for r in self._rules.values() if r.rule.kind == "question" and r.watches(stream)]

    def active(self) -> list[AlertEvent]:
        return [st.active for r in self._rules.values() for st in r.states.values() if st.active is not None]

    # --- inputs ---

    def on_event(self, event: object) -> None:
        """A bus tap: finals, scenes and levels are matched against the rules that watch their stream."""
        if isinstance(event, FinalEvent):
            text = event.text[:MAX_MATCH_CHARS]
            if not text:
                return
            for r in self._rules.values():
                if (
                    r.rule.kind in ("phrase", "regex")
                    and r.pattern
                    and r.watches(event.stream)
                    and r.pattern.search(text)
                ):
                    self._hit(r, Hit(event.stream, event.wall_start or event.time, event.start, text))
        elif isinstance(event, SceneEvent):
            w = event.window
            ev = Evidence(id=w.id, stream=w.stream, start=w.start, end=w.end, wall_start=None, wall_end=None)
            text = event.text[:MAX_MATCH_CHARS]
            for r in self._rules.values():
                if r.rule.kind == "label" and r.pattern and r.watches(event.stream) and r.pattern.search(text):
                    self._hit(r, Hit(event.stream, event.time, w.start, event.text, score=event.confidence, window=ev))
        elif isinstance(event, LevelEvent):
            for r in self._rules.values():
                if r.rule.kind != "level" or not r.watches(event.stream):
                    continue
                lo, hi = r.rule.below_dbfs, r.rule.above_dbfs
                beyond = (hi is not None and event.rms_dbfs > hi) or (lo is not None and event.rms_dbfs < lo)
                if beyond:
                    self._hit(
                        r,
                        Hit(
                            event.stream,
                            event.time,
                            event.start,
                            f"RMS {event.rms_dbfs:.1f} dBFS",
                            score=event.rms_dbfs,
                        ),
                    )
                elif (st := r.states.get(event.stream)) is not None and st.active is None:
                    st.since = None  # a level condition must hold without a break to fire

    def on_check(self, stream: str, window: Evidence, wall: float, scores: dict[str, float]) -> None:
        """The worker's yes/no answers for one window: `scores` rule name → P(yes)."""
        for name, p in scores.items():
            r = self._rules.get(name)
            if r is not None and r.rule.kind == "question" and p >= r.rule.threshold:
                self._hit(r, Hit(stream, wall, window.start, r.rule.question or "", score=round(p, 4), window=window))

    def tick(self, now: float) -> None:
        """Clear what has gone quiet for `hold_s`, and fire conditions that have now held `debounce_s`."""
        for r in self._rules.values():
            for stream, st in r.states.items():
                if st.since is not None and now - st.last > r.rule.hold_s:
                    self._end(r, stream, st, now)
                elif st.since is not None:
                    self._maybe_fire(r, stream, st, now)

    # --- the state machine ---

    def _hit(self, r: _Rule, hit: Hit) -> None:
        st = r.states.get(hit.stream)
        if st is None:
            st = r.states[hit.stream] = _State(count=self._counts.get((r.rule.name, hit.stream), 0))
        if st.since is not None and hit.wall - st.last > r.rule.hold_s:
            self._end(r, hit.stream, st, hit.wall)
        if st.since is None:
            st.since = hit.wall
        st.last, st.hit = max(st.last, hit.wall), hit
        self._maybe_fire(r, hit.stream, st, hit.wall)

    def _maybe_fire(self, r: _Rule, stream: str, st: _State, now: float) -> None:
        rule = r.rule
        if st.active is not None or st.since is None or st.hit is None or now - st.since < rule.debounce_s:
            return
        if st.fired is not None and now - st.fired < rule.cooldown_s:
            return
        if not rule.active_at(self.local_time(now).time()):
            return
        st.count += 1
        h = st.hit
        alert = AlertEvent(
            stream=stream,
            id=f"{rule.name}/{stream}/{st.count}",
            rule=rule.name,
            kind=rule.kind,
            window=h.window,
            at=h.at,
            wall=h.wall,
            evidence=h.evidence,
            score=h.score,
            clip=None,
        )
        if rule.clip and self.clip is not None:
            name = self.clip(alert, rule)
            if name is not None:
                alert = alert.model_copy(update={"clip": name})
        st.active, st.fired = alert, now
        self.fired += 1
        self.publish(alert)

    def _end(self, r: _Rule, stream: str, st: _State, now: float) -> None:
        if st.active is not None:
            self.cleared += 1
            self.publish(
                AlertClearedEvent(
                    stream=stream,
                    id=st.active.id,
                    rule=r.rule.name,
                    active_s=round(max(0.0, now - (st.fired or now)), 3),
                )
            )
        st.active, st.since, st.hit = None, None, None

    def _clear_all(self, r: _Rule, now: float) -> None:
        for stream, st in r.states.items():
            self._end(r, stream, st, now)
