"""The history store on disk (SQLite via apsw, FTS5, sqlite-vec, the real MiniLM embedder): migrations, what is
kept, search by words and by meaning, retention, restarts, and a crash or a full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw
import numpy as np
import pytest

from daemon.config import StoreConfig
from daemon.delivery.events import AlertEvent, Evidence, SceneEvent, SceneTimings, WindowEvent, WindowRef
from daemon.memory.store import SCHEMA_VERSION, RuleChange, Store, StoreError, connect
from daemon.rules import AlertRule
from ltu_as.serving.embedding import Embedder

NOW = 1_800_000_000.0

# what a household's windows said (transcript, scene), one per 10 s
SAYINGS = [
    ("the kettle is boiling in the kitchen", "a kettle whistles"),
    ("can someone take the dog out", "a dog barks twice"),
    ("the washing machine has finished", "a machine beeps three times"),
    ("", "rain on a window"),
    ("I will restart the router in the office", "keyboard typing"),
]


def window(stream: str, i: int, transcript: str, wall: float) -> WindowEvent:
    return WindowEvent(
        stream=stream,
        id=f"{stream}:w{i}",
        start=(i - 1) * 10.0,
        end=i * 10.0,
        wall_start=wall - 10,
        wall_end=wall,
        transcript=transcript,
    )


def scene(w: WindowEvent, text: str) -> SceneEvent:
    return SceneEvent(
        stream=w.stream,
        window=WindowRef(id=w.id, stream=w.stream, start=w.start, end=w.end, transcript=w.transcript),
        text=text,
        tokens=3,
        skipped=0,
        timings=SceneTimings(queue_ms=0, features_ms=0, generate_ms=0, batch=1),
    )


def fill(store: Store, stream: str = "kitchen", t0: float = NOW) -> list[WindowEvent]:
    out = []
    for i, (said, heard) in enumerate(SAYINGS, 1):
        w = window(stream, i, said, t0 + 10 * i)
        store.put(w)
        store.put(scene(w, heard))
        out.append(w)
    return out


def flushed(store: Store, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (store._queue.qsize() or store.written == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the batch in hand


def make(tmp_path: Path, embedder: object = None, **kw: object) -> Store:
    cfg = StoreConfig(path=tmp_path / "h.db", commit_interval_s=0.05, embeddings=embedder is not None, **kw)
    s = Store(cfg, embedder)  # type: ignore[arg-type]
    s.start()
    return s


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder()


def test_schema_is_migrated_and_a_newer_file_is_refused(tmp_path: Path) -> None:
    s = make(tmp_path)
    s.stop(10)
    c = connect(tmp_path / "h.db")
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == SCHEMA_VERSION
    assert c.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(StoreError, match="newer than this daemon"):
        Store(StoreConfig(path=tmp_path / "h.db"), None).open()
    with pytest.raises(StoreError, match=r"store\.path"):
        Store(StoreConfig(path=Path("/proc/nope/h.db")), None).open()


def test_windows_scenes_alerts_rules_and_numbering_survive_a_restart(tmp_path: Path) -> None:
    s = make(tmp_path)
    ws = fill(s)
    s.put(
        AlertEvent(
            stream="kitchen",
            id="kettle/kitchen/1",
            rule="kettle",
            kind="phrase",
            window=Evidence(id=ws[0].id, stream="kitchen", start=0, end=10, wall_start=None, wall_end=None),
            at=3.0,
            wall=NOW,
            evidence="the kettle is boiling",
            score=None,
            clip=None,
        )
    )
    rule = AlertRule(name="dog", kind="label", match="dog")
    s.put(RuleChange(rule, "dog"))
    s.stop(10)
    again = make(tmp_path)
    assert again.counts()["windows"] == 5 and again.counts()["alerts"] == 1
    assert again.rules() == [rule]
    assert again.last_indices("kitchen") == (5, 0) and again.last_indices("porch") == (0, 0)
    hits, mode = again.search("", streams=["kitchen"], limit=2)
    assert mode == "time" and [h.id for h in hits] == ["kitchen:w5", "kitchen:w4"]
    first = again.search("kettle", mode="text")[0][0]
    assert first.id == "kitchen:w1" and first.scene == "a kettle whistles" and first.tags == ["speech", "kettle"]
    again.put(RuleChange(None, "dog"))
    again.stop(10)
    assert Store(StoreConfig(path=tmp_path / "h.db"), None).rules() == []


def test_a_stored_rule_this_daemon_no_longer_accepts_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A regex an older daemon stored (Python syntax with a lookahead) does not stop this one from starting."""
    s = make(tmp_path)
    ok = AlertRule(name="ok", kind="phrase", match="door")
    s.put(RuleChange(ok, "ok"))
    s.stop(10)
    import apsw

    c = apsw.Connection(str(tmp_path / "h.db"))
    old = '{"name":"old","kind":"regex","match":"kettle(?= is boiling)"}'
    c.execute("INSERT INTO rules(name, rule, created) VALUES ('old', ?, 0)", (old,))
    c.close()
    with caplog.at_level("WARNING"):
        assert Store(StoreConfig(path=tmp_path / "h.db"), None).rules() == [ok]
    assert "stored alert rule 'old' not loaded" in caplog.text and "RE2" in caplog.text


