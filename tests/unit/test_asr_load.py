"""The ASR's load policy (`daemon.speech.load`): the overload levels as a stateful property test against a model
written from the rules, and the partials' budget and cadence against their arithmetic."""

from __future__ import annotations

import itertools
import math
import time
import typing
from typing import Any

import hypothesis.strategies as st
import numpy as np
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from daemon.capture.vad import SpeechEnd
from daemon.config import AsrConfig
from daemon.delivery.events import AsrMode
from daemon.speech.asr import AsrJob, AsrWorker
from daemon.speech.load import LEVELS, Overload, PartialBudget, partial_interval_s

BOUND, ESCALATE, RECOVER = 3.0, 2.0, 10.0


class OverloadMachine(RuleBasedStateMachine):
    """Random lags at random steps of time. The model keeps, independently, how long the lag has been over the
    bound and how long at or under half of it, and when the level last changed."""

    def __init__(self) -> None:
        super().__init__()
        self.o = Overload(BOUND, ESCALATE, RECOVER)
        self.now = 100.0
        self.level = 0
        self.changed = 0.0
        self.over_since: float | None = None
        self.calm_since: float | None = None
        self.changes: list[int] = []

    @rule(
        dt=st.floats(0.0, 6.0),
        lag=st.one_of(st.floats(0.0, 20.0), st.sampled_from([0.0, BOUND / 2, BOUND, BOUND + 1e-6])),
    )
    def observe(self, dt: float, lag: float) -> None:
        self.now += dt
        if lag > BOUND:
            self.calm_since = None
            self.over_since = self.now if self.over_since is None else self.over_since
        else:
            self.over_since = None
            if lag <= BOUND / 2:
                self.calm_since = self.now if self.calm_since is None else self.calm_since
            else:
                self.calm_since = None
        expect = self.level
        since = self.now - self.changed
        if self.over_since is not None and self.now - self.over_since >= ESCALATE and since >= ESCALATE:
            expect = min(self.level + 1, len(LEVELS) - 1)
        elif self.calm_since is not None and self.now - self.calm_since >= RECOVER and since >= RECOVER:
            expect = max(self.level - 1, 0)
        got = self.o.observe(self.now, lag)
        if expect != self.level:
            assert got == expect
            self.level, self.changed = expect, self.now
            self.changes.append(expect)
        else:
            assert got is None
        assert self.o.level == self.level and self.o.mode == LEVELS[self.level]

    @rule(steps=st.integers(1, 5))
    def calm_down(self, steps: int) -> None:
        """A long calm spell: one step down per `RECOVER`, to normal at the end."""
        for _ in range(steps * len(LEVELS)):
            self.observe(RECOVER / 2, 0.0)
        if steps >= 3:
            assert self.level == 0

    @invariant()
    def one_step_at_a_time(self) -> None:
        levels = [0, *self.changes]
        assert all(abs(a - b) == 1 for a, b in itertools.pairwise(levels))
        assert 0 <= self.o.level < len(LEVELS)


TestOverload = OverloadMachine.TestCase
TestOverload.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_a_lag_held_over_the_bound_climbs_every_escalate_s_and_a_calm_one_comes_back() -> None:
    o = Overload(BOUND, ESCALATE, RECOVER)
    t, seen = 0.0, []
    while t < 10.0:  # lag 5 s for 10 s: up at 2, 4 and 6 s, then it stays at the top
        if (level := o.observe(t, 5.0)) is not None:
            seen.append((t, level))
        t += 0.5
    assert seen == [(2.0, 1), (4.0, 2), (6.0, 3)]
    assert o.observe(10.5, 2.0) is None  # between half the bound and the bound: neither way
    assert o.observe(30.0, 2.0) is None
    seen = []
    t = 30.0
    while t < 80.0:
        if (level := o.observe(t, 0.5)) is not None:
            seen.append((t, level))
        t += 0.5
    assert seen == [(40.0, 2), (50.0, 1), (60.0, 0)]


def test_the_budget_gives_partials_their_share_and_no_more() -> None:
    b = PartialBudget(share=0.3, lanes=2)
    assert not b.allows(0.0)  # a fresh bucket is empty
    assert b.allows(0.1)  # 0.06 lane-s accrued
    b.spend(0.7, 0.6)  # a 0.6 s partial: the bucket is in debt
    assert not b.allows(0.7)
    # paid back at 0.6 lane-s per s: 0.06 + 0.36 - 0.6 = -0.18 at 0.7, positive after 0.3 s more
    assert not b.allows(0.95) and b.allows(1.05)
    # a long idle spell saves at most 10 s worth: 0.3 x 2 x 10 = 6 lane-s
    assert b.allows(1000.0) and math.isclose(b.tokens, 6.0)
    # over a busy stretch, decodes started whenever allowed spend the share, plus the one overdraft
    b = PartialBudget(share=0.3, lanes=2)
    t, spent = 0.0, 0.0
    while t < 100.0:
        if b.allows(t):
            b.spend(t + 0.6, 0.6)
            spent += 0.6
            t += 0.6
        else:
            t += 0.01
    assert 0.3 * 2 * 100 - 0.6 <= spent <= 0.3 * 2 * 100 + 0.6
    assert not PartialBudget(share=0.0, lanes=2).allows(5.0)


def test_the_partial_cadence_stretches_with_the_streams_speaking() -> None:
    assert partial_interval_s(0.7, 1, 0.6, 0.3, 2) == 1.0  # 1 x 0.6 / 0.6
    assert partial_interval_s(0.7, 1, 0.0, 0.3, 2) == 0.7  # nothing measured yet: the base
    assert partial_interval_s(0.7, 8, 0.6, 0.3, 2) == 8.0
    assert partial_interval_s(0.7, 8, 0.6, 1.0, 16) == 0.7
    assert partial_interval_s(0.7, 1, 0.6, 0.0, 2) == math.inf


def test_only_live_finals_count_towards_the_lag() -> None:
    """A file read faster than real time queues finals by design: its backlog is not overload (it once switched a
    whole batch transcription to beam 1). A live stream's or a speech request's waiting final is."""
    worker = AsrWorker(AsrConfig())  # its lanes never start: only the queues are used

    def final(index: int, live: bool) -> AsrJob:
        end = SpeechEnd(index, 0, 1600, 1600, "silence")
        reply: Any = lambda _r: None  # noqa: E731 (nothing is decoded, so nothing replies)
        return AsrJob("s", index, 0, 1600, np.zeros(1600, np.float32), end, time.monotonic() - 30, reply, live=live)

    assert worker.offer_final(final(1, live=False))
    assert worker.lag_s() == 0.0
    assert worker.offer_final(final(2, live=True))
    assert 29.0 < worker.lag_s() < 60.0


def test_the_wire_names_the_same_levels() -> None:
    """`stream.status`'s `asr_mode` (the protocol model) and the worker's levels are one list, in order."""
    assert typing.get_args(AsrMode) == LEVELS
