"""What both directions of the websocket protocol share: the version, limits, close and error codes, and the id and
name types. (The alert rule, which the config file and the `alert.add` message both carry, is `daemon.rules`.)"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field

from ..names import Glob

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
    RULE_LIMIT = "rule_limit"
    LEARN_DISABLED = "learn_disabled"
    LEARN_BUSY = "learn_busy"
    TOO_FEW_CLIPS = "too_few_clips"
    LABELS_FULL = "labels_full"
    UNKNOWN_LABEL = "unknown_label"
    INTERNAL = "internal"


MessageId = Annotated[str, Field(max_length=128)] | Annotated[int, Field(ge=-MAX_ID, le=MAX_ID)]
StreamName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
WindowId = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}:w[1-9][0-9]{0,17}$", description="`<stream>:w<n>`, n = 1, 2, …")
]
# what a user calls a sound ("doorbell", "the kettle's whistle"): the answer the model learns; no control
# characters or path separators (its folder name is derived from it, `daemon.learning.labels`)
LabelText = Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f/\\]{1,60}$", description="1-60 characters, no / or \\")]
ClipName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,100}\.wav$")]
UnixTime = Annotated[float, Field(ge=0, le=1e11, description="Unix time, s")]


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    streams: list[Glob] = Field(["*"], max_length=64, description="stream names or glob patterns")
    events: list[Glob] = Field(["*"], max_length=64, description="event types or glob patterns (`transcript.*`)")


def type_names(union: Any) -> tuple[str, ...]:
    """The `type` literal of each model in a union of message models, in order."""
    return tuple(get_args(m.model_fields["type"].annotation)[0] for m in get_args(union))
