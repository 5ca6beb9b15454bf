"""Websocket protocol v1: the messages, validated with pydantic, and the JSON schema generated from them.

`docs/protocol.md` is the prose; `docs/protocol.schema.json` is `ltu-daemon schema` output and a test keeps it in
sync with these models. Client messages are JSON text frames with a `type`; binary frames carry PCM audio after
`audio.start`. Every client message may carry an `id`, echoed as `re` in the reply or error it causes.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1

EVENT_TYPES = ("level", "speech.start", "transcript.partial", "transcript.final", "stream.status", "stream.gap",
               "window", "scene")


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the daemon is shutting down
    POLICY = 1008
    TOO_BIG = 1009  # a frame over server.max_message_bytes (sent by the websockets library)
    INTERNAL = 1011
    SLOW_CONSUMER = 4000  # the client did not read fast enough; reconnect
    UNAUTHORIZED = 4001  # missing or wrong token
    HANDSHAKE = 4002  # no valid hello in time, or an unsupported protocol version
    FULL = 4003  # server.max_clients reached


class ErrorCode:
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_STREAM = "unknown_stream"
    STREAM_BUSY = "stream_busy"
    BUSY = "busy"
    NO_WINDOW = "no_window"
    UNKNOWN_WINDOW = "unknown_window"
    WINDOW_EXPIRED = "window_expired"
    MODEL_DISABLED = "model_disabled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNKNOWN_QUESTION = "unknown_question"
    BAD_AUDIO = "bad_audio"
    NOT_STARTED = "not_started"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: str | int | None = Field(None, description="echoed as `re` in the reply")


Glob = Annotated[str, Field(min_length=1, max_length=64)]


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    streams: list[Glob] = Field(["*"], max_length=64, description="stream names or glob patterns")
    events: list[Glob] = Field(["*"], max_length=64, description="event types or glob patterns (`transcript.*`)")


class Hello(_Msg):
    type: Literal["hello"]
    protocol: int = Field(description="protocol version the client speaks (1)")
    client: str = Field("", max_length=128, description="free text for logs")
    token: str | None = Field(None, max_length=4096,
                              description="for clients that cannot send an Authorization header (browsers)")
    subscribe: Subscription = Subscription()


class Subscribe(_Msg):
    type: Literal["subscribe"]
    streams: list[Glob] = Field(["*"], max_length=64)
    events: list[Glob] = Field(["*"], max_length=64)


class AudioStart(_Msg):
    type: Literal["audio.start"]
    stream: str = Field(max_length=32, description="a stream configured with source = \"remote\"")
    rate: int = Field(ge=8000, le=192000, description="sample rate of the PCM that follows, Hz")
    channels: int = Field(1, ge=1, le=8, description="interleaved channels; the daemon downmixes")
    format: Literal["s16le", "f32le"] = "s16le"


class AudioStop(_Msg):
    type: Literal["audio.stop"]


class Ping(_Msg):
    type: Literal["ping"]


class Ask(_Msg):
    type: Literal["ask"]
    id: str | int = Field(description="required: names the question in its answer events and in cancel")
    question: str = Field(min_length=1, max_length=4000)
    stream: str | None = Field(None, max_length=32, description="default: the first stream that has a window")
    window: str | None = Field(None, max_length=64, description="a window id (`<stream>:w<n>`)")
    at: float | None = Field(None, ge=0, description="a time on the stream clock, s: the window holding it")
    max_new_tokens: int | None = Field(None, ge=1, description="capped by questions.max_new_tokens_limit")
    greedy: bool = Field(False, description="argmax decoding instead of the reference's sampling")
    temperature: float = Field(0.1, gt=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(500, ge=0, le=1000)
    repetition_penalty: float = Field(1.1, ge=1, le=2)
    seed: int | None = None


class Cancel(_Msg):
    type: Literal["cancel"]
    target: str | int = Field(description="the id of the question to cancel")


ClientMessage = Annotated[Hello | Subscribe | AudioStart | AudioStop | Ping | Ask | Cancel,
                          Field(discriminator="type")]
_client_adapter: TypeAdapter[Any] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("hello", "subscribe", "audio.start", "audio.stop", "ping", "ask", "cancel")


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str, re: object = None, **extra: object) -> None:
        super().__init__(message)
        self.code, self.message, self.re, self.extra = code, message, re, extra


def parse_client_message(text: str) -> Hello | Subscribe | AudioStart | AudioStop | Ping | Ask | Cancel:
    """Validate one text frame. Raises `ProtocolError` with `bad_json`, `unknown_type` or `bad_message`."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    re = raw.get("id") if isinstance(raw.get("id"), str | int) else None
    if raw.get("type") not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                            f"unknown message type {raw.get('type')!r}; expected one of {', '.join(CLIENT_TYPES)}", re)
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'message'}: {err['msg']}"
                           for err in e.errors())
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"invalid {raw['type']}: {detail}", re) from None


