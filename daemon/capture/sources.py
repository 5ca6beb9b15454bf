"""Audio sources. Each feeds one stream's input queue with `AudioChunk`s (16 kHz mono float32), `Gap`s and
`Status`es, and ends with `END`.

- `FileSource`: anything PyAV decodes, in a thread; real-time pacing or as fast as the pipeline takes it; loop.
- `MicSource`: a sounddevice input stream; the PortAudio callback only copies. A supervisor thread reopens a
  vanished or stalled device with exponential backoff and reports the lost time as a gap.
- `RtspSource`: a camera's audio over RTSP (AAC, Opus, ...), reconnecting with backoff; gaps reported.
- `RemoteSource`: PCM pushed by a satellite over the websocket (see `server`), any rate, channels and format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..clock import SAMPLE_RATE, ms_to_samples
from ..config import FileStream, MicStream, RtspStream
from .audio import END, PCM_FORMATS, AudioChunk, AudioFormatError, Gap, Resampler, SourceItem, Status, decode_pcm

log = logging.getLogger(__name__)


class _ThreadSource:
    """A source whose work runs in its own thread and hands items to the loop with backpressure."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[SourceItem] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[SourceItem]) -> None:
        self._loop, self._queue = loop, queue
        self._thread = threading.Thread(target=self._main, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _put(self, item: SourceItem) -> bool:
        """Blocking put (waits for room: nothing is lost); False if the source was stopped while waiting."""
        assert self._loop is not None and self._queue is not None
        fut = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        while True:
            try:
                fut.result(timeout=0.2)
                return True
            except TimeoutError:
                if self._stop.is_set() and item is not END:
                    fut.cancel()
                    return False
            except Exception:  # the loop closed under us
                return False

    def _main(self) -> None:
        try:
            self.run()
        except Exception as e:
            log.exception("source %s failed", self.name)
            self._put(Status("error", str(e)))
        finally:
            self._put(END)

    def run(self) -> None:  # the source's work, in its own thread
        raise NotImplementedError


class FileSource(_ThreadSource):
    def __init__(self, cfg: FileStream) -> None:
        super().__init__(cfg.name)
        self.cfg = cfg

    def run(self) -> None:
        import av

        path: Path = self.cfg.path
        chunk = ms_to_samples(self.cfg.chunk_ms)
        t0 = time.time()
        sent = 0  # samples handed over since t0: the pacing clock
        self._put(Status("open", str(path)))
        while not self._stop.is_set():
            try:
                container = av.open(str(path))
            except (OSError, av.error.FFmpegError) as e:
                self._put(Status("error", f"cannot open {path}: {e}"))
                return
            with container:
                if not container.streams.audio:
                    self._put(Status("error", f"{path} has no audio stream"))
                    return
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                buf = np.zeros(0, dtype=np.float32)
                try:
                    frames = container.decode(audio=0)
                    for frame in frames:
                        for out in resampler.resample(frame):
                            buf = np.concatenate([buf, out.to_ndarray().reshape(-1)])
                        while len(buf) >= chunk:
                            if not self._emit(buf[:chunk], t0, sent):
                                return
                            sent += chunk
                            buf = buf[chunk:]
                    for out in resampler.resample(None):
                        buf = np.concatenate([buf, out.to_ndarray().reshape(-1)])
                except av.error.FFmpegError as e:  # a corrupt tail: keep what decoded, say what happened
                    self._put(Status("error", f"decoding {path} failed: {e}"))
                if len(buf) and self._emit(buf, t0, sent):
                    sent += len(buf)
            if not self.cfg.loop:
                break
        self._put(Status("closed", "end of file"))

    def _emit(self, samples: np.ndarray, t0: float, sent: int) -> bool:
        if self._stop.is_set():
            return False
        wall = time.time()
        if self.cfg.realtime:
            due = t0 + sent / SAMPLE_RATE
            if due > wall and self._stop.wait(due - wall):
                return False
            wall = due
        return self._put(AudioChunk(samples.copy(), wall))


class MicSource(_ThreadSource):
    def __init__(self, cfg: MicStream) -> None:
        super().__init__(cfg.name)
        self.cfg = cfg
        self._last_callback = 0.0
        self._resampler: Resampler | None = None
        self._overflow_samples = 0
        self.device_name = ""

    def _deliver(self, block: np.ndarray, wall: float) -> None:
        """On the loop: resample and queue without waiting; a full queue drops the block and counts it."""
        assert self._queue is not None and self._resampler is not None
        x = self._resampler(block)
        try:
            if self._overflow_samples:
                self._queue.put_nowait(Gap(self._overflow_samples / SAMPLE_RATE, "overflow: the pipeline fell behind"))
                self._overflow_samples = 0
            self._queue.put_nowait(AudioChunk(x, wall))
        except asyncio.QueueFull:
            self._overflow_samples += len(x)

    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        # PortAudio's thread: copy and hand over, nothing else (no allocation-heavy work, no locks).
        self._last_callback = time.monotonic()
        assert self._loop is not None
        rate = self._resampler.rate if self._resampler else SAMPLE_RATE
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._deliver, indata.copy(), time.time() - frames / rate)

    def run(self) -> None:
        import sounddevice as sd

        cfg = self.cfg
        backoff = cfg.reopen_min_s
        lost_at: float | None = None
        while not self._stop.is_set():
            try:
                info = sd.query_devices(cfg.device, "input")
                rate = int(cfg.samplerate or info["default_samplerate"])
                self._resampler = Resampler(rate, cfg.channels)
                stream = sd.InputStream(
                    device=cfg.device,
                    samplerate=rate,
                    channels=cfg.channels,
                    dtype="float32",
                    blocksize=rate * cfg.block_ms // 1000,
                    callback=self._callback,
                )
                stream.start()
            except (sd.PortAudioError, ValueError) as e:
                self._put(
                    Status(
                        "reopening" if lost_at else "error",
                        f"cannot open input device {cfg.device!r}: {e}; retrying in {backoff:g} s "
                        "(`ltu-daemon devices` lists the devices)",
                    )
                )
                lost_at = lost_at or time.time()
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, cfg.reopen_max_s)
                continue
            self.device_name = str(info["name"])
            if lost_at is not None:
                self._put(Gap(time.time() - lost_at, "input device lost"))
                lost_at = None
            self._put(Status("open", f"{self.device_name} at {rate} Hz"))
            backoff = cfg.reopen_min_s
            self._last_callback = time.monotonic()
            try:
                while not self._stop.wait(0.1):
                    if not stream.active or time.monotonic() - self._last_callback > cfg.stall_s:
                        lost_at = time.time() - (time.monotonic() - self._last_callback)
                        self._put(Status("lost", f"{self.device_name} stopped delivering audio; reopening"))
                        break
            finally:
                try:
                    stream.abort()
                    stream.close()
                except sd.PortAudioError:
                    pass
        self._put(Status("closed", "stopped"))


