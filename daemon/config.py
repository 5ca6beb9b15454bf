"""The daemon's one typed configuration tree: TOML file → environment overrides → `--set` overrides → validation.

Everything is validated here, once: unknown keys and wrong types are `ConfigError`s that name the key
(`vad.min_speech_ms: Input should be a valid integer, got "x"`). Each component receives only its own section.

Override syntax (both take TOML literals, falling back to a bare string):

    LTU_DAEMON__SERVER__PORT=9000              # environment: LTU_DAEMON__ + the key path joined by "__"
    ltu-daemon start --set vad.aggressiveness=3 --set 'streams.0.path="talk.flac"'

Relative paths in a config file are relative to that file's folder; `config/default.toml` documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .rules import AlertRule

ENV_PREFIX = "LTU_DAEMON__"
PROFILES = Path(__file__).resolve().parent / "profiles"  # default.toml and demo.toml, shipped in the package

# TOML strings become paths; strict mode would otherwise insist on a Path object.
PathField = Annotated[Path, Field(strict=False)]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def _stream_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("use 1-32 of a-z 0-9 _ - (starting with a letter or digit)")
    return v


StreamName = Annotated[str, AfterValidator(_stream_name)]  # a [[streams]] name, or an endpoint's stream


class ConfigError(Exception):
    """The configuration cannot be used; the message names every bad key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    web: bool = True
    token: SecretStr | None = None
    token_file: PathField | None = None
    allowed_origins: list[str] = []
    allow_loopback_origins: bool = True
    max_message_bytes: int = Field(1 << 20, ge=1024)
    max_control_bytes: int = Field(64 << 10, ge=256)
    client_queue: int = Field(512, ge=8)
    send_timeout_s: float = Field(10.0, gt=0)
    hello_timeout_s: float = Field(10.0, gt=0)
    ping_interval_s: float = Field(20.0, gt=0)
    ping_timeout_s: float = Field(20.0, gt=0)
    max_clients: int = Field(64, ge=1)
    messages_per_s: float = Field(50.0, gt=0)
    messages_burst: int = Field(200, ge=1)
    questions_per_s: float = Field(5.0, gt=0)
    questions_burst: int = Field(30, ge=1)
    allowed_hosts: list[str] = []
    max_connections: int = Field(256, ge=2)
    open_timeout_s: float = Field(10.0, gt=0)
    max_audio_ahead_s: float = Field(30.0, gt=0, le=3600)
    audio_frames_per_s: float = Field(100.0, gt=0)

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)

    def resolved_token(self) -> str | None:
        """The token from `token` or `token_file` (first line), or None."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip() or None
            except OSError as e:
                raise ConfigError(f"server.token_file: cannot read {self.token_file}: {e}") from e
        return None


class AudioConfig(_Section):
    ring_seconds: float = Field(300.0, gt=0)
    level_interval_ms: int = Field(250, ge=10)
    source_queue: int = Field(256, ge=4)


class VadConfig(_Section):
    aggressiveness: int = Field(2, ge=0, le=3)
    frame_ms: Literal[10, 20, 30] = 30
    start_ms: int = Field(90, ge=10)
    pre_roll_ms: int = Field(300, ge=0)
    hangover_ms: int = Field(450, ge=30)
    speculate_ms: int = Field(90, ge=0)
    min_speech_ms: int = Field(250, ge=0)
    max_utterance_s: float = Field(20.0, ge=1)
    cut_search_ms: int = Field(4000, ge=30)
    cut_window_ms: int = Field(300, ge=10)

    @model_validator(mode="after")
    def _cut_inside(self) -> VadConfig:
        if self.cut_search_ms >= self.max_utterance_s * 1000 / 2:
            raise ValueError("vad.cut_search_ms must be under half of vad.max_utterance_s")
        if self.cut_window_ms > self.cut_search_ms:
            raise ValueError("vad.cut_window_ms must not exceed vad.cut_search_ms")
        return self


class AsrConfig(_Section):
    model: str = "large-v2"
    device: str = "auto"
    compute_type: str = "default"
    language: str | None = "en"
    beam_size: int = Field(5, ge=1)
    cpu_threads: int = Field(0, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)
    partials: bool = True
    partial_interval_ms: int = Field(700, ge=100)
    no_speech_threshold: float = Field(0.6, ge=0, le=1)
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = Field(2.4, gt=0)
    lead_silence_ms: int = Field(500, ge=0, le=5000)
    batch_size: int = Field(0, ge=0, le=64)
    final_queue: int = Field(64, ge=1)
    # decode threads sharing the model: 0 = auto (2 on a CPU with 2+ cores, 1 batching lane on a GPU)
    lanes: int = Field(0, ge=0, le=16)
    # the most of the lanes' time partials may use (a token bucket over 10 s); 0 turns partials off
    partial_share: float = Field(0.3, ge=0, le=1)
    # degrade (partials off, then beam 1, then no speculative finals) when a final has waited longer than this, s
    overload_lag_s: float = Field(3.0, gt=0)
    overload_escalate_s: float = Field(2.0, ge=0)  # each step waits this long for the previous one to help, s
    overload_recover_s: float = Field(10.0, ge=0)  # a step back once the lag stayed under half the bound this long


class ModelConfig(_Section):
    """LTU-AS: where each component comes from (hub id, local path, URL or `authors:NAME`, see `ltu_as.sources`)."""

    enabled: bool = True
    checkpoint: str = "authors:ltuas_long_noqa_a6.bin"
    whisper: str | None = None  # None: the checkpoint's config (openai/whisper-large)
    llm: str | None = None  # None: the checkpoint's config (authors:vicuna_ltuas)
    device: str = "auto"
    dtype: str = "auto"
    # LLM weights for inference: "int8"/"int4" merge LoRA then quantize (ltu_as.loading.quantize); the ASR's
    # compute_type "default" then becomes int8 too
    quantization: Literal["none", "int8", "int4"] = "none"
    # the Whisper encoder's linear layers: "int8" halves its 1.2 GiB on a GPU (for 8 GB cards); its features then
    # differ from fp32/bf16 by about 1 % per layer (docs/performance.md)
    encoder_quantization: Literal["none", "int8"] = "none"
    # how int8 LLM layers multiply: "auto" (torchao's Int8Tensor on CUDA, aten's int8pack kernel on CPU),
    # "torchao", "aten", or "compiled" (a torch.compile'd dequant + matmul); bench/gpu_check.py times each
    int8_kernel: Literal["auto", "torchao", "aten", "compiled"] = "auto"


class LlmConfig(_Section):
    """Where the LLM step runs: "local" (the decode engine in this process) or "vllm" (a vLLM OpenAI server that
    receives each prompt as embeddings; the Whisper encoder, TLTR and projector stay here). docs/scale.md."""

    backend: Literal["local", "vllm"] = "local"
    url: str = "http://127.0.0.1:8000/v1"  # the vLLM server's OpenAI base URL
    api_key: SecretStr | None = None  # sent as "Authorization: Bearer <key>" (vLLM's --api-key)
    served_model: str | None = None  # the model name vLLM serves (None: the first of GET /models)
    max_concurrency: int = Field(16, ge=1, le=1024)  # requests open at once (the engine's "slots")
    connect_timeout_s: float = Field(5.0, gt=0)
    token_timeout_s: float = Field(60.0, gt=0)  # the most to wait for the server's next token
    max_positions: int = Field(1024, ge=64)  # vLLM's --max-model-len: prompt + answer


class WindowsConfig(_Section):
    hop_s: float = Field(10.0, ge=1.0, le=10.0)
    settle_max_s: float = Field(30.0, ge=0)
    keep: int = Field(1000, ge=1)


class FeaturesConfig(_Section):
    cache_windows: int = Field(64, ge=1)
    cache_mb: float = Field(512.0, gt=0)


DEFAULT_SCENE_PROMPT = "Describe the audio scene: what sounds are there and what is said?"


class SceneConfig(_Section):
    """What each window's `scene` asks. `prompt` unset: the question the checkpoint was trained on (its
    `ltu_as_trained.json`, written by `ltu-as train`), else `DEFAULT_SCENE_PROMPT`. `answers = "closed"`: with a
    checkpoint that records an answer set (a fine-tune on your own sounds), the scene is the most probable of those
    answers, scored (not generated), with its probability as the event's `confidence`."""

    enabled: bool = True
    prompt: str | None = Field(None, min_length=1, max_length=2000)
    answers: Literal["free", "closed"] = "free"
    every: int = Field(1, ge=1)
    max_new_tokens: int = Field(96, ge=1, le=1024)


