"""Websocket protocol v1: the client's messages, their parsing, and the JSON schema of every message.

Every message on the wire is a pydantic model: client messages here, server messages in `events`, what both share
(codes, ids, limits, the alert rule) in `wire`. These models are the only way a message is made: each stage builds
a typed event or reply, and the delivery layer serialises it once (`events.encode`). `docs/protocol.md` is the
prose, `docs/protocol.schema.json` is `ltu-daemon schema` output, and tests keep the three in step (every event the
end-to-end tests receive is validated against the published schema).

Client messages are JSON text frames with a `type`; binary frames carry PCM audio after `audio.start`. Every
client message may carry an `id`, echoed as `re` in every reply or error it causes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ..names import Glob, RuleName
from ..rules import AlertRule
from .events import ErrorEvent, ServerMessage
from .wire import (
    MAX_ID,
    MAX_JSON_DEPTH,
    MAX_QUESTION_CHARS,
    PROTOCOL_VERSION,
    ClipName,
    CloseCode,
    ErrorCode,
    LabelText,
    MessageId,
    StreamName,
    Subscription,
    UnixTime,
    WindowId,
    type_names,
)

# --- client → server ---------------------------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: MessageId | None = Field(None, description="echoed as `re` in every reply or error this message causes")


class Hello(_Msg):
    type: Literal["hello"]
    protocol: int = Field(description="protocol version the client speaks (1)")
    client: str = Field("", max_length=128, description="free text for logs")
    token: str | None = Field(
        None, max_length=4096, description="for clients that cannot send an Authorization header (browsers)"
    )
    subscribe: Subscription = Subscription()


class Subscribe(_Msg):
    type: Literal["subscribe"]
    streams: list[Glob] = Field(["*"], max_length=64)
    events: list[Glob] = Field(["*"], max_length=64)


class AudioStart(_Msg):
    type: Literal["audio.start"]
    stream: StreamName = Field(description='a stream configured with source = "remote"')
    rate: int = Field(ge=8000, le=192000, description="sample rate of the PCM that follows, Hz")
    channels: int = Field(1, ge=1, le=8, description="interleaved channels; the daemon downmixes")
    format: Literal["s16le", "f32le"] = "s16le"


class AudioStop(_Msg):
    type: Literal["audio.stop"]


class Ping(_Msg):
    type: Literal["ping"]


class Ask(_Msg):
    type: Literal["ask"]
    id: MessageId = Field(description="required: names the question in its answer events and in cancel")
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    scope: Literal["live", "history", "auto"] = Field(
        "live", description="live: one window of audio; history: the stored past (text); auto: chosen from the question"
    )
    stream: StreamName | None = Field(
        None, description="live: default the first stream with a window; history: only it"
    )
    window: WindowId | None = Field(None, description="live: a window id; `stream`, if given, must be its stream")
    at: float | None = Field(
        None, ge=0, le=1e12, description="live: a time on the stream clock, s: the window holding it"
    )
    since: UnixTime | None = Field(None, description="history: from this wall-clock time")
    until: UnixTime | None = Field(None, description="history: up to this wall-clock time")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="capped by questions.max_new_tokens_limit")
    greedy: bool = Field(False, description="argmax decoding instead of the reference's sampling")
    temperature: float = Field(0.1, gt=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(500, ge=0, le=1000)
    repetition_penalty: float = Field(1.1, ge=1, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _one_scope(self) -> Ask:
        # nothing is silently ignored: a window names its stream and its time already
        if self.window is not None and self.at is not None:
            raise ValueError("give either window or at, not both")
        if self.window is not None and self.stream is not None and self.window.split(":w")[0] != self.stream:
            raise ValueError(f"window {self.window} is not on stream {self.stream}")
        past = self.since is not None or self.until is not None
        if past and (self.window is not None or self.at is not None):
            raise ValueError("since/until ask about the past; window/at about one live window: give one kind")
        if past and self.scope == "live":
            raise ValueError("since/until need scope history (or auto)")
        if self.scope == "history" and (self.window is not None or self.at is not None):
            raise ValueError("a history question has no window or at")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since is after until")
        return self


class HistorySearch(_Msg):
    type: Literal["history.search"]
    query: str = Field("", max_length=MAX_QUESTION_CHARS, description="words or a sentence; empty: by time only")
    since: UnixTime | None = None
    until: UnixTime | None = None
    streams: list[Glob] = Field(["*"], min_length=1, max_length=64)
    limit: int = Field(10, ge=1, le=100)
    mode: Literal["combined", "text", "vector", "time"] = Field(
        "combined", description="text: full-text (FTS5); vector: embeddings; combined: both, merged; time: newest"
    )


class Timeline(_Msg):
    type: Literal["timeline"]
    since: UnixTime = Field(description="from this wall-clock time")
    until: UnixTime = Field(description="to this wall-clock time; at most 31 days after since")
    streams: list[Glob] = Field(["*"], min_length=1, max_length=64)
    buckets: int = Field(120, ge=10, le=1000, description="level values per stream over the span")

    @model_validator(mode="after")
    def _span(self) -> Timeline:
        if not 0 < self.until - self.since <= 31 * 86400:
            raise ValueError("until must be after since, by at most 31 days")
        return self


class AlertList(_Msg):
    type: Literal["alert.list"]


class AlertAdd(_Msg):
    type: Literal["alert.add"]
    rule: AlertRule = Field(description="kept in the store: it survives a restart; config rules cannot be replaced")


class AlertRemove(_Msg):
    type: Literal["alert.remove"]
    name: RuleName = Field(description="a rule added with alert.add (config rules are removed in the config)")


class Label(_Msg):
    type: Literal["label"]
    window: WindowId = Field(description="the window whose audio becomes an example (an alert's: its window.id)")
    label: LabelText = Field(description="what the sound is: the answer the model learns")
    negative: bool = Field(
        False, description="true: the window is *not* `label`; it becomes an example of the background class"
    )


class LabelList(_Msg):
    type: Literal["label.list"]


class LabelRemove(_Msg):
    type: Literal["label.remove"]
    label: LabelText
    clip: ClipName | None = Field(None, description="one clip of the label; null: every clip of it")


class Learn(_Msg):
    type: Literal["learn"]


class LearnRollback(_Msg):
    type: Literal["learn.rollback"]


class Cancel(_Msg):
    type: Literal["cancel"]
    target: MessageId = Field(description="the id of the question to cancel")


ClientMessage = (
    Hello
    | Subscribe
    | AudioStart
    | AudioStop
    | Ping
    | Ask
    | Cancel
    | HistorySearch
    | Timeline
    | AlertList
    | AlertAdd
    | AlertRemove
    | Label
    | LabelList
    | LabelRemove
    | Learn
    | LearnRollback
)
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(Annotated[ClientMessage, Field(discriminator="type")])


CLIENT_TYPES = type_names(ClientMessage)


class ProtocolError(ValueError):
    """A client message that gets an `error` reply: `code`, a message for humans, and the `re` to echo."""

    def __init__(
        self, code: ErrorCode, message: str, re: MessageId | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.re, self.retry_after_s = code, message, re, retry_after_s

    def event(self) -> ErrorEvent:
        return ErrorEvent(code=self.code, message=self.message, re=self.re, retry_after_s=self.retry_after_s)


def json_depth(value: Any) -> int:
    """Deepest nesting of arrays and objects in a parsed JSON value (iterative: no recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in a parsed JSON value that holds a lone UTF-16 surrogate (`"\\ud83d"`
    escaped alone in the JSON text), or None. Such a string is not Unicode: it cannot be echoed, stored or
    encoded again, so the message is refused before anything uses it."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return v
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:20]} is out of range")
    return x


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _echo(raw: dict[str, Any]) -> MessageId | None:
    """The `id` to echo as `re`, if the message has a usable one (a bool is not an integer here)."""
    v = raw.get("id")
    if isinstance(v, str) and len(v) <= 128 and not _SURROGATE.search(v):
        return v
    if isinstance(v, int) and not isinstance(v, bool) and -MAX_ID <= v <= MAX_ID:
        return v
    return None


