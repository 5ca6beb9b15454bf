"""Server → client messages of protocol v1: stream events (stamped by the bus), replies and answers, each a
pydantic model. Built by the stages that produce them and serialised once by the delivery layer."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..rules import AlertRule
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
    text: str = Field(description="empty unless outcome is speech")
    outcome: Literal["speech", "no_speech", "failed"] = Field(
        description="speech: text was heard; no_speech: the VAD heard a voice but the ASR's hallucination "
        "defences kept nothing (a cough, a door, music); failed: the decode failed, or the daemon stopped before it "
        "ran. Every speech.start gets exactly one final, whatever its outcome"
    )
    reason: Literal["silence", "max_length", "flush"]
    wall_start: float | None
    wall_end: float | None = Field(description="Unix time the last voiced sample was captured")
    dropped_segments: int
    asr_ms: float
    queue_ms: float


StreamState = Literal["starting", "open", "lost", "reopening", "closed", "error"]


AsrMode = Literal["normal", "no_partials", "fast_decode", "no_speculation"]


class StatusEvent(_StreamEvent):
    type: Literal["stream.status"] = "stream.status"
    state: StreamState
    detail: str
    asr_mode: AsrMode | None = Field(
        None,
        description="set when the speech recognizer changes how it works under load (it serves every stream, so "
        "every stream gets the event): normal, no_partials, fast_decode (beam 1), no_speculation; null otherwise",
    )
    asr_lag_s: float | None = Field(None, description="with asr_mode: how long the oldest waiting final had waited, s")


class GapEvent(_StreamEvent):
    type: Literal["stream.gap"] = "stream.gap"
    at: float = Field(description="stream clock where the missing audio would have been, s")
    duration_s: float
    reason: str


class WindowEvent(_StreamEvent):
    type: Literal["window"] = "window"
    id: str = Field(description="`<stream>:w<n>`, n = 1, 2, …")
    start: float
    end: float = Field(
        description="start + 10 s (less only for a stream that ended within its first 10 s); on a speech "
        "endpoint's stream (Wyoming, HTTP API) a window is one transcribed clip, or one utterance of a long clip"
    )
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
    label: str | None = Field(
        None, description='scene.answers = "closed": the known answer chosen (also the text); else null'
    )
    confidence: float | None = Field(
        None, ge=0, le=1, description="closed-set scenes: the label's probability among the checkpoint's answers"
    )


class Evidence(BaseModel):
    """A stored window an answer or alert rests on: where it is on its stream's clock and on the wall clock."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    stream: str
    start: float = Field(description="stream clock, s (of the daemon run that heard it)")
    end: float
    wall_start: float | None = Field(description="Unix time, s")
    wall_end: float | None


class AlertEvent(_StreamEvent):
    type: Literal["alert"] = "alert"
    id: str = Field(description="`<rule>/<stream>/<n>`; its alert.cleared carries the same id")
    rule: str
    kind: Literal["phrase", "regex", "label", "question", "level"]
    window: Evidence | None = Field(description="the window it fired on (label and question rules; null otherwise)")
    at: float = Field(description="stream clock where the condition was seen, s")
    wall: float | None = Field(description="Unix time of that moment")
    evidence: str = Field(description="what matched: the transcript, the scene text, the question, the level")
    score: float | None = Field(
        description="question rules: P(yes); level rules: the RMS dBFS; label rules: the closed-set scene's "
        "confidence (null for free text)"
    )
    clip: str | None = Field(description="file name of the kept audio (store.clips), or null")


class AlertClearedEvent(_StreamEvent):
    type: Literal["alert.cleared"] = "alert.cleared"
    id: str
    rule: str
    active_s: float = Field(description="how long the alert was active (wall clock), s")


class DigestEvent(_StreamEvent):
    type: Literal["digest"] = "digest"
    id: str = Field(description="`<stream>/digest/<n>`")
    since: float = Field(description="Unix time the summarised period starts, s")
    until: float
    text: str
    windows: int = Field(description="stored windows summarised")


class _DaemonEvent(_Out):
    """An event of the daemon itself rather than of one stream (a learning job): every subscriber's stream filter
    passes it; its `seq` counts per type."""

    stream: None = Field(None, description="always null: not a stream's event")
    seq: int = Field(0, ge=0, description="per type, from 1 for the daemon's lifetime")


class LearnProgress(_DaemonEvent):
    type: Literal["learn.progress"] = "learn.progress"
    job: str
    phase: Literal["dataset", "features", "train", "eval", "swap"]
    done: int = Field(ge=0, description="units of the phase done: clips (features, eval) or steps (train)")
    total: int = Field(ge=0, description="units in the phase (0: not known yet)")
    detail: str


class LearnDone(_DaemonEvent):
    type: Literal["learn.done"] = "learn.done"
    job: str
    outcome: Literal["swapped", "refused", "failed"] = Field(
        description="swapped: the new checkpoint describes from now on; refused: it scored worse than the one in "
        "use on the held-out clips; failed: a step failed (reason)"
    )
    accuracy: float | None = Field(description="the new checkpoint's held-out accuracy (null: not evaluated)")
    previous_accuracy: float | None = Field(description="the checkpoint in use, on the same clips")
    checkpoint: str | None = Field(description="the new checkpoint's folder (null: none was written)")
    reason: str


StreamEvent = (
    LevelEvent
    | SpeechStartEvent
    | PartialEvent
    | FinalEvent
    | StatusEvent
    | GapEvent
    | WindowEvent
    | SceneEvent
    | AlertEvent
    | AlertClearedEvent
    | DigestEvent
    | LearnProgress
    | LearnDone
)
EVENT_TYPES = type_names(StreamEvent)  # in the order the docs list them