# --- server → client (documented in the schema; built as dicts in the service) ---

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _StreamEvent(_Out):
    stream: str
    seq: int = Field(description="per (stream, type), from 1; a gap means events of this type were lost")
    time: float = Field(description="Unix time the event was published, s")


class LevelEvent(_StreamEvent):
    type: Literal["level"]
    start: float = Field(description="stream clock, s")
    end: float
    rms_dbfs: float = Field(description="RMS in dBFS (full-scale sine: -3.01; silence: -120)")
    peak_dbfs: float


class SpeechStartEvent(_StreamEvent):
    type: Literal["speech.start"]
    id: str = Field(description="utterance id, `<stream>/<n>`")
    start: float
    wall: float | None = Field(description="Unix time the utterance's first sample was captured")


class PartialEvent(_StreamEvent):
    type: Literal["transcript.partial"]
    id: str
    start: float
    end: float = Field(description="stream clock of the last sample decoded")
    text: str
    revision: int = Field(description="1, 2, … per utterance; a newer partial replaces an older one")


class FinalEvent(_StreamEvent):
    type: Literal["transcript.final"]
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


class StatusEvent(_StreamEvent):
    type: Literal["stream.status"]
    state: Literal["open", "lost", "reopening", "closed", "error"]
    detail: str


class GapEvent(_StreamEvent):
    type: Literal["stream.gap"]
    at: float = Field(description="stream clock where the missing audio would have been, s")
    duration_s: float
    reason: str


class WindowEvent(_StreamEvent):
    type: Literal["window"]
    id: str = Field(description="`<stream>:w<n>`, n = 1, 2, …")
    start: float
    end: float = Field(description="start + 10 s")
    wall_start: float | None
    wall_end: float | None
    transcript: str = Field(description="texts of the finals that overlap the window: the LTU-AS input")


class WindowRef(_Out):
    id: str
    stream: str
    start: float
    end: float
    transcript: str


class SceneEvent(_StreamEvent):
    type: Literal["scene"]
    window: WindowRef
    text: str
    tokens: int
    skipped: int = Field(description="older windows of this stream not described because the model was behind")
    timings: dict[str, float]


class AnswerStart(_Out):
    type: Literal["answer.start"]
    re: str | int = Field(description="the question's id")
    window: WindowRef
    batch: int = Field(description="questions answered together, sharing one prefill")
    queue_ms: float


class AnswerDelta(_Out):
    type: Literal["answer.delta"]
    re: str | int
    text: str


class AnswerDone(_Out):
    type: Literal["answer.done"]
    re: str | int
    text: str
    tokens: int
    token_ids: list[int]
    reason: Literal["eos", "length", "cancelled"]
    window: WindowRef
    timings: dict[str, float | None] = Field(description="queue_ms, ttft_ms (from the ask), tokens_per_s, total_ms")


class StreamInfo(_Out):
    name: str
    kind: Literal["mic", "file", "remote"]


class Welcome(_Out):
    type: Literal["welcome"]
    re: str | int | None = None
    protocol: int
    server: str
    streams: list[StreamInfo]
    events: list[str]
    subscribe: Subscription
    demo: bool


class Reply(_Out):
    model_config = ConfigDict(extra="allow")  # subscribed echoes the lists, audio.ready the stream, cancelled its target
    type: Literal["subscribed", "audio.ready", "audio.stopped", "pong", "cancelled"]
    re: str | int | None = None
    time: float | None = None


class ErrorEvent(_Out):
    type: Literal["error"]
    code: str
    message: str
    re: str | int | None = None
    time: float | None = None
    retry_after_s: float | None = Field(None, description="with code busy")


class Dropped(_Out):
    type: Literal["dropped"]
    counts: dict[str, int] = Field(description="events shed from this client's queue since the last notice, by type")
    time: float


ServerMessage = Annotated[
    LevelEvent | SpeechStartEvent | PartialEvent | FinalEvent | StatusEvent | GapEvent | WindowEvent | SceneEvent
    | Welcome | Reply | ErrorEvent | Dropped | AnswerStart | AnswerDelta | AnswerDone, Field(discriminator="type")]


def json_schema() -> dict[str, Any]:
    """The machine-readable protocol: client and server messages as one JSON Schema document."""
    client = TypeAdapter(ClientMessage).json_schema(ref_template="#/$defs/{model}")
    server = TypeAdapter(ServerMessage).json_schema(ref_template="#/$defs/{model}")
    defs = {**client.pop("$defs", {}), **server.pop("$defs", {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"ltu-daemon websocket protocol v{PROTOCOL_VERSION}",
        "$defs": {**defs, "ClientMessage": client, "ServerMessage": server},
        "oneOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
        "close_codes": {c.name.lower(): int(c) for c in CloseCode},
    }