def parse_client_message(text: str) -> ClientMessage:
    """Validate one text frame. Raises `ProtocolError` (`bad_json`, `bad_message` or `unknown_type`), with the
    message's `id` as `re` whenever the frame was readable JSON with a usable one."""
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {e}") from None
    except RecursionError:  # json gives up near 1,000 levels
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # NaN, infinity, a duplicate key, an integer of over 4,300 digits
        raise ProtocolError(ErrorCode.BAD_JSON, f"not acceptable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    re_ = _echo(raw)
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"nested deeper than {MAX_JSON_DEPTH} levels", re_)
    if (bad := lone_surrogate(raw)) is not None:
        shown = bad.encode("utf-8", "backslashreplace").decode("ascii", "replace")[:40]
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"text {shown!r} holds a lone UTF-16 surrogate: not valid Unicode", re_
        )
    if "type" not in raw:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"a message needs a type: one of {', '.join(CLIENT_TYPES)}", re_)
    if raw["type"] not in CLIENT_TYPES:
        shown = json.dumps(raw["type"])[:40]
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown}; expected one of {', '.join(CLIENT_TYPES)}", re_
        )
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as e:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'message'}: {err['msg']}"
            for err in e.errors(include_url=False)[:5]
        )
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"invalid {raw['type']}: {detail}", re_) from None


def json_schema() -> dict[str, Any]:
    """The machine-readable protocol: client and server messages as one JSON Schema document."""
    client = TypeAdapter(Annotated[ClientMessage, Field(discriminator="type")]).json_schema(
        ref_template="#/$defs/{model}"
    )
    server = TypeAdapter(Annotated[ServerMessage, Field(discriminator="type")]).json_schema(
        ref_template="#/$defs/{model}", mode="serialization"
    )
    defs = {**client.pop("$defs", {}), **server.pop("$defs", {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"ltu-daemon websocket protocol v{PROTOCOL_VERSION}",
        "$defs": {**defs, "ClientMessage": client, "ServerMessage": server},
        "oneOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
        "close_codes": {c.name.lower(): int(c) for c in CloseCode},
        "limits": {"max_question_chars": MAX_QUESTION_CHARS, "max_json_depth": MAX_JSON_DEPTH},
    }
