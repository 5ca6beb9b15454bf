"""How the ASR worker spends a small machine's time: the partials' share, their cadence, and what it gives up, in
order, when finals fall behind. Pure state (no threads, no clock of its own: every call takes `now`, monotonic s),
driven by `daemon.speech.asr.AsrWorker` and proven by a stateful property test (`tests/unit/test_asr_load.py`).

Finals are what the store, MQTT, alerts and the windows need; partials are only something to read while a person
speaks. So partials get a budget (`PartialBudget`, a share of the ASR lanes' time), their cadence stretches with the
number of streams speaking (`partial_interval_s`), and when finals wait too long the worker degrades in a
documented order (`Overload`), one step at a time, and climbs back the same way once the lag has stayed low:

0. `normal`;
1. `no_partials`: no partial starts (a pending one is dropped: a newer one would replace it anyway);
2. `fast_decode`: finals decode with beam 1 instead of `asr.beam_size` (the decoder's share of a final; the
   encoder's 30 s window costs the same either way);
3. `no_speculation`: no speculative final starts when silence begins; each final is decoded once, after the
   hangover confirms the end, so no decode is wasted on a pause that speech resumes after.

No step drops a final: a final is late, never lost.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("normal", "no_partials", "fast_decode", "no_speculation")
ASR_MODE_DETAIL = {  # what each level means, for people (a stream.status's detail)
    "normal": "normal",
    "no_partials": "partial transcripts are off until it catches up",
    "fast_decode": "partial transcripts are off and finals decode with beam 1 until it catches up",
    "no_speculation": "partials off, beam 1, and finals start only once each utterance's end is confirmed",
}


@dataclass
class PartialBudget:
    """A token bucket of ASR lane-seconds for partials: `share` of `lanes` lanes' time accrues continuously, up to
    `window_s` worth (what an idle spell may save for a burst), starting empty; a partial's decode time is spent
    when it ends. A partial may start while the bucket is above zero (so one decode may overdraw it; the next waits
    until it is paid back). Over any span, partials spend at most share x lanes x span + the saved credit + one
    decode."""

    share: float
    lanes: int
    window_s: float = 10.0
    tokens: float = 0.0
    at: float | None = None

    @property
    def cap(self) -> float:
        return self.share * self.lanes * self.window_s

    def _refill(self, now: float) -> None:
        if self.at is not None:  # a fresh bucket is empty: the share holds from the first second
            self.tokens = min(self.cap, self.tokens + self.share * self.lanes * max(0.0, now - self.at))
        self.at = now

    def allows(self, now: float) -> bool:
        self._refill(now)
        return self.share > 0 and self.tokens > 0

    def spend(self, now: float, seconds: float) -> None:
        self._refill(now)
        self.tokens -= seconds


def partial_interval_s(base_s: float, speaking: int, decode_s: float, share: float, lanes: int) -> float:
    """How often one stream may ask for a partial so that `speaking` streams, each partial costing `decode_s` of
    one lane, stay within `share` of `lanes` lanes: at least `base_s` (`asr.partial_interval_ms`), stretched as
    load rises (e.g. 8 streams x 0.6 s / (0.3 x 2 lanes) = every 8 s)."""
    if share <= 0:
        return float("inf")
    return max(base_s, speaking * decode_s / (share * lanes))


@dataclass
class Overload:
    """The degradation level from the finals' lag (how long the oldest waiting final has waited, s).

    - Up one level when the lag has stayed above `bound_s` for `escalate_s` since it rose past it and since the
      last change (each step gets time to take effect).
    - Down one level when the lag has stayed at or below half of `bound_s` for `recover_s` since the last change.
    """

    bound_s: float
    escalate_s: float
    recover_s: float
    level: int = 0
    changed_at: float = 0.0
    over_since: float | None = None
    calm_since: float | None = None

    @property
    def mode(self) -> str:
        return LEVELS[self.level]

    def observe(self, now: float, lag_s: float) -> int | None:
        """Record the lag at `now`; returns the new level when it changed, else None."""
        if lag_s > self.bound_s:
            self.calm_since = None
            if self.over_since is None:
                self.over_since = now
        else:
            self.over_since = None
            if lag_s <= self.bound_s / 2:
                if self.calm_since is None:
                    self.calm_since = now
            else:
                self.calm_since = None
        since_change = now - self.changed_at
        if (
            self.over_since is not None
            and self.level < len(LEVELS) - 1
            and now - self.over_since >= self.escalate_s
            and since_change >= self.escalate_s
        ):
            return self._set(self.level + 1, now)
        if (
            self.calm_since is not None
            and self.level > 0
            and now - self.calm_since >= self.recover_s
            and since_change >= self.recover_s
        ):
            return self._set(self.level - 1, now)
        return None

    def _set(self, level: int, now: float) -> int:
        self.level, self.changed_at = level, now
        return level
