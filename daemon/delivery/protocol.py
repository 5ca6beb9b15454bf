"""Websocket protocol v1: every message on the wire, as pydantic models, and the JSON schema generated from them.

These models are the only way a message is made: each stage builds a typed event or reply, and the delivery layer
serialises it once (`encode`). `docs/protocol.md` is the prose, `docs/protocol.schema.json` is `ltu-daemon schema`
output, and tests keep the three in step (every event the end-to-end tests receive is validated against the
published schema).

Client messages are JSON text frames with a `type`; binary frames carry PCM audio after `audio.start`. Every
client message may carry an `id`, echoed as `re` in every reply or error it causes.
"""

from __future__ import annotations

import json
import math
import time
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

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
    INTERNAL = "internal"


MessageId = Annotated[str, Field(max_length=128)] | Annotated[int, Field(ge=-MAX_ID, le=MAX_ID)]
StreamName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
WindowId = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}:w[1-9][0-9]{0,17}$", description="`<stream>:w<n>`, n = 1, 2, …")
]
Glob = Annotated[str, Field(min_length=1, max_length=64)]


# --- client → server ---------------------------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: MessageId | None = Field(None, description="echoed as `re` in every reply or error this message causes")


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    streams: list[Glob] = Field(["*"], max_length=64, description="stream names or glob patterns")
    events: list[Glob] = Field(["*"], max_length=64, description="event types or glob patterns (`transcript.*`)")


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
    stream: StreamName | None = Field(None, description="default: the first stream that has a window")
    window: WindowId | None = Field(None, description="a window id; `stream`, if given, must be its stream")
    at: float | None = Field(None, ge=0, le=1e12, description="a time on the stream clock, s: the window holding it")
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
        return self


class Cancel(_Msg):
    type: Literal["cancel"]
    target: MessageId = Field(description="the id of the question to cancel")


ClientMessage = Hello | Subscribe | AudioStart | AudioStop | Ping | Ask | Cancel
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(Annotated[ClientMessage, Field(discriminator="type")])


def _type_names(union: Any) -> tuple[str, ...]:
    """The `type` literal of each model in a union, in order."""
    return tuple(get_args(m.model_fields["type"].annotation)[0] for m in get_args(union))


CLIENT_TYPES = _type_names(ClientMessage)


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
    if isinstance(v, str) and len(v) <= 128:
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


# --- server → client ---------------------------------------------------------------------------------------------


class _Out(BaseModel):
    # Built by the daemon's own stages from values they computed: validated on construction (cheap, and a wrong
    # type is a bug caught where it is made); every field is always sent, null included.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_serialization_defaults_required=True)
    time: float = Field(default_factory=lambda: round(time.time(), 6), description="Unix time the message was made, s")


class _StreamEvent(_Out):
    stream: str
    seq: int = Field(
        0,
        ge=0,
        description="per (stream, type), from 1 for the daemon's lifetime; stamped when "
        "published. A jump between two events a client receives means it lost "
        "events of that type",
    )


class LevelEvent(_StreamEvent):
    type: Literal["level"] = "level"
    start: float = Field(description="stream clock, s")
    end: float
    rms_dbfs: float = Field(description="RMS in dBFS (full-scale sine: -3.01; silence: -120)")
    peak_dbfs: float


class SpeechStartEvent(_StreamEvent):
    type: Literal["speech.start"] = "speech.start"
    id: str = Field(description="utterance id, `<stream>/<n>`")
    start: float
    wall: float | None = Field(description="Unix time the utterance's first sample was captured")


class PartialEvent(_StreamEvent):
    type: Literal["transcript.partial"] = "transcript.partial"
    id: str
    start: float
    end: float = Field(description="stream clock of the last sample decoded")
    text: str
    revision: int = Field(ge=1, description="1, 2, … per utterance; a newer partial replaces an older one")


class FinalEvent(_StreamEvent):
    type: Literal["transcript.final"] = "transcript.final"
    id: str
    start: float
    end: float = Field(description="end of the utterance including the hangover, stream clock s")
    speech_end: float = Field(description="end of the last voiced frame, stream clock s")
    text: str = Field(description="may be empty when the hallucination defences dropped everything")
    reason: Literal["silence", "max_length", "flush"]
    wall_start: float | None
    wall_end: float | None = Field(description="Unix time the last voiced sample was captured")
    dropped_segments: int
    asr_ms: float
    queue_ms: float


StreamState = Literal["starting", "open", "lost", "reopening", "closed", "error"]


class StatusEvent(_StreamEvent):
    type: Literal["stream.status"] = "stream.status"
    state: StreamState
    detail: str


