"""Windows, the feature cache and the scheduler: pure parts of the daemon's understanding path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from daemon.clock import WINDOW_SAMPLES
from daemon.understanding.cache import FeatureCache
from daemon.understanding.scheduler import Busy, Job, QuestionJob, SceneJob, Scheduler
from daemon.understanding.windows import StreamWindows, Window, Windower

SR = 16000


def test_windows_cut_every_hop_with_overlapping_transcript() -> None:
    w = Windower("k", hop=5 * SR, settle_max=30 * SR, margin=SR // 2)
    w.add_final(2 * SR, 4 * SR, "one")
    w.add_final(9 * SR, 11 * SR, "two")  # straddles the first window's end
    w.add_final(14 * SR, 15 * SR, "")  # filtered to nothing: not in any transcript
    w.add_final(16 * SR, 18 * SR, "three")
    assert w.ready(10 * SR, None) == []  # the VAD may still confirm speech near the end: wait the margin
    out = w.ready(20 * SR + SR // 2, None)
    assert out == [
        Window("k", 1, 0, WINDOW_SAMPLES, "one two"),
        Window("k", 2, 5 * SR, 15 * SR, "two"),
        Window("k", 3, 10 * SR, 20 * SR, "two three"),
    ]
    assert out[0].id == "k:w1"


def test_window_waits_for_unresolved_utterance_then_settles() -> None:
    w = Windower("k", hop=10 * SR, settle_max=5 * SR, margin=0)
    assert w.ready(12 * SR, unresolved_start=9 * SR) == []  # a final overlapping [0, 10) is still to come
    w.add_final(9 * SR, 13 * SR, "late words")
    assert [x.transcript for x in w.ready(13 * SR, None)] == ["late words"]
    # an utterance that never ends does not hold the next window past settle_max
    assert w.ready(24 * SR, unresolved_start=19 * SR) == []
    assert [x.index for x in w.ready(25 * SR, unresolved_start=19 * SR)] == [2]


def test_feature_cache_is_lru_bounded_by_count_and_bytes() -> None:
    c = FeatureCache(max_entries=3, max_bytes=3 * 400)

    def t() -> torch.Tensor:
        return torch.zeros(100)  # 400 bytes

    for k in "abc":
        c.put(k, t())
    assert c.get("a") is not None  # a is now the most recent
    c.put("d", t())
    assert c.get("b") is None and len(c) == 3 and c.bytes == 1200
    c.put("e", torch.zeros(200))  # 800 bytes: evicts until it fits
    assert len(c) == 2 and c.bytes == 1200 and c.get("e") is not None and c.get("d") is not None


def window(stream: str, i: int) -> Window:
    return Window(stream, i, (i - 1) * 10 * SR, i * 10 * SR, "")


def nowhere(_: object) -> None:
    raise AssertionError("the scheduler never replies")


def job(
    kind: str, stream: str = "k", i: int = 1, deadline: float = 60.0, options: object = "greedy", tag: object = "q"
) -> Job:
    """A job without audio; `options` only needs to compare equal (the scheduler batches on it)."""
    w, d = window(stream, i), time.monotonic() + deadline
    if kind == "scene":
        return SceneJob(window=w, audio=None, deadline=d, reply=nowhere)  # type: ignore[arg-type]
    return QuestionJob(
        window=w,
        audio=None,
        deadline=d,
        question="?",
        options=options,  # type: ignore[arg-type]
        owner=None,
        tag=tag,
        reply=nowhere,
    )  # type: ignore[arg-type]


def test_questions_go_before_scenes_and_scenes_coalesce() -> None:
    s = Scheduler(max_queue=10, max_batch=8, retry_after_s=1.5)
    for i in range(1, 5):
        s.submit(job("scene", "k", i))  # k fell behind: only the newest waits
    s.submit(job("scene", "p", 1))
    q = job("question", "k", 2)
    s.submit(q)
    assert s.pop(0) == [q]
    scenes = s.pop(0)
    assert scenes is not None and [(j.window.stream, j.window.index, j.skipped) for j in scenes] == [
        ("k", 4, 3),
        ("p", 1, 0),
    ]
    assert s.skipped_scenes == 3
    assert s.pop(0) == []


def test_questions_on_one_window_with_same_options_are_batched() -> None:
    s = Scheduler(max_queue=10, max_batch=3, retry_after_s=1)
    a = [job("question", "k", 1, options="greedy", tag=i) for i in range(4)]
    other = job("question", "k", 2, options="greedy", tag="w2")
    sampled = job("question", "k", 1, options="sampled", tag="s")
    for j in (a[0], other, a[1], sampled, a[2], a[3]):
        s.submit(j)
    assert s.pop(0) == a[:3]  # capped at max_batch, other window and other options left alone
    assert s.pop(0) == [other]
    assert s.pop(0) == [sampled]
    assert s.pop(0) == [a[3]]


def test_full_queue_is_busy_not_growing() -> None:
    s = Scheduler(max_queue=2, max_batch=1, retry_after_s=2.5)
    s.submit(job("question"))
    s.submit(job("question"))
    with pytest.raises(Busy) as e:
        s.submit(job("question"))
    assert e.value.retry_after_s == 2.5 and "2 questions waiting" in str(e.value)
    s.submit(job("scene"))  # scenes are bounded by coalescing instead
    assert s.depth == {"questions": 2, "checks": 0, "scenes": 1, "digests": 0}


def test_deadlines_and_cancellation() -> None:
    s = Scheduler(max_queue=10, max_batch=8, retry_after_s=1)
    late = job("question", tag="late", deadline=-1)
    gone = job("question", tag="gone", i=2)
    keep = job("question", tag="keep", i=3)
    old_scene = job("scene", deadline=-1)
    for j in (late, gone, keep, old_scene):
        s.submit(j)
    assert s.cancel([gone]) == 1 and s.cancel([gone]) == 0
    assert s.pop(0) == []  # first, the worker is woken to report what ended without running
    assert s.expired == [late, gone, old_scene]  # deadline_exceeded, cancelled, dropped scene
    assert s.pop(0) == [keep]
    # a cancelled question frees its place in the bound
    s2 = Scheduler(max_queue=1, max_batch=1, retry_after_s=1)
    first = job("question")
    s2.submit(first)
    s2.cancel([first])  # type: ignore[list-item]
    s2.submit(job("question"))


def test_pop_blocks_until_work_or_close() -> None:
    s = Scheduler(max_queue=10, max_batch=8, retry_after_s=1)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(s.pop()), daemon=True)
    t.start()
    time.sleep(0.05)
    q = job("question")
    s.submit(q)
    t.join(5)
    assert got == [[q]]
    t = threading.Thread(target=lambda: got.append(s.pop()), daemon=True)
    t.start()
    s.close()
    t.join(5)
    assert got[-1] is None


def test_pop_takes_at_most_limit_jobs_and_leaves_the_rest_waiting() -> None:
    """The worker passes the engine's room as `limit`; what does not fit stays in the scheduler (and counts
    toward its bound), scenes still coalescing per stream."""
    s = Scheduler(max_queue=10, max_batch=8, retry_after_s=1)
    for stream in "abc":
        s.submit(job("scene", stream, 1))
    first = s.pop(0, limit=2) or []
    assert [j.window.stream for j in first] == ["a", "b"]
    s.submit(job("scene", "c", 2))  # the waiting one of stream c is replaced, not queued behind
    assert [(j.window.stream, j.window.index) for j in s.pop(0, limit=2) or []] == [("c", 2)]
    assert s.skipped_scenes == 1


def test_stream_windows_find_by_id_time_and_latest_and_forget_the_oldest() -> None:
    audio = np.arange(35 * SR, dtype=np.float32)

    def read(a: int, b: int) -> np.ndarray:
        if a < 15 * SR:  # as if the ring had overwritten the start
            raise IndexError("gone")
        return audio[a:b]

    sw = StreamWindows("k", keep=2, read_audio=read)
    for i in (1, 2, 3):
        sw.add(window("k", i))
    assert len(sw) == 2 and sw.get("k:w1") is None and sw.latest() == window("k", 3)
    assert sw.at(12.5) == window("k", 2) and sw.at(5.0) is None and sw.at(30.0) is None
    assert sw.audio(window("k", 2)) is None  # overwritten
    got = sw.audio(window("k", 3))
    assert got is not None and got[0] == 20 * SR and len(got) == WINDOW_SAMPLES
    ref = window("k", 3).ref()
    assert (ref.id, ref.start, ref.end) == ("k:w3", 20.0, 30.0)
