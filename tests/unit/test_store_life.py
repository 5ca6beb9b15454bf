"""The history store over its life: a file written by every earlier schema version opens and migrates (with its
rows readable and searchable); export to JSON Lines and import round-trip, skip what is already there, filter by
time as an independent count says, and refuse malformed input by line; the online backup is consistent while a
writer keeps writing."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from test_store import NOW, SAYINGS, fill, flushed, make, window

from daemon.config import StoreConfig
from daemon.memory import archive
from daemon.memory.schema import MIGRATIONS, SCHEMA_VERSION, StoreError, connect, query
from daemon.memory.store import Store

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"


def written_at(tmp_path: Path, version: int) -> Path:
    """A store file as a daemon at schema `version` left it: its migrations, then the rows it wrote."""
    path = tmp_path / f"v{version}.db"
    conn = connect(path)
    if version:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    for i in range(version):
        with conn:
            conn.execute(MIGRATIONS[i])
            conn.execute(f"PRAGMA user_version = {i + 1}")
    if version:
        with conn:
            conn.execute((FIXTURES / f"v{version}.sql").read_text())
    conn.close()
    return path


def test_every_schema_version_has_the_rows_its_daemon_wrote() -> None:
    assert sorted(p.name for p in FIXTURES.glob("v*.sql")) == [f"v{v}.sql" for v in range(1, SCHEMA_VERSION + 1)]


@pytest.mark.parametrize("version", range(SCHEMA_VERSION + 1))
def test_a_store_from_every_earlier_version_opens_migrates_and_is_searchable(tmp_path: Path, version: int) -> None:
    path = written_at(tmp_path, version)
    s = Store(StoreConfig(path=path, embeddings=False), None)
    s.open()
    try:
        assert int(query(connect(path), "PRAGMA user_version")[0][0]) == SCHEMA_VERSION
        counts = s.counts()
        if version == 0:
            assert set(counts.values()) == {0}
            return
        sql = (FIXTURES / f"v{version}.sql").read_text()
        for table, n in counts.items():  # every row the old daemon wrote is still there
            assert n == len(re.findall(rf"^INSERT INTO {table}\(", sql, re.M)), table
        hits, _ = s.search("washing machine finished", streams=["kitchen"])
        assert hits and hits[0].id == "kitchen:w3"
        assert s.last_indices("porch") == (5, 0) and s.last_indices("kitchen") == (5, 1)
        assert s.alert_counts() == {("kettle", "kitchen"): 3}
        assert [r.name for r in s.rules()] == ["dog"]
    finally:
        s.stop()


def exported(path: Path, **kw: float | None) -> list[dict[str, object]]:
    conn = connect(path)
    try:
        return list(archive.export_rows(conn, **kw))
    finally:
        conn.close()


def test_export_import_round_trips_skips_what_is_there_and_filters_by_time(tmp_path: Path) -> None:
    s = make(tmp_path)
    fill(s)
    flushed(s)
    middle = time.time()
    time.sleep(0.05)
    fill(s, "porch", NOW + 100)
    flushed(s)
    s.stop(10)
    rows = exported(tmp_path / "h.db")
    header, body = rows[0], rows[1:]
    assert header["format"] == "ltu-daemon-store" and header["schema"] == SCHEMA_VERSION
    assert sum(r["table"] == "windows" for r in body) == 2 * len(SAYINGS)

    fresh = Store(StoreConfig(path=tmp_path / "copy.db", embeddings=False), None)
    fresh.open()
    lines = [json.dumps(r) for r in rows]
    first = fresh.import_export(lines)
    again = fresh.import_export(lines)
    hits, _ = fresh.search("restart the router")
    fresh.stop()
    assert [h.id for h in hits][:1] == ["kitchen:w5"]
    assert first.added["windows"] == 2 * len(SAYINGS) and not first.skipped
    assert not again.added and again.skipped["windows"] == 2 * len(SAYINGS)
    copy = exported(tmp_path / "copy.db")
    assert copy[1:] == body  # the same rows, columns and order

    # --since/--until against an independent count of the full export by `created`
    since = exported(tmp_path / "h.db", since=middle)[1:]
    until = exported(tmp_path / "h.db", until=middle)[1:]
    assert since == [r for r in body if float(r["created"]) >= middle]  # type: ignore[arg-type]
    assert until == [r for r in body if float(r["created"]) < middle]  # type: ignore[arg-type]
    assert {r["stream"] for r in since} == {"porch"} and {r["stream"] for r in until} == {"kitchen"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"format": "something else"}'], "line 1: not an ltu-daemon store export"),
        ([json.dumps({"format": "ltu-daemon-store", "schema": SCHEMA_VERSION + 1})], "newer than this daemon's"),
        (["HEADER", "{not json"], "line 2: not JSON"),
        (["HEADER", '{"table": "passwords", "x": 1}'], "line 2: unknown table 'passwords'"),
        (["HEADER", "", '{"table": "gaps", "stream": "a", "evil": 1}'], "line 3: gaps has no column(s) evil"),
        (["HEADER", '{"table": "gaps", "stream": "a"}'], "line 2: a gaps row the store refuses: NOT NULL"),
        (["HEADER", "[1, 2]"], "line 2: expected an object, got list"),
    ],
)
def test_a_malformed_import_names_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    header = json.dumps({"format": "ltu-daemon-store", "schema": SCHEMA_VERSION})
    s = Store(StoreConfig(path=tmp_path / "h.db", embeddings=False), None)
    s.open()
    try:
        with pytest.raises(StoreError, match=re.escape(message) if "NOT NULL" not in message else message):
            s.import_export([header if x == "HEADER" else x for x in lines])
        assert set(s.counts().values()) == {0}
    finally:
        s.stop()


def test_time_arguments() -> None:
    assert archive.parse_time("1800000000") == 1800000000.0
    assert archive.parse_time("2026-12-07T18:30:00+00:00") == 1796668200.0
    with pytest.raises(ValueError, match="Unix seconds or ISO 8601"):
        archive.parse_time("yesterday")


def test_the_online_backup_is_consistent_while_a_writer_writes(tmp_path: Path) -> None:
    s = make(tmp_path)
    fill(s)
    flushed(s)
    stop = threading.Event()

    def keep_writing() -> None:
        i = 100
        while not stop.is_set():
            s.put(window("garage", i, f"the garage door moved {i} times", NOW + i))
            i += 1
            time.sleep(0.002)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.3)
        pages = archive.backup(tmp_path / "h.db", tmp_path / "backup.db")
    finally:
        stop.set()
        writer.join()
    assert pages > 0
    with pytest.raises(StoreError, match="exists"):
        archive.backup(tmp_path / "h.db", tmp_path / "backup.db")
    flushed(s)
    s.stop(10)
    b = Store(StoreConfig(path=tmp_path / "backup.db", embeddings=False), None)
    b.open()
    live = Store(StoreConfig(path=tmp_path / "h.db", embeddings=False), None)
    live.open()
    try:
        copied, now = b.counts(), live.counts()
        assert len(SAYINGS) < copied["windows"] <= now["windows"]  # some of the writes of the running writer
        # one consistent state: the garage windows in the copy are a prefix of those written, with no hole
        idx = [
            int(r[0])
            for r in query(
                connect(tmp_path / "backup.db"), "SELECT idx FROM windows WHERE stream = 'garage' ORDER BY idx"
            )
        ]
        assert idx == list(range(100, 100 + len(idx)))
    finally:
        b.stop()
        live.stop()


def test_the_timeline_folds_levels_and_orders_marks(tmp_path: Path) -> None:
    import math

    s = Store(StoreConfig(path=written_at(tmp_path, 2), embeddings=False), None)
    s.open()
    try:
        (kitchen,) = s.timeline(NOW, NOW + 30, ["kitch*"], buckets=3)
        assert kitchen.stream == "kitchen"
        assert kitchen.rms_dbfs == [-60.0, -26.99, -60.0] and kitchen.peak_dbfs == [-50.0, -6.0, -50.0]
        (fine,) = s.timeline(NOW, NOW + 30, ["kitchen"], buckets=10)  # 3 s buckets: each 10 s row lands in one
        assert [i for i, x in enumerate(fine.rms_dbfs) if x is not None] == [0, 3, 6]
        (early,) = s.timeline(NOW - 10, NOW + 30, ["kitchen"], buckets=10)
        assert early.rms_dbfs[:2] == [None, None] and early.rms_dbfs[2] == -60.0  # 4 s buckets: none before NOW
        # one bucket over all three rows: the mean power, computed here independently
        (one,) = s.timeline(NOW, NOW + 30, ["kitchen"], buckets=1)
        mean = sum(10 ** (x / 10) for x in (-60.0, -26.99, -60.0)) / 3
        assert one.rms_dbfs == [round(10 * math.log10(mean), 2)] and one.peak_dbfs == [-6.0]

        (marks,) = s.timeline(NOW, NOW + 60, ["kitchen"], buckets=10)
        kinds = [(m.kind, m.id) for m in marks.marks]
        assert kinds[:3] == [("speech", "kitchen/1"), ("alert", "kettle/kitchen/3"), ("scene", "kitchen:w1")]
        assert [m.at for m in marks.marks] == sorted(m.at for m in marks.marks)
        alert = marks.marks[1]
        assert alert.text == "kettle: the kettle is boiling" and alert.end is not None and alert.clip is None
        (few,) = s.timeline(NOW, NOW + 60, ["kitchen"], buckets=10, max_marks=2)
        assert few.truncated and [m.id for m in few.marks] == [m.id for m in marks.marks[-2:]]
        assert [t.stream for t in s.timeline(NOW + 100, NOW + 200, ["*"], buckets=10)] == ["porch"]
        assert s.timeline(NOW + 5000, NOW + 6000, ["*"], buckets=10) == []
    finally:
        s.stop()