class RtspSource(_ThreadSource):
    """A network camera's audio over RTSP (PyAV/FFmpeg), decoded and resampled to 16 kHz mono in this thread.

    Connecting and every read are bounded by `timeout_s`, so a camera that vanishes (or stops sending) is noticed
    within that time: the stream goes `lost`, and the source reconnects with exponential backoff between
    `reopen_min_s` and `reopen_max_s` (`reopening` while it fails). When audio flows again, the time away is
    reported as a gap, as for a vanished microphone. The URL's credentials never leave this class: every message
    names `redacted_url()`, and FFmpeg's own error texts are scrubbed of the URL and password."""

    def __init__(self, cfg: RtspStream) -> None:
        super().__init__(cfg.name)
        self.cfg = cfg
        self.where = cfg.redacted_url()
        self.connects = 0

    def run(self) -> None:
        import av

        cfg = self.cfg
        url = cfg.resolved_url()
        chunk = ms_to_samples(cfg.chunk_ms)
        backoff = cfg.reopen_min_s
        lost_at: float | None = None
        options: dict[str, str] = {"rtsp_transport": cfg.transport}
        while not self._stop.is_set():
            try:
                container = av.open(url, options=options, timeout=(cfg.timeout_s, cfg.timeout_s))
            except (OSError, av.error.FFmpegError) as e:
                why = cfg.scrub(str(e))
                self._put(
                    Status(
                        "reopening" if lost_at else "error",
                        f"cannot open {self.where}: {why}; retrying in {backoff:g} s",
                    )
                )
                log.warning("stream %s: cannot open %s: %s", self.name, self.where, why)
                lost_at = lost_at or time.time()
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, cfg.reopen_max_s)
                continue
            why = "the stream ended"
            with container:
                if not container.streams.audio:
                    self._put(Status("error", f"{self.where} has no audio stream; retrying in {backoff:g} s"))
                    lost_at = lost_at or time.time()
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, cfg.reopen_max_s)
                    continue
                self.connects += 1
                audio = container.streams.audio[0]
                if lost_at is not None:
                    self._put(Gap(time.time() - lost_at, f"RTSP stream lost ({self.where})"))
                    lost_at = None
                self._put(Status("open", f"{self.where}: {audio.codec_context.name} {audio.rate} Hz"))
                backoff = cfg.reopen_min_s
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                buf = np.zeros(0, dtype=np.float32)
                try:
                    for frame in container.decode(audio):
                        for out in resampler.resample(frame):
                            buf = np.concatenate([buf, out.to_ndarray().reshape(-1)])
                        while len(buf) >= chunk:  # live audio: stamped with its arrival, never paced
                            if not self._put(AudioChunk(buf[:chunk].copy(), time.time() - len(buf) / SAMPLE_RATE)):
                                return
                            buf = buf[chunk:]
                        if self._stop.is_set():
                            break
                except (OSError, av.error.FFmpegError) as e:
                    why = cfg.scrub(str(e))
            if self._stop.is_set():
                break
            lost_at = time.time()
            self._put(Status("lost", f"{self.where}: {why}; reconnecting"))
            log.warning("stream %s: %s: %s; reconnecting", self.name, self.where, why)
        self._put(Status("closed", "stopped"))