class SchedulerConfig(_Section):
    max_queue: int = Field(32, ge=1)
    max_batch: int = Field(8, ge=1)
    question_deadline_s: float = Field(60.0, gt=0)
    scene_deadline_s: float = Field(120.0, gt=0)
    retry_after_s: float = Field(2.0, gt=0)


class EngineConfig(_Section):
    """The decode engine (`ltu_as.serving.engine`): one running batch for every stream and client."""

    slots: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # rows holding KV; auto: what memory_fraction fits
    max_slots: int = Field(64, ge=1)  # the cap on "auto"
    memory_fraction: float = Field(0.5, gt=0, le=0.95)  # of the device's free memory (RAM on CPU), after loading
    memory_budget_gb: float = Field(0.0, ge=0)  # plan against this much instead of the device's free memory (0)
    max_positions: int = Field(1024, ge=64)  # per row: audio tokens + prompt + answer
    prefill_chunk: int = Field(256, ge=1)  # most prompt positions prefilled per step (running rows wait ≤ 1 chunk)
    prefix_cache: int = Field(32, ge=0)  # recent windows whose audio-token KV is kept for questions


class QuestionsConfig(_Section):
    max_new_tokens: int = Field(128, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1, le=4096)


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


def user_cache() -> Path:
    """Where the daemon keeps what it builds for itself: `$XDG_CACHE_HOME/ltu-daemon` (`~/.cache/ltu-daemon`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ltu-daemon"


def user_data() -> Path:
    """Where the daemon keeps what it remembers: `$XDG_DATA_HOME/ltu-daemon` (`~/.local/share/ltu-daemon`)."""
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "ltu-daemon"


class StoreConfig(_Section):
    """The history store (SQLite, WAL): windows, transcripts, answers, alerts, gaps, digests, runtime alert rules."""

    enabled: bool = True
    path: PathField = Field(default_factory=lambda: user_data() / "history.db")
    retention_days: float = Field(30.0, gt=0)
    max_mb: float = Field(2048.0, gt=0)
    commit_interval_s: float = Field(0.5, gt=0, le=10)
    queue: int = Field(10000, ge=16)
    embeddings: bool = True
    embed_device: str = "cpu"
    clips: bool = False
    clips_dir: PathField | None = None
    clip_retention_days: float = Field(7.0, gt=0)
    clips_with_speech: bool = True


class LearnConfig(_Section):
    """Teaching it your sounds from the page (docs/training.md): clients label windows (`label`); their audio is
    kept as a folder dataset under `dir`; a fine-tune job (`learn`, or daily at `at` when labels changed) trains
    a checkpoint from the one in use, scores it and the one in use on the held-out clips, and swaps it in only if
    it is not worse, keeping the previous ones for `learn.rollback`."""

    enabled: bool = False
    dir: PathField | None = None  # None: "learn" beside the history store (store.path's folder)
    at: str | None = Field(None, pattern=r"^\d\d:\d\d$")  # HH:MM local: a daily run when the labels changed
    background: str = Field("nothing unusual", min_length=1, max_length=60)  # the class of "not <label>" clips
    max_clips: int = Field(2000, ge=1)
    max_mb: float = Field(1024.0, gt=0)
    min_clips: int = Field(5, ge=2)  # per class, before a job may start (a fifth of them are held out)
    held_out: float = Field(0.2, gt=0, lt=1)
    base: str | None = None  # the checkpoint a first job starts from (None: model.checkpoint)
    device: str = "auto"  # where the job trains: it loads a second copy of the model there
    dtype: str = "auto"
    train_set: list[str] = []  # extra `ltu-as train --set key=value` of every job (e.g. "max_steps=300")
    keep: int = Field(3, ge=1, le=50)  # learned checkpoints kept (the one in use and those to roll back to)

    @field_validator("at")
    @classmethod
    def _clock(cls, v: str | None) -> str | None:
        if v is not None and not (0 <= int(v[:2]) <= 23 and 0 <= int(v[3:]) <= 59):
            raise ValueError(f"learn.at {v!r}: hours 00-23, minutes 00-59")
        return v

    @model_validator(mode="after")
    def _held_out(self) -> LearnConfig:
        if round(self.min_clips * self.held_out) < 1:
            raise ValueError(
                f"learn.min_clips {self.min_clips} with learn.held_out {self.held_out} holds no clip out: raise "
                "either (each label needs a held-out clip to score the new checkpoint)"
            )
        return self

    def folder(self, store: StoreConfig) -> Path:
        return self.dir or store.path.parent / "learn"


class HistoryConfig(_Section):
    """Questions about the past (`ask` with scope history or auto) and `history.search`."""

    max_windows: int = Field(8, ge=1, le=64)
    since_h: float = Field(24.0, gt=0)
    max_new_tokens: int = Field(160, ge=1, le=1024)


class DigestConfig(_Section):
    enabled: bool = True
    every_s: float = Field(3600.0, ge=1)
    max_windows: int = Field(24, ge=1, le=200)
    prompt: str = "Summarise what happened, briefly, with the times of the main events."
    max_new_tokens: int = Field(160, ge=1, le=1024)


class AlertsConfig(_Section):
    rules: list[AlertRule] = []
    tick_s: float = Field(1.0, gt=0, le=60)
    max_runtime_rules: int = Field(32, ge=0, le=1000)  # rules clients may add with alert.add (kept in the store)


class MqttConfig(_Section):
    enabled: bool = False
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    password_file: PathField | None = None
    tls_ca: PathField | None = None
    tls_insecure: bool = False
    client_id: str = "ltu-daemon"
    prefix: str = Field("ltu", pattern=r"^[A-Za-z0-9_/-]{1,64}$")
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    queue: int = Field(1000, ge=1)
    level_every_s: float = Field(5.0, gt=0)
    keepalive_s: int = Field(30, ge=5)

    def resolved_password(self) -> str | None:
        """The password from `password` or `password_file` (first line), or None."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip() or None
            except OSError as e:
                raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {e}") from e
        return None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", v):
            raise ValueError("use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        return v


class MetricsConfig(_Section):
    enabled: bool = True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Endpoint(_Section):
    """A speech endpoint: transcripts of what it receives go out as finals of its own `stream`."""

    enabled: bool = False
    host: str = "127.0.0.1"
    stream: StreamName
    max_audio_s: float = Field(gt=0)
    max_connections: int = Field(16, ge=1, le=4096)

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)


