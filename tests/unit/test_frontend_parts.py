"""The daemon's small cores: audio ring, level meter, PCM decoding, resampling, event bus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from daemon.capture.audio import AudioFormatError, Resampler, decode_pcm
from daemon.capture.level import LevelMeter
from daemon.capture.ring import AudioRing
from daemon.delivery.bus import EventBus, Filter
from daemon.delivery.events import FinalEvent, LevelEvent, PartialEvent, Pong
from daemon.delivery.protocol import json_schema

SR = 16000


def test_ring_wraps_and_refuses_evicted_audio() -> None:
    ring = AudioRing(1000)
    x = np.arange(2500, dtype=np.float32)
    for i in range(0, 2500, 333):
        assert ring.write(x[i : i + 333]) == i
    assert ring.end == 2500 and ring.start == 1500
    np.testing.assert_array_equal(ring.read(1500, 2500), x[1500:2500])
    np.testing.assert_array_equal(ring.read(1990, 2010), x[1990:2010])
    with pytest.raises(IndexError):
        ring.read(1499, 1600)
    with pytest.raises(IndexError):
        ring.read(2400, 2501)
    ring.write(np.arange(5000, dtype=np.float32))  # longer than the ring: keeps the newest
    np.testing.assert_array_equal(ring.read(ring.start, ring.end), np.arange(4000, 5000, dtype=np.float32))


def test_level_meter_dbfs_and_throttle() -> None:
    t = np.arange(SR) / SR
    sine = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    meter = LevelMeter(interval=SR // 4, interval_s=0.25)
    level = meter.push(sine[: SR // 4], 0, wall=100.0)
    assert level is not None
    assert level.rms_dbfs == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.01)  # -9.03
    assert level.peak_dbfs == pytest.approx(20 * np.log10(0.5), abs=0.01)
    # faster than real time: the next quarter second of audio arrives 10 ms later and is merged, not emitted
    assert meter.push(sine[SR // 4 : SR // 2], SR // 4, wall=100.01) is None
    merged = meter.push(np.zeros(SR // 4, dtype=np.float32), SR // 2, wall=100.3)
    assert merged is not None and (merged.start, merged.stop) == (SR // 4, 3 * SR // 4)
    assert merged.rms_dbfs == pytest.approx(level.rms_dbfs - 10 * np.log10(2), abs=0.01)  # half the power


def test_decode_pcm_formats_and_errors() -> None:
    pcm = np.array([[0, 16384], [-32768, 32767]], dtype="<i2")
    out = decode_pcm(pcm.tobytes(), "s16le", 2)
    np.testing.assert_allclose(out, pcm / 32768.0)
    f = np.array([0.25, -0.5, 1.0], dtype="<f4")
    np.testing.assert_array_equal(decode_pcm(f.tobytes(), "f32le", 1)[:, 0], f)
    with pytest.raises(AudioFormatError, match="whole number"):
        decode_pcm(b"\x00\x01\x02", "s16le", 1)
    with pytest.raises(AudioFormatError, match="whole number"):
        decode_pcm(b"\x00" * 6, "s16le", 2)
    with pytest.raises(AudioFormatError, match="NaN"):
        decode_pcm(np.array([np.nan], dtype="<f4").tobytes(), "f32le", 1)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resampler_streams_a_sine(rate: int) -> None:
    t = np.arange(rate * 2) / rate
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32) * 0.5
    r = Resampler(rate, channels=2)
    blocks = [r(stereo[i : i + 1234]) for i in range(0, len(stereo), 1234)] + [r(np.zeros((0, 2), np.float32), True)]
    y = np.concatenate(blocks)
    assert abs(len(y) - 2 * SR) <= 2
    # compare with the analytic 16 kHz sine, away from the filter's edges, allowing the filter's delay
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / SR)
    mid = slice(SR // 2, SR + SR // 2)
    best = min(np.abs(y[mid] - np.roll(ref, d)[mid]).max() for d in range(-40, 41))
    assert best < 0.02


def final(stream: str, text: str = "") -> FinalEvent:
    return FinalEvent(
        stream=stream,
        id=f"{stream}/1",
        start=0.0,
        end=1.0,
        speech_end=0.5,
        text=text,
        outcome="speech" if text else "no_speech",
        reason="silence",
        wall_start=None,
        wall_end=None,
        dropped_segments=0,
        asr_ms=1.0,
        queue_ms=0.0,
    )


def level(stream: str) -> LevelEvent:
    return LevelEvent(stream=stream, start=0.0, end=0.1, rms_dbfs=-20.0, peak_dbfs=-10.0)


def partial(stream: str) -> PartialEvent:
    return PartialEvent(stream=stream, id=f"{stream}/1", start=0.0, end=0.5, text="x", revision=1)


def test_bus_sequence_numbers_and_filters() -> None:
    async def go() -> None:
        bus = EventBus()
        all_ = bus.subscribe(100)
        finals = bus.subscribe(100, Filter(streams=["kit*"], events=["transcript.final"]))
        for stream in ("kitchen", "porch", "kitchen"):
            stamped = bus.publish(final(stream))
            bus.publish(level(stream))
        assert stamped.seq == 2 and stamped.stream == "kitchen"
        got = [json.loads(await all_.get() or "") for _ in range(6)]
        assert [(e["stream"], e["type"], e["seq"]) for e in got] == [
            ("kitchen", "transcript.final", 1),
            ("kitchen", "level", 1),
            ("porch", "transcript.final", 1),
            ("porch", "level", 1),
            ("kitchen", "transcript.final", 2),
            ("kitchen", "level", 2),
        ]
        assert got[0] == json.loads(
            final("kitchen").model_copy(update={"seq": 1, "time": got[0]["time"]}).model_dump_json()
        )  # serialised once, exactly the model
        assert len(finals) == 2
        assert [json.loads(await finals.get() or "")["seq"] for _ in range(2)] == [1, 2]

    asyncio.run(go())


def test_slow_subscriber_sheds_droppable_events_first_then_overflows() -> None:
    async def go() -> None:
        bus = EventBus()
        sub = bus.subscribe(4)

        async def text() -> str | None:
            raw = await sub.get()
            return json.loads(raw).get("text") if raw else None

        bus.publish(level("a"))
        bus.publish(final("a", "one"))
        bus.publish(partial("a"))
        bus.publish(final("a", "two"))
        bus.publish(final("a", "three"))  # sheds the level
        bus.publish(level("a"))  # sheds the partial
        bus.publish(level("a"))  # only finals + this level: sheds the older level
        assert not sub.overflowed
        notice = json.loads(await sub.get() or "")
        assert notice["type"] == "dropped" and notice["counts"] == {"level": 2, "transcript.partial": 1}
        assert [await text() for _ in range(4)] == ["one", "two", "three", None]
        for i in range(3):
            bus.publish(final("a", str(i)))
        sub.send(Pong(re=1))  # replies share the client's queue and its bound
        bus.publish(final("a", "too many"))
        assert sub.overflowed  # finals and replies are never shed: the client gets disconnected instead
        assert await sub.get() is None

    asyncio.run(go())


def test_committed_schema_is_current() -> None:
    committed = Path(__file__).resolve().parents[2] / "docs" / "protocol.schema.json"
    assert json.loads(committed.read_text()) == json_schema(), (
        "regenerate: ltu-daemon schema > docs/protocol.schema.json"
    )