class GapEvent(_StreamEvent):
    type: Literal["stream.gap"] = "stream.gap"
    at: float = Field(description="stream clock where the missing audio would have been, s")
    duration_s: float
    reason: str


class WindowEvent(_StreamEvent):
    type: Literal["window"] = "window"
    id: str = Field(description="`<stream>:w<n>`, n = 1, 2, …")
    start: float
    end: float = Field(description="start + 10 s")
    wall_start: float | None
    wall_end: float | None
    transcript: str = Field(description="texts of the finals that overlap the window: the LTU-AS input")


class WindowRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    stream: str
    start: float = Field(description="stream clock, s")
    end: float
    transcript: str


class SceneTimings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    queue_ms: float
    features_ms: float
    generate_ms: float
    batch: int = Field(description="windows described together")


class SceneEvent(_StreamEvent):
    type: Literal["scene"] = "scene"
    window: WindowRef
    text: str
    tokens: int
    skipped: int = Field(description="older windows of this stream not described because the model was behind")
    timings: SceneTimings


StreamEvent = (
    LevelEvent | SpeechStartEvent | PartialEvent | FinalEvent | StatusEvent | GapEvent | WindowEvent | SceneEvent
)
EVENT_TYPES = _type_names(StreamEvent)  # in the order the docs list them


class AnswerStart(_Out):
    type: Literal["answer.start"] = "answer.start"
    re: MessageId = Field(description="the question's id")
    window: WindowRef
    batch: int = Field(description="questions answered together, sharing one prefill")
    queue_ms: float


class AnswerDelta(_Out):
    type: Literal["answer.delta"] = "answer.delta"
    re: MessageId
    text: str


class AnswerTimings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    queue_ms: float = Field(description="waiting for the model")
    ttft_ms: float | None = Field(description="from the ask to the first token; null when no token came")
    tokens_per_s: float | None
    total_ms: float | None = Field(description="from the ask to the end; null when cancelled before it ran")


class AnswerDone(_Out):
    type: Literal["answer.done"] = "answer.done"
    re: MessageId
    text: str = Field(description="the concatenation of the deltas")
    tokens: int
    token_ids: list[int]
    reason: Literal["eos", "length", "cancelled"]
    window: WindowRef
    timings: AnswerTimings


StreamKind = Literal["mic", "file", "remote"]


class StreamInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: StreamKind
    state: StreamState = Field(description="the source's state now (later changes come as stream.status)")


class Welcome(_Out):
    type: Literal["welcome"] = "welcome"
    re: MessageId | None = None
    protocol: int
    server: str = Field(description="`ltu-daemon <version>`")
    streams: list[StreamInfo]
    events: list[str] = Field(description="the event types this daemon publishes")
    subscribe: Subscription
    demo: bool = Field(description="the demo profile: random models, meaningless transcripts and answers")
    model: bool = Field(description="LTU-AS runs (windows, scenes and questions); false: transcripts only")


class Subscribed(_Out):
    type: Literal["subscribed"] = "subscribed"
    re: MessageId | None = None
    streams: list[str]
    events: list[str]


class AudioReady(_Out):
    type: Literal["audio.ready"] = "audio.ready"
    re: MessageId | None = None
    stream: str


class AudioStopped(_Out):
    type: Literal["audio.stopped"] = "audio.stopped"
    re: MessageId | None = None
    stream: str | None = Field(description="the stream released, or null if this connection fed none")


class Pong(_Out):
    type: Literal["pong"] = "pong"
    re: MessageId | None = None


class Cancelled(_Out):
    type: Literal["cancelled"] = "cancelled"
    re: MessageId | None = None
    target: MessageId


class ErrorEvent(_Out):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    re: MessageId | None = Field(None, description="the id of the message that caused it, or null")
    retry_after_s: float | None = Field(None, description="with busy, rate_limited, not_ready and out_of_memory")


class Dropped(_Out):
    type: Literal["dropped"] = "dropped"
    counts: dict[str, int] = Field(description="events shed from this client's queue since the last notice, by type")


Reply = Welcome | Subscribed | AudioReady | AudioStopped | Pong | Cancelled | ErrorEvent | Dropped
Answer = AnswerStart | AnswerDelta | AnswerDone | ErrorEvent
ServerMessage = StreamEvent | Reply | AnswerStart | AnswerDelta | AnswerDone


def encode(message: ServerMessage) -> str:
    """The one serialisation of a server message (done once per message, however many clients get it)."""
    return message.model_dump_json()


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