class WyomingConfig(_Endpoint):
    port: int = Field(10300, ge=0, le=65535)
    stream: StreamName = "wyoming"
    max_audio_s: float = Field(60.0, gt=0)
    idle_timeout_s: float = Field(30.0, gt=0)
    max_event_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)


class ApiConfig(_Endpoint):
    port: int = Field(8766, ge=0, le=65535)
    stream: StreamName = "api"
    max_audio_s: float = Field(3600.0, gt=0)
    max_upload_mb: float = Field(25.0, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    max_decodes: int = Field(2, ge=1, le=64)


class DemoConfig(_Section):
    enabled: bool = False
    models_dir: PathField = Field(default_factory=lambda: user_cache() / "demo")


class _Stream(_Section):
    name: StreamName


class MicStream(_Stream):
    source: Literal["mic"]
    device: str | int | None = None
    samplerate: int | None = Field(None, ge=8000, le=384000)
    channels: int = Field(1, ge=1, le=32)
    block_ms: int = Field(30, ge=5, le=500)
    stall_s: float = Field(2.0, gt=0)
    reopen_min_s: float = Field(0.5, gt=0)
    reopen_max_s: float = Field(10.0, gt=0)


class FileStream(_Stream):
    source: Literal["file"]
    path: PathField
    realtime: bool = True
    loop: bool = False
    chunk_ms: int = Field(100, ge=10, le=2000)


class RtspStream(_Stream):
    """A network camera's (or any RTSP server's) audio: reconnects with backoff, the time away reported as a gap.
    Credentials may be in the URL (`rtsp://user:pass@cam/stream`) or the password in `password_file`; either way
    they never appear in logs, events or /healthz (`redacted_url`)."""

    source: Literal["rtsp"]
    url: str
    username: str | None = None
    password_file: PathField | None = None
    transport: Literal["tcp", "udp"] = "tcp"  # tcp: through NAT and firewalls, and no lost packets
    timeout_s: float = Field(5.0, gt=0, le=120)  # to connect, and between packets: longer silence is a lost stream
    reopen_min_s: float = Field(1.0, gt=0)
    reopen_max_s: float = Field(30.0, gt=0)
    chunk_ms: int = Field(100, ge=10, le=2000)

    @field_validator("url")
    @classmethod
    def _rtsp_url(cls, v: str) -> str:
        if not re.match(r"^rtsps?://[^/\s]+(/\S*)?$", v):
            raise ValueError("use rtsp://[user[:password]@]HOST[:PORT]/PATH (or rtsps://)")
        return v

    def resolved_url(self) -> str:
        """The URL to connect to, with `username` and the `password_file`'s first line put in when given."""
        if self.username is None and self.password_file is None:
            return self.url
        parts = urlsplit(self.url)
        user = quote(self.username or unquote(parts.username or ""), safe="")
        password = parts.password and unquote(parts.password)
        if self.password_file is not None:
            try:
                password = self.password_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as e:
                raise ConfigError(f"streams {self.name}: cannot read password_file {self.password_file}: {e}") from e
        host = parts.hostname or ""
        netloc = f"{user}{':' + quote(password, safe='') if password else ''}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def scrub(self, text: str) -> str:
        """`text` (an FFmpeg error, say) with the URL and any password in it replaced."""
        for url in {self.url, self.resolved_url()}:
            text = text.replace(url, self.redacted_url())
            password = urlsplit(url).password
            if password:
                text = text.replace(password, "***").replace(unquote(password), "***")
        return text

    def redacted_url(self) -> str:
        """The URL without its credentials, for logs and events: rtsp://***@cam:554/stream."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = ("***@" if parts.username or self.username or self.password_file else "") + host
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RemoteStream(_Stream):
    source: Literal["remote"]


StreamConfig = Annotated[MicStream | FileStream | RtspStream | RemoteStream, Field(discriminator="source")]


class DaemonConfig(_Section):
    server: ServerConfig = ServerConfig()
    audio: AudioConfig = AudioConfig()
    vad: VadConfig = VadConfig()
    asr: AsrConfig = AsrConfig()
    model: ModelConfig = ModelConfig()
    llm: LlmConfig = LlmConfig()
    windows: WindowsConfig = WindowsConfig()
    features: FeaturesConfig = FeaturesConfig()
    scene: SceneConfig = SceneConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    engine: EngineConfig = EngineConfig()
    questions: QuestionsConfig = QuestionsConfig()
    store: StoreConfig = StoreConfig()
    learn: LearnConfig = LearnConfig()
    history: HistoryConfig = HistoryConfig()
    digests: DigestConfig = DigestConfig()
    alerts: AlertsConfig = AlertsConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    wyoming: WyomingConfig = WyomingConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    demo: DemoConfig = DemoConfig()
    streams: list[StreamConfig] = []

    @model_validator(mode="after")
    def _cross_checks(self) -> DaemonConfig:
        names = [s.name for s in self.streams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"streams: duplicate names {dup}")
        need = self.vad.max_utterance_s + self.vad.pre_roll_ms / 1000 + 5
        if self.audio.ring_seconds < need:
            raise ValueError(f"audio.ring_seconds must be at least vad.max_utterance_s + pre-roll + 5 s = {need:g}")
        if self.learn.enabled and not self.model.enabled:
            raise ValueError("learn.enabled needs model.enabled: learning fine-tunes the LTU-AS model")
        rules = [r.name for r in self.alerts.rules]
        dup_rules = sorted({n for n in rules if rules.count(n) > 1})
        if dup_rules:
            raise ValueError(f"alerts.rules: duplicate names {dup_rules}")
        if self.server.max_connections <= self.server.max_clients:
            raise ValueError(
                "server.max_connections (every TCP connection, handshakes and HTTP requests included) must be more "
                "than server.max_clients"
            )
        if not self.server.is_loopback and self.server.resolved_token() is None:
            raise ValueError(
                f"server.host {self.server.host!r} is not loopback: set server.token or server.token_file "
                "(clients send it as 'Authorization: Bearer <token>'), or bind to 127.0.0.1"
            )
        if self.api.enabled and not self.api.is_loopback and self.server.resolved_token() is None:
            raise ValueError(
                f"api.host {self.api.host!r} is not loopback: set server.token or server.token_file (the API "
                "takes the same token), or bind to 127.0.0.1"
            )
        taken = {s.name for s in self.streams}
        for section in ("wyoming", "api"):
            endpoint = getattr(self, section)
            if endpoint.enabled and endpoint.stream in taken:
                raise ValueError(f"{section}.stream {endpoint.stream!r} is also a [[streams]] name: choose another")
        if self.wyoming.enabled and self.api.enabled and self.wyoming.stream == self.api.stream:
            raise ValueError("wyoming.stream and api.stream must differ")
        if self.llm.backend == "vllm" and self.model.quantization != "none":
            raise ValueError(
                "model.quantization applies to the local LLM; with llm.backend = 'vllm' quantize on the vLLM "
                "server (its --quantization) and set model.quantization = 'none'"
            )
        return self

    def asr_effective(self) -> AsrConfig:
        """The ASR settings as used: compute_type "default" follows model.quantization (int8 when quantized)."""
        if self.asr.compute_type == "default" and self.model.enabled and self.model.quantization != "none":
            return self.asr.model_copy(update={"compute_type": "int8"})
        return self.asr

    def stream(self, name: str) -> MicStream | FileStream | RtspStream | RemoteStream:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)


def parse_value(text: str) -> Any:
    """A TOML literal (`3`, `true`, `"x"`, `[1, 2]`), or the text itself when it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])}: no such list entry")
            key: Any = int(part)
        else:
            key = part
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict | list):
                raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])} is a value, not a section")


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    """Make the file's relative paths relative to its folder (before overrides, which are relative to the cwd)."""
    demo = tree.get("demo")
    if isinstance(demo, dict) and isinstance(demo.get("models_dir"), str):
        demo["models_dir"] = str(base / demo["models_dir"])
    for section, key in (
        ("server", "token_file"),
        ("store", "path"),
        ("store", "clips_dir"),
        ("learn", "dir"),
        ("mqtt", "password_file"),
        ("mqtt", "tls_ca"),
    ):
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str(base / Path(node[key]).expanduser())
    model = tree.get("model")
    if isinstance(model, dict):
        from ltu_as.loading.sources import is_remote

        for key in ("checkpoint", "whisper", "llm"):  # local paths only: hub ids, URLs and authors: names stay
            value = model.get(key)
            if isinstance(value, str) and not is_remote(value) and not Path(value).expanduser().is_absolute():
                model[key] = str(base / value)
    for s in tree.get("streams", []) if isinstance(tree.get("streams"), list) else []:
        if isinstance(s, dict) and s.get("source") == "file" and isinstance(s.get("path"), str):
            s["path"] = str(base / Path(s["path"]).expanduser())
        if isinstance(s, dict) and s.get("source") == "rtsp" and isinstance(s.get("password_file"), str):
            s["password_file"] = str(base / Path(s["password_file"]).expanduser())


