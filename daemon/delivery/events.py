"""Server → client messages of protocol v1: stream events (stamped by the bus), replies and answers, each a
pydantic model. Built by the stages that produce them and serialised once by the delivery layer."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .wire import ErrorCode, MessageId, Subscription, type_names


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
EVENT_TYPES = type_names(StreamEvent)  # in the order the docs list them


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
