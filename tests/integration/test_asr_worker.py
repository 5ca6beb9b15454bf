"""The ASR worker with real faster-whisper on the converted tiny model: finals first and never dropped, partials
latest-wins, never a partial after its final."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from daemon.capture.vad import SpeechEnd
from daemon.config import AsrConfig
from daemon.reply import Reply
from daemon.speech.asr import AsrJob, AsrResult, AsrWorker

pytestmark = pytest.mark.integration


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in its own thread: where the worker's replies land."""
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.close()


def job(
    stream: str, index: int, seconds: float, final: bool, rng: np.random.Generator, reply: Reply[AsrResult]
) -> AsrJob:
    audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    end = SpeechEnd(index, 0, len(audio), len(audio), "silence") if final else None
    return AsrJob(stream, index, 0, len(audio), audio, end, time.monotonic(), reply)


def test_priorities_and_latest_wins(tiny, loop: asyncio.AbstractEventLoop) -> None:
    results: list[AsrResult] = []
    done = threading.Event()

    def on_result(r: AsrResult) -> None:  # on the loop
        results.append(r)
        if r.job.stream == "a" and r.job.index == 3 and r.job.final:
            done.set()

    reply = Reply(loop, on_result)
    worker = AsrWorker(
        AsrConfig(
            model=str(tiny.whisper_ct2),
            device="cpu",
            compute_type="float32",
            beam_size=1,
            max_new_tokens=24,
            final_queue=2,
        )
    )
    worker.start()
    assert worker.ready.wait(60) and worker.error is None
    rng = np.random.default_rng(0)
    # Keep the worker busy, then queue work behind it.
    assert worker.offer_final(job("b", 1, 20, True, rng, reply))
    time.sleep(0.05)
    worker.offer_partial(job("a", 2, 1, False, rng, reply))  # superseded by its final below: never decoded
    worker.offer_partial(job("a", 3, 1, False, rng, reply))  # replaced by the next partial of stream a
    worker.offer_partial(job("c", 1, 1, False, rng, reply))
    assert worker.offer_final(job("a", 2, 2, True, rng, reply))
    assert worker.offer_final(job("d", 1, 1, True, rng, reply))
    assert not worker.offer_final(job("d", 2, 1, True, rng, reply))  # final_queue=2 is full: refused, not dropped
    second = job("a", 3, 1.5, False, rng, reply)
    worker.offer_partial(second)
    while not worker.offer_final(job("a", 3, 2, True, rng, reply)):
        time.sleep(0.01)
    assert done.wait(60)
    worker.stop(10)
    order = [(r.job.stream, r.job.index, r.job.final) for r in results]
    assert order[:3] == [("b", 1, True), ("a", 2, True), ("d", 1, True)]  # finals first, in order
    assert ("a", 2, False) not in order
    assert ("a", 3, True) in order
    # a partial of a/3 may have run before its final was queued, and then only the newest one
    partials_a3 = [r for r in results if r.job.stream == "a" and r.job.index == 3 and not r.job.final]
    assert all(r.job is second for r in partials_a3)
    assert order.index(("a", 3, True)) > max((order.index(("a", 3, False)),) if partials_a3 else (0,))
    assert all(r.decode_s > 0 and r.wait_s >= 0 for r in results)


def test_missing_model_is_reported(tmp_path) -> None:
    worker = AsrWorker(AsrConfig(model=str(tmp_path / "nope"), device="cpu"))
    worker.start()
    assert worker.ready.wait(60)
    assert worker.error is not None and "nope" in str(worker.error)