def test_full_text_search_ranks_filters_by_time_and_stream_and_survives_any_query(tmp_path: Path) -> None:
    s = make(tmp_path)
    fill(s, "kitchen")
    fill(s, "garage", t0=NOW + 1000)
    flushed(s)
    hits, mode = s.search("router restart", mode="text")
    assert mode == "text" and {h.id for h in hits[:2]} == {"kitchen:w5", "garage:w5"}
    assert [h.id for h in s.search("router", mode="text", streams=["gar*"])[0]] == ["garage:w5"]
    assert [h.id for h in s.search("router", mode="text", until=NOW + 500)[0]] == ["kitchen:w5"]
    assert s.search("machines finishing", mode="text")[0][0].id.endswith(":w3")  # porter stemming
    for nasty in ('"', "AND OR NOT", "kettle*", "(", "NEAR(a b)", "x:y", "'; DROP TABLE windows; --"):
        s.search(nasty, mode="text")  # user text can never be an FTS5 syntax error
    assert s.counts()["windows"] == 10
    s.stop(10)


def test_vector_search_finds_a_paraphrase_with_the_real_embedder(tmp_path: Path, minilm: Embedder) -> None:
    s = make(tmp_path, embedder=lambda: minilm)
    fill(s)
    flushed(s)
    # no word in common with "the kettle is boiling in the kitchen" / "a kettle whistles"
    hits, mode = s.search("water getting hot for tea", mode="vector", limit=3)
    assert mode == "vector" and hits[0].id == "kitchen:w1"
    hits, _ = s.search("my pet needs a walk", mode="vector", limit=3)
    assert hits[0].id == "kitchen:w2"
    # the ranking is the cosine similarity, computed independently here
    texts = [f'{heard}. said: "{said}"' if said else heard for said, heard in SAYINGS]
    sims = minilm(texts) @ minilm(["my pet needs a walk"])[0]
    assert [h.id for h in hits] == [f"kitchen:w{i + 1}" for i in np.argsort(-sims)[:3]]
    combined, mode = s.search("dog walk", limit=2)
    assert mode == "combined" and combined[0].id == "kitchen:w2"
    # time limits apply to the vector ranking too (w1 ends at NOW + 10, w5 at NOW + 50)
    bounded, _ = s.search("dog walk", mode="vector", since=NOW + 15, until=NOW + 45, limit=5)
    assert sorted(h.id for h in bounded) == ["kitchen:w2", "kitchen:w3", "kitchen:w4"]
    s.stop(10)


def test_retention_by_age_and_size(tmp_path: Path) -> None:
    s = make(tmp_path, retention_days=1.0)
    fill(s, t0=time.time() - 3 * 86400)  # three days old
    recent = fill(s, "porch", t0=time.time())
    flushed(s)
    s._retention()
    assert s.counts()["windows"] == 5 and s.search("", streams=["kitchen"])[0] == []
    for i in range(6, 400):  # grow past a tiny size cap: the oldest windows go first
        s.put(window("porch", i, "x " * 200, time.time() + i))
    flushed(s)
    full = s.size_bytes()
    cap = full * 0.6
    s.config = s.config.model_copy(update={"max_mb": cap / 2**20})
    s._retention()
    assert s.size_bytes() <= cap
    left = s.search("", streams=["porch"], limit=1000)[0]
    assert 0 < len(left) < 399 and recent[0].id not in {h.id for h in left} and "porch:w399" in {h.id for h in left}
    s.stop(10)


