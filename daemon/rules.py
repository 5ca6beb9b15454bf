"""Alert rules: what a user writes (the config's `[[alerts.rules]]`, a client's `alert.add`) and how its text is
matched. A domain type of its own: the config, the wire protocol, the store and the alert engine all use it.

Matching costs are bounded whoever wrote the rule, because clients add rules and every final is matched on the
event loop:

- `regex` rules run on RE2 (google-re2): matching time is linear in the text, with no backtracking, so a pattern
  such as `(.|.)*\x01` cannot stall anything. RE2 syntax is Python's without backreferences and lookaround
  (`\\w`, `\b` and `\\d` are ASCII; `\\pL` is any letter). A pattern compiles within `COMPILE_MEMORY` bytes or is
  refused, and its program may hold at most `MAX_PROGRAM` instructions: a match then costs at most about that many
  steps per character.
- `phrase` and `label` rules are the rule's words, escaped, in order: patterns the daemon builds, linear as well.
- a transcript is matched up to `MAX_MATCH_CHARS` (a final is one utterance: a few hundred characters).
"""

from __future__ import annotations

import re
from datetime import time as clock_time
from typing import Any, Literal, Protocol

import re2
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .names import Glob, RuleName

COMPILE_MEMORY = 64 << 10  # RE2's budget for compiling one pattern (a larger program is refused, in ~1 ms)
MAX_PROGRAM = 500  # RE2 instructions in one regex rule (`restart\w* the (router|modem)`: 39)
MAX_MATCH_CHARS = 4000


class Matcher(Protocol):
    def search(self, text: str) -> Any: ...


def regex(pattern: str) -> Matcher:
    """`pattern` compiled by RE2, case-insensitive. Raises `ValueError` saying why RE2 refused it."""
    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = COMPILE_MEMORY
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as e:
        detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        hint = " (RE2 has no backreferences or lookaround)" if "invalid" in detail else ""
        raise ValueError(f"match is not a regular expression RE2 accepts: {detail}{hint}") from None
    except UnicodeError:
        raise ValueError("match is not valid Unicode") from None
    if compiled.programsize > MAX_PROGRAM:
        raise ValueError(
            f"match is too complex: {compiled.programsize} RE2 instructions, at most {MAX_PROGRAM} (use fewer or "
            "smaller counted repetitions such as {1,100})"
        )
    return compiled


def matcher(rule: AlertRule) -> Matcher | None:
    """What a phrase, regex or label rule searches transcripts or scene texts with (None for other kinds)."""
    if rule.kind == "regex":
        return regex(rule.match or "")
    if rule.kind in ("phrase", "label"):  # the words in order, whole words, any case and spacing
        words = re.findall(r"\w+", (rule.match or "").lower())
        return re.compile(r"\b" + r"\W+".join(map(re.escape, words)) + r"\b", re.IGNORECASE) if words else None
    return None


def _clock(text: str) -> clock_time:
    h, m = text.split(":")
    return clock_time(int(h), int(m))


class AlertRule(BaseModel):
    """One alert rule, as written in the config (`[[alerts.rules]]`) or sent in `alert.add`.

    Kinds: `phrase` (words in a final transcript, case-insensitive), `regex` (an RE2 regular expression on final
    transcripts, case-insensitive; see the module docstring), `label` (words in a scene description), `question`
    (a yes/no question asked of every window: fires when P(yes) ≥ `threshold`), `level` (the stream's RMS level
    above `above_dbfs` and/or below `below_dbfs`). The condition must hold `debounce_s` before the alert fires; it
    stays active until the condition has been absent for `hold_s` (then `alert.cleared`); it fires at most once per
    `cooldown_s` per stream; only within `active_hours` (local time, `HH:MM-HH:MM`, may wrap midnight) when given.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: RuleName
    kind: Literal["phrase", "regex", "label", "question", "level"]
    match: str | None = Field(None, min_length=1, max_length=500, description="phrase, regex or label")
    question: str | None = Field(None, min_length=1, max_length=500, description="question rules: asked of each window")
    threshold: float = Field(0.5, gt=0, lt=1, description="question rules: fire when P(yes) is at least this")
    above_dbfs: float | None = Field(None, ge=-120, le=0, description="level rules: RMS above this")
    below_dbfs: float | None = Field(None, ge=-120, le=0, description="level rules: RMS below this")
    streams: list[Glob] = Field(["*"], min_length=1, max_length=64, description="streams watched (glob patterns)")
    debounce_s: float = Field(0.0, ge=0, le=3600)
    hold_s: float = Field(30.0, ge=0, le=86400)
    cooldown_s: float = Field(60.0, ge=0, le=86400)
    active_hours: str | None = Field(None, pattern=r"^\d\d:\d\d-\d\d:\d\d$", description="HH:MM-HH:MM, local")
    clip: bool = Field(False, description="keep the window's audio with the alert (store.clips must be on)")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> AlertRule:
        k = self.kind
        if k in ("phrase", "regex", "label") and self.match is None:
            raise ValueError(f"a {k} rule needs `match`")
        if k == "question" and self.question is None:
            raise ValueError("a question rule needs `question`")
        if k == "level" and self.above_dbfs is None and self.below_dbfs is None:
            raise ValueError("a level rule needs above_dbfs or below_dbfs")
        extra = {
            "match": self.match,
            "question": self.question,
            "above_dbfs": self.above_dbfs,
            "below_dbfs": self.below_dbfs,
        }
        wanted = {
            "phrase": {"match"},
            "regex": {"match"},
            "label": {"match"},
            "question": {"question"},
            "level": {"above_dbfs", "below_dbfs"},
        }[k]
        stray = sorted(n for n, v in extra.items() if v is not None and n not in wanted)
        if stray:  # nothing silently ignored
            raise ValueError(f"a {k} rule does not use {', '.join(stray)}")
        if k == "regex":
            regex(self.match or "")  # raises ValueError saying what RE2 refused
        if self.active_hours is not None:
            try:
                for part in self.active_hours.split("-"):
                    _clock(part)
            except ValueError:
                raise ValueError(f"active_hours {self.active_hours!r}: hours 00-23, minutes 00-59") from None
        return self

    def active_at(self, local: clock_time) -> bool:
        """Whether `local` (a wall-clock time of day) is within `active_hours`."""
        if self.active_hours is None:
            return True
        a, b = (_clock(x) for x in self.active_hours.split("-"))
        return a <= local < b if a <= b else local >= a or local < b