class AnswerStart(_Out):
    type: Literal["answer.start"] = "answer.start"
    re: MessageId = Field(description="the question's id")
    scope: Literal["live", "history"] = Field(description="live: about one window's audio; history: stored text")
    window: WindowRef | None = Field(description="live: the window heard; history: null (see evidence)")
    evidence: list[Evidence] = Field(description="history: the stored windows the answer reads; live: the window")
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
    scope: Literal["live", "history"]
    window: WindowRef | None
    evidence: list[Evidence] = Field(description="the windows the answer rests on, as in answer.start")
    timings: AnswerTimings


StreamKind = Literal["mic", "file", "rtsp", "remote"]


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


class HistoryHit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    stream: str
    start: float = Field(description="stream clock, s (of the daemon run that heard it)")
    end: float
    wall_start: float | None
    wall_end: float | None
    transcript: str
    scene: str | None = Field(description="the scene description, if one was made")
    tags: list[str] = Field(description="alert rules that fired on it, and `speech` when it has a transcript")
    score: float = Field(description="rank score: higher is better (time mode: 0)")


class HistoryResults(_Out):
    type: Literal["history.results"] = "history.results"
    re: MessageId | None = None
    hits: list[HistoryHit]
    mode: Literal["combined", "text", "vector", "time"] = Field(
        description="what was searched (vector needs the embedder)"
    )


class TimelineMark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["speech", "scene", "alert", "gap"]
    at: float = Field(description="Unix time it began, s")
    end: float | None = Field(description="Unix time it ended, s (speech, gap, a cleared alert), or null")
    text: str = Field(
        description="speech: the transcript; scene: the description; alert: its rule and evidence; gap: why"
    )
    id: str | None = Field(description="the final's, window's or alert's id")
    clip: str | None = Field(description="alert: its clip's file name, served at /clips/<name> (with the token)")


class TimelineStream(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: str
    rms_dbfs: list[float | None] = Field(description="per bucket: the mean RMS level heard, dBFS (null: nothing heard)")
    peak_dbfs: list[float | None] = Field(description="per bucket: the highest peak, dBFS")
    marks: list[TimelineMark] = Field(description="in time order; at most `timeline.max_marks` (the newest kept)")
    truncated: bool = Field(description="more marks fell in the span than were sent")


class TimelineData(_Out):
    type: Literal["timeline.data"] = "timeline.data"
    re: MessageId | None
    since: float = Field(description="Unix time of the first bucket's start, s")
    until: float
    bucket_s: float = Field(description="each level bucket's length, s")
    streams: list[TimelineStream]


class RuleInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rule: AlertRule
    source: Literal["config", "runtime"] = Field(description="config rules are changed in the config file")
    active: list[str] = Field(description="streams on which it is active now")


class AlertRules(_Out):
    type: Literal["alert.rules"] = "alert.rules"
    re: MessageId | None = None
    rules: list[RuleInfo]


class AlertAdded(_Out):
    type: Literal["alert.added"] = "alert.added"
    re: MessageId | None = None
    name: str


class AlertRemoved(_Out):
    type: Literal["alert.removed"] = "alert.removed"
    re: MessageId | None = None
    name: str


class Labelled(_Out):
    type: Literal["labelled"] = "labelled"
    re: MessageId | None = None
    label: str = Field(description="the class the clip went to: the label, or the background class for a negative")
    clip: str = Field(description="the clip's file name in the label's folder")
    clips: int = Field(description="clips of that class now")


class LabelClip(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    window: str | None = Field(description="the window it was cut from")
    bytes: int
    added: float = Field(description="Unix time, s")


class LabelClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str
    folder: str
    clips: list[LabelClip]


class Labels(_Out):
    type: Literal["labels"] = "labels"
    re: MessageId | None = None
    classes: list[LabelClass]
    clips: int
    bytes: int
    max_clips: int = Field(description="learn.max_clips: a label beyond it is refused (labels_full)")
    max_bytes: int = Field(description="learn.max_mb in bytes")
    min_clips: int = Field(description="learn.min_clips: clips each class needs before learn can start")
    job: str | None = Field(description="the learning job running now, or null")
    active: str | None = Field(description="the learned checkpoint in use, or null (model.checkpoint)")


class LabelRemoved(_Out):
    type: Literal["label.removed"] = "label.removed"
    re: MessageId | None = None
    label: str
    removed: int = Field(description="clips deleted")


class LearnStarted(_Out):
    type: Literal["learn.started"] = "learn.started"
    re: MessageId | None = None
    job: str = Field(description="its progress and result come as learn.progress and learn.done events")


class LearnRolledBack(_Out):
    type: Literal["learn.rolled_back"] = "learn.rolled_back"
    re: MessageId | None = None
    checkpoint: str = Field(description="the checkpoint in use again")


class Dropped(_Out):
    type: Literal["dropped"] = "dropped"
    counts: dict[str, int] = Field(description="events shed from this client's queue since the last notice, by type")


Reply = (
    Welcome
    | Subscribed
    | AudioReady
    | AudioStopped
    | Pong
    | Cancelled
    | ErrorEvent
    | Dropped
    | HistoryResults
    | TimelineData
    | AlertRules
    | AlertAdded
    | AlertRemoved
    | Labelled
    | Labels
    | LabelRemoved
    | LearnStarted
    | LearnRolledBack
)
Answer = AnswerStart | AnswerDelta | AnswerDone | ErrorEvent
ServerMessage = StreamEvent | Reply | AnswerStart | AnswerDelta | AnswerDone


def encode(message: ServerMessage) -> str:
    """The one serialisation of a server message (done once per message, however many clients get it)."""
    return message.model_dump_json()