def test_a_killed_writer_leaves_a_sound_file_missing_at_most_the_last_commit(tmp_path: Path) -> None:
    """kill -9 while writing: the file passes integrity_check and holds every window committed more than a
    commit interval before the kill."""
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from daemon.config import StoreConfig
from daemon.delivery.events import WindowEvent
from daemon.memory.store import Store
s = Store(StoreConfig(path=Path({str(tmp_path / "k.db")!r}), commit_interval_s=0.2, embeddings=False), None)
s.start()
i = 0
while True:
    i += 1
    s.put(WindowEvent(stream="k", id=f"k:w{{i}}", start=0, end=10, wall_start=None, wall_end=time.time(),
                      transcript="words " * 50))
    if i % 100 == 0:
        print(i, time.time(), flush=True)
    time.sleep(0.001)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    lines = []
    assert proc.stdout is not None
    while len(lines) < 20:
        lines.append(proc.stdout.readline().split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    c = apsw.Connection(str(tmp_path / "k.db"))
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    stored = c.execute("SELECT max(idx) FROM windows").fetchall()[0][0]
    sent_a_second_before = max(int(n) for n, t in lines if float(t) < killed - 1.0)
    assert stored >= sent_a_second_before


def test_a_full_disk_degrades_and_recovers_without_losing_the_queue(tmp_path: Path) -> None:
    """A size-capped file system (tmpfs when this machine lets us mount one; else SQLite's own page cap)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode
        == 0
    )
    try:
        s = Store(StoreConfig(path=mnt / "h.db", commit_interval_s=0.05, embeddings=False, queue=100000), None)
        s.start()
        if not mounted:
            s._write.execute("PRAGMA max_page_count = 300")  # type: ignore[union-attr]
        i = 0
        deadline = time.monotonic() + 60
        while s.degraded is None and time.monotonic() < deadline:
            i += 1
            s.put(window("k", i, "filler " * 300, NOW + i))
            if i % 50 == 0:
                time.sleep(0.05)
        assert s.degraded is not None and ("Full" in s.degraded or "IOError" in s.degraded), s.degraded
        queued = s.stats()["queue"]
        assert s.dropped == 0
        # space comes back (retention, or the operator): the kept batch and the queue are written
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        else:
            s._write.execute("PRAGMA max_page_count = 1000000")  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while (s.degraded is not None or s._queue.qsize()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.degraded is None and queued >= 0
        s.stop(10)
        c = apsw.Connection(str(mnt / "h.db"))
        assert c.execute("SELECT count(*) FROM windows").fetchall()[0][0] == i
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        c.close()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_stats_and_json_tags(tmp_path: Path) -> None:
    s = make(tmp_path)
    fill(s)
    flushed(s)
    st = s.stats()
    assert st["degraded"] is None and st["dropped"] == 0 and st["written"] >= 10 and not st["embeddings"]
    assert json.loads(json.dumps(st))  # what /healthz shows
    s.stop(10)


def test_windows_after_a_watermark_by_storage_order_not_wall_time(tmp_path: Path) -> None:
    """What digests read: windows stored since the last digest, even one whose wall time is older (written late)."""
    s = make(tmp_path)
    fill(s)
    flushed(s)
    mark = s.last_rowid()
    assert s.windows_after("kitchen", mark, 10) == ([], mark)
    late = window("kitchen", 6, "the dog is back", NOW - 3600)  # heard an hour earlier, stored only now
    s.put(late)
    s.put(window("porch", 1, "hello", NOW + 100))
    flushed(s)
    hits, mark2 = s.windows_after("kitchen", mark, 10)
    assert [h.id for h in hits] == ["kitchen:w6"] and mark2 == mark + 2
    first, _ = s.windows_after("kitchen", 0, 2)  # the newest `limit`, oldest first
    assert [h.id for h in first] == ["kitchen:w5", "kitchen:w6"]
    s.stop(10)