class NotReady(Exception):
    """The stream has not started yet (the daemon is loading its models)."""


class RemoteSource:
    """A stream fed by one satellite connection at a time (claimed with `audio.start`, released at `audio.stop`
    or disconnect).

    Bounded whatever the satellite sends: its audio may run at most `max_ahead_s` seconds ahead of real time since
    it claimed the stream (a reconnecting satellite may catch up that much at once); beyond that `push` says how
    long the connection should wait before its next frame, so it is read at real time and the satellite's own
    buffers fill. A frame holding more than `max_ahead_s` of audio is refused before it is decoded. Each frame is
    queued in pieces of at most `PIECE_S`, so the stream's queue (`audio.source_queue` items) holds a bounded number
    of seconds and the pipeline yields between pieces. Once stopped, it takes no more audio."""

    PIECE_S = 0.5

    def __init__(self, name: str, max_ahead_s: float = 30.0) -> None:
        self.name = name
        self.max_ahead_s = max_ahead_s
        self.owner: object | None = None
        self._queue: asyncio.Queue[SourceItem] | None = None
        self._resampler: Resampler | None = None
        self._fmt = "s16le"
        self._channels = 1
        self._claimed = 0.0  # time.monotonic() of the claim
        self._received = 0  # samples (16 kHz) received since the claim
        self._stopped = False

    def start(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[SourceItem]) -> None:
        self._queue = queue

    def stop(self) -> None:
        self._stopped = True
        if self._queue is not None:  # called on the loop; waits for room like every other put
            asyncio.get_running_loop().create_task(self._queue.put(END))

    def join(self, timeout: float | None = None) -> None:
        pass

    async def claim(self, owner: object, rate: int, channels: int, fmt: str) -> None:
        """Make `owner` the connection feeding this stream. Raises `PermissionError` when another one feeds it,
        `NotReady` before the daemon has started its streams."""
        if self._queue is None:
            raise NotReady("the daemon is still starting; retry once /healthz says ready")
        if self.owner is not None and self.owner is not owner:
            raise PermissionError(f"stream {self.name!r} is already fed by another connection")
        self.owner, self._fmt, self._channels = owner, fmt, channels
        self._resampler = Resampler(rate, channels)
        self._claimed, self._received = time.monotonic(), 0
        await self._queue.put(Status("open", f"remote {rate} Hz {channels} ch {fmt}"))

    async def push(self, owner: object, data: bytes) -> float:
        """Decode and queue one binary frame (waits for room). Returns how long (s) the feeding connection should
        wait before its next frame: how far its audio is over `max_ahead_s` ahead of real time. Raises
        `AudioFormatError` and queues nothing when `data` is not whole frames of the announced format."""
        if owner is not self.owner or self._resampler is None or self._queue is None:
            raise PermissionError("send audio.start before binary audio frames")
        if self._stopped:
            return 0.0  # the daemon is stopping: the stream's pipeline has ended
        seconds = len(data) / (PCM_FORMATS[self._fmt].itemsize * self._channels * self._resampler.rate)
        if seconds > self.max_ahead_s:  # known before decoding: such a frame could never be paced
            raise AudioFormatError(
                f"a frame of {seconds:.1f} s of audio is over server.max_audio_ahead_s = {self.max_ahead_s:g} s: "
                "send shorter frames (20-100 ms is usual)"
            )
        x = self._resampler(decode_pcm(data, self._fmt, self._channels))
        wall = time.time() - len(x) / SAMPLE_RATE
        piece = int(self.PIECE_S * SAMPLE_RATE)
        for i in range(0, len(x), piece):
            await self._queue.put(AudioChunk(x[i : i + piece], wall + i / SAMPLE_RATE))
        self._received += len(x)
        ahead = self._received / SAMPLE_RATE - (time.monotonic() - self._claimed)
        return max(0.0, ahead - self.max_ahead_s)

    async def release(self, owner: object) -> None:
        if owner is self.owner and self._queue is not None:
            self.owner = None
            self._resampler = None
            await self._queue.put(Status("closed", "satellite disconnected"))


class RemoteStreams:
    """The remote streams by name: all the websocket server knows of sources (claim, push, release)."""

    def __init__(self, sources: dict[str, RemoteSource]) -> None:
        self._sources = sources

    def get(self, name: str) -> RemoteSource | None:
        return self._sources.get(name)

    def names(self) -> list[str]:
        return sorted(self._sources)

    def fed_by(self, owner: object) -> RemoteSource | None:
        """The stream `owner` is feeding, if any."""
        return next((r for r in self._sources.values() if r.owner is owner), None)

    async def release(self, owner: object) -> str | None:
        """`owner` stops feeding (audio.stop or disconnect); the released stream's name, or None."""
        remote = self.fed_by(owner)
        if remote is None:
            return None
        await remote.release(owner)
        return remote.name