def format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        parts: list[str] = []
        for p in err["loc"]:
            if isinstance(p, int):
                parts.append(f"[{p}]")
            elif parts and parts[-1].startswith("[") and p in ("mic", "file", "rtsp", "remote"):
                continue  # the union tag pydantic inserts after a list index
            else:
                parts.append(("." if parts else "") + str(p))
        key = "".join(parts) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict | list):
            msg += f", got {err['input']!r}"
        lines.append(f"{key}: {msg}")
    return "\n  ".join(lines)


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    environ: dict[str, str] | None = None,
) -> DaemonConfig:
    """Read `path` (TOML; None: built-in defaults), apply `LTU_DAEMON__*` variables and `key=value` overrides.

    Raises `ConfigError` naming each bad key.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {p} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
        _resolve_paths(tree, p.resolve().parent)
    env = os.environ if environ is None else environ
    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            _set_path(tree, keys, parse_value(env[name]), f"environment {name}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set vad.aggressiveness=3")
        _set_path(tree, key.strip().split("."), parse_value(value.strip()), f"--set {key}")
    try:
        return DaemonConfig.model_validate(tree)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n  {format_errors(e)}") from None


def demo_config_path() -> Path:
    """The demo profile shipped with the package (`daemon/profiles/demo.toml`)."""
    p = PROFILES / "demo.toml"
    if not p.is_file():
        raise ConfigError(f"the demo profile {p} is missing: the package is incomplete; reinstall ltu-daemon")
    return p
