"""What both directions of the websocket protocol share: the version, limits, close and error codes, id and name
types, and the alert rule (which the config file and the `alert.add` message both carry). Imports nothing of ours."""

from __future__ import annotations

import re
from datetime import time as clock_time
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1
MAX_QUESTION_CHARS = 1000  # the one limit on a question's length (schema, docs and daemon)
MAX_JSON_DEPTH = 16  # nesting of objects/arrays in a client message; the deepest valid one has 3
MAX_ID = 2**53 - 1  # integer ids must survive a JavaScript client's doubles


class CloseCode(IntEnum):
    """Close codes the daemon or its websocket library send (documented in `docs/protocol.md`)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the daemon is shutting down
    PROTOCOL_ERROR = 1002  # a malformed websocket frame (websockets library)
    INVALID_DATA = 1007  # a text frame that is not UTF-8 (websockets library)
    POLICY = 1008  # a client that keeps sending over its rate limit
    TOO_BIG = 1009  # a frame over server.max_message_bytes (websockets library)
    INTERNAL = 1011  # an internal error, or no pong within server.ping_timeout_s (websockets library)
    SLOW_CONSUMER = 4000  # the client did not read fast enough; reconnect
    UNAUTHORIZED = 4001  # missing or wrong token
    HANDSHAKE = 4002  # no valid hello in time, or an unsupported protocol version
    FULL = 4003  # server.max_clients reached


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_STREAM = "unknown_stream"
    STREAM_BUSY = "stream_busy"
    NOT_STARTED = "not_started"
    NOT_READY = "not_ready"
    BAD_AUDIO = "bad_audio"
    BUSY = "busy"
    NO_WINDOW = "no_window"
    UNKNOWN_WINDOW = "unknown_window"
    WINDOW_EXPIRED = "window_expired"
    MODEL_DISABLED = "model_disabled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNKNOWN_QUESTION = "unknown_question"
    OUT_OF_MEMORY = "out_of_memory"
    LLM_UNAVAILABLE = "llm_unavailable"
    HISTORY_DISABLED = "history_disabled"
    UNKNOWN_RULE = "unknown_rule"
    RULE_EXISTS = "rule_exists"
    INTERNAL = "internal"


MessageId = Annotated[str, Field(max_length=128)] | Annotated[int, Field(ge=-MAX_ID, le=MAX_ID)]
StreamName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
WindowId = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}:w[1-9][0-9]{0,17}$", description="`<stream>:w<n>`, n = 1, 2, …")
]
Glob = Annotated[str, Field(min_length=1, max_length=64)]
RuleName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
UnixTime = Annotated[float, Field(ge=0, le=1e11, description="Unix time, s")]


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    streams: list[Glob] = Field(["*"], max_length=64, description="stream names or glob patterns")
    events: list[Glob] = Field(["*"], max_length=64, description="event types or glob patterns (`transcript.*`)")


def type_names(union: Any) -> tuple[str, ...]:
    """The `type` literal of each model in a union of message models, in order."""
    return tuple(get_args(m.model_fields["type"].annotation)[0] for m in get_args(union))


def _clock(text: str) -> clock_time:
    h, m = text.split(":")
    return clock_time(int(h), int(m))


class AlertRule(BaseModel):
    """One alert rule, as written in the config (`[[alerts.rules]]`) or sent in `alert.add`.

    Kinds: `phrase` (words in a final transcript, case-insensitive), `regex` (a Python regular expression on final
    transcripts, case-insensitive), `label` (words in a scene description), `question` (a yes/no question asked of
    every window: fires when P(yes) ≥ `threshold`), `level` (the stream's RMS level above `above_dbfs` and/or below
    `below_dbfs`). The condition must hold `debounce_s` before the alert fires; it stays active until the condition
    has been absent for `hold_s` (then `alert.cleared`); it fires at most once per `cooldown_s` per stream; only
    within `active_hours` (local time, `HH:MM-HH:MM`, may wrap midnight) when given.
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
            try:
                re.compile(self.match or "")
            except re.error as e:
                raise ValueError(f"match is not a valid regular expression: {e}") from None
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
