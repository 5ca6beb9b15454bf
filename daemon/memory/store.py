"""The history store: what the daemon heard, kept in one SQLite file (WAL) that survives restarts.

- Tables: windows (stream-clock and wall-clock range, transcript, scene, tags), finals, answers, alerts, gaps,
  digests, and the alert rules added at run time. Full-text search (FTS5, porter stemming) over each window's
  transcript and scene; all-MiniLM-L6-v2 embeddings of the same text in a `sqlite-vec` table for search by meaning.
  The standard library's `sqlite3` cannot load extensions on many Pythons, so the store uses `apsw` (which bundles
  a current SQLite with FTS5).
- One writer thread owns the write connection. The event loop hands it operations through a bounded queue of
  `store.queue` (overflow policy: the operation is dropped and counted, and the store reports itself degraded;
  nothing on the loop ever waits for the disk). The writer commits at least every `store.commit_interval_s`, so a
  crash loses at most that much.
- A full disk or an I/O error keeps the batch and retries every few seconds; meanwhile the store is *degraded*
  (reported in `/healthz` and the metrics), and the daemon goes on serving.
- Retention by age (`retention_days`) and size (`max_mb`, oldest windows first), enforced by the writer in the
  background. Audio clips of alerts (opt-in) have their own retention.
- Schema versions are migrations applied in order (`PRAGMA user_version`).
- Readers (search, digests, history questions) open their own connection and run in worker threads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import queue
import re
import threading
import time
import wave
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import apsw
import numpy as np

from ..config import StoreConfig
from ..delivery.events import (
    AlertClearedEvent,
    AlertEvent,
    AnswerDone,
    DigestEvent,
    FinalEvent,
    GapEvent,
    HistoryHit,
    LevelEvent,
    SceneEvent,
    TimelineStream,
    WindowEvent,
)
from ..rules import AlertRule
from .archive import ImportResult, import_rows
from .schema import EMBED_DIM, SCHEMA_VERSION, StoreError, connect, migrate
from .schema import query as _q
from .timeline import LevelBuckets, LevelRow, read_timeline

__all__ = ["EMBED_DIM", "SCHEMA_VERSION", "AnswerRecord", "Clip", "RuleChange", "Store", "StoreError", "connect"]

log = logging.getLogger(__name__)

RETRY_S = 3.0  # how often a failing write (full disk) is retried
RETENTION_EVERY_S = 60.0
DAY_S = 86400  # the vector index is partitioned by day (UTC) of a window's end: time-bounded searches scan less

_OLD = ("finals", "answers", "alerts", "gaps", "digests", "levels")  # besides windows, what retention deletes by age


@dataclass(frozen=True)
class Clip:
    """Audio kept with an alert: `samples` [n] float32 on the stream clock, written as `name` (16-bit WAV)."""

    alert_id: str
    name: str
    samples: np.ndarray
    rate: int


@dataclass(frozen=True)
class RuleChange:
    rule: AlertRule | None  # None: remove
    name: str


@dataclass(frozen=True)
class AnswerRecord:
    question: str
    done: AnswerDone


Op = (
    WindowEvent
    | SceneEvent
    | FinalEvent
    | GapEvent
    | AlertEvent
    | AlertClearedEvent
    | DigestEvent
    | AnswerRecord
    | Clip
    | RuleChange
    | LevelRow
)
_STOP = object()
_RETAIN = object()  # a reload changed the retention limits: enforce them now


def _fts_query(text: str) -> str | None:
    """User words as an FTS5 query that cannot be a syntax error: each word quoted, any of them may match."""
    words = re.findall(r"\w+", text.lower())
    return " OR ".join(f'"{w}"' for w in words) if words else None


def _window_index(window_id: str) -> int:
    return int(window_id.rsplit(":w", 1)[1])


class Store:
    """See the module docstring. `embedder` builds the sentence embedder (in the writer thread, lazily); None
    turns vector search off."""

    def __init__(self, config: StoreConfig, embedder: Callable[[], Callable[[list[str]], np.ndarray]] | None) -> None:
        self.config = config
        self.path = config.path
        self.clips_dir = config.clips_dir or self.path.parent / "clips"
        self._make_embedder = embedder if config.embeddings else None
        self._embed: Callable[[list[str]], np.ndarray] | None = None
        self._embed_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue)
        self._thread = threading.Thread(target=self._run, name="store", daemon=True)
        self._write: apsw.Connection | None = None
        self._read: apsw.Connection | None = None
        self._read_lock = threading.Lock()
        self.degraded: str | None = None  # why writes fail now, or None
        self.dropped = 0  # operations lost to a full queue
        self._levels = LevelBuckets()
        self.written = 0
        self.last_commit = 0.0

    # --- lifecycle ---

    def open(self) -> None:
        """Create or open the file and migrate it (call before `start`; raises `StoreError` with what to do)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a crash of this process
            migrate(conn)
        except (OSError, apsw.Error) as e:
            raise StoreError(
                f"cannot open the history store {self.path}: {e}. Set store.path to a writable file, or "
                "store.enabled = false"
            ) from e
        self._write = conn
        self._read = connect(self.path)

    def import_export(self, lines: Iterable[str]) -> ImportResult:
        """Add the rows of an export (`archive.import_rows`) and build the new windows' vectors. Call after `open`
        and before `start` (the command line's `store import`): the writer thread is not running yet."""
        assert self._write is not None and not self._thread.is_alive(), "import into an opened store, not started"
        result = import_rows(self._write, lines)
        for i in range(0, len(ids := sorted(result.windows)), 256):  # in batches: the embedder's memory stays small
            with self._write:
                self._embed_rows(self._write, set(ids[i : i + 256]))
        return result

    def start(self) -> None:
        if self._write is None:
            self.open()
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Write what is queued (with the level buckets still open), then close."""
        for row in self._levels.flush():
            self.put(row)
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        for conn in (self._read, self._write):
            if conn is not None and not self._thread.is_alive():
                with contextlib.suppress(apsw.Error):
                    conn.close()

    def set_retention(self, retention_days: float, max_mb: float, clip_retention_days: float) -> None:
        """New retention limits (a reload), enforced by the writer at once and from then on."""
        self.config = self.config.model_copy(
            update={"retention_days": retention_days, "max_mb": max_mb, "clip_retention_days": clip_retention_days}
        )  # one reference swap: the writer reads the limits from `config` each time
        with contextlib.suppress(queue.Full):  # full: the writer is busy and enforces the limits within a minute
            self._queue.put_nowait(_RETAIN)

    # --- writes (any thread; never blocks) ---

    def put(self, op: Op) -> None:
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("history store queue full (%d): %d operations dropped", self.config.queue, self.dropped)

    def record(self, event: object) -> None:
        """A bus tap: keep the stream events the store holds (others are ignored)."""
        if isinstance(
            event, WindowEvent | SceneEvent | FinalEvent | GapEvent | AlertEvent | AlertClearedEvent | DigestEvent
        ):
            self.put(event)
        elif isinstance(event, LevelEvent):  # folded into 10 s buckets here: one write per stream per bucket
            row = self._levels.feed(event)
            if row is not None:
                self.put(row)

    # --- the writer thread ---

    def _run(self) -> None:
        pending: list[object] = []
        next_commit = time.monotonic() + self.config.commit_interval_s
        next_retention = time.monotonic()
        stop = False
        while not stop:
            wait = max(0.0, next_commit - time.monotonic()) if pending else RETENTION_EVERY_S
            try:
                op = self._queue.get(timeout=wait)
            except queue.Empty:
                op = None
            if op is _STOP:
                stop = True
            elif op is _RETAIN:
                next_retention = time.monotonic()
            elif op is not None:
                pending.append(op)
                while len(pending) < 1000:  # take what is already queued: one transaction for all of it
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    if nxt is _RETAIN:
                        next_retention = time.monotonic()
                        continue
                    pending.append(nxt)
            now = time.monotonic()
            if pending and (now >= next_commit or stop or len(pending) >= 1000):
                if self._flush(pending):
                    pending = []
                    next_commit = now + self.config.commit_interval_s
                elif stop:
                    log.error("history store: %d operations not written at shutdown (%s)", len(pending), self.degraded)
                else:
                    next_commit = now + RETRY_S
                    if len(pending) > self.config.queue:  # bounded while the disk is full: the oldest go first
                        self.dropped += len(pending) - self.config.queue
                        del pending[: len(pending) - self.config.queue]
            if now >= next_retention and not self.degraded:
                self._retention()
                next_retention = now + RETENTION_EVERY_S
        if self._write is not None:
            with contextlib.suppress(apsw.Error):
                self._write.close()

    def _embedder(self) -> Callable[[list[str]], np.ndarray] | None:
        """The sentence embedder, built on first use by whichever thread needs it first (the writer, a search)."""
        with self._embed_lock:
            if self._make_embedder is not None and self._embed is None:
                try:
                    self._embed = self._make_embedder()
                except Exception as e:  # a missing optional model must not stop the store: text search goes on
                    log.error("history store: no sentence embeddings (%s); search falls back to full text", e)
                    self._make_embedder = None
            return self._embed

    def _flush(self, ops: list[object]) -> bool:
        """Apply `ops` in one transaction, then embed the windows whose text changed (after the commit: computing
        embeddings, or loading the model the first time, never holds the rows back). False (and degraded) when
        the disk refused them."""
        assert self._write is not None
        conn = self._write
        dirty: set[int] = set()
        try:
            with conn:
                for op in ops:
                    self._apply(conn, op, dirty)
        except (apsw.FullError, apsw.IOError, apsw.CantOpenError, apsw.ReadOnlyError, OSError) as e:
            if self.degraded is None:
                log.error(
                    "history store degraded: %s (retrying every %.0f s; events are kept in memory within "
                    "store.queue, the daemon goes on)",
                    e,
                    RETRY_S,
                )
            self.degraded = f"{type(e).__name__}: {e}"
            return False
        if self.degraded is not None:
            log.info("history store writes again (%s is resolved)", self.degraded)
            self.degraded = None
        self.written += len(ops)
        self.last_commit = time.time()
        try:
            with conn:
                self._embed_rows(conn, dirty)
        except (apsw.Error, OSError) as e:  # the rows are kept; only search by meaning misses them
            log.warning("history store: embeddings of %d windows not written: %s", len(dirty), e)
        return True

    def _apply(self, conn: apsw.Connection, op: object, dirty: set[int]) -> None:
        now = time.time()
        if isinstance(op, WindowEvent):
            tags = ["speech"] if op.transcript else []
            conn.execute(
                "INSERT INTO windows(id, stream, idx, start, end, wall_start, wall_end, transcript, tags, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING",
                (
                    op.id,
                    op.stream,
                    _window_index(op.id),
                    op.start,
                    op.end,
                    op.wall_start,
                    op.wall_end,
                    op.transcript,
                    json.dumps(tags),
                    now,
                ),
            )
            dirty.update(r[0] for r in _q(conn, "SELECT rowid FROM windows WHERE id = ?", (op.id,)))
        elif isinstance(op, SceneEvent):
            rows = _q(conn, "UPDATE windows SET scene = ? WHERE id = ? RETURNING rowid", (op.text, op.window.id))
            dirty.update(r[0] for r in rows)
        elif isinstance(op, FinalEvent):
            conn.execute(
                "INSERT INTO finals(id, stream, idx, start, end, wall_start, wall_end, text, reason, created)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    op.id,
                    op.stream,
                    int(op.id.rsplit("/", 1)[1]),
                    op.start,
                    op.end,
                    op.wall_start,
                    op.wall_end,
                    op.text,
                    op.reason,
                    now,
                ),
            )
        elif isinstance(op, GapEvent):
            conn.execute(
                "INSERT INTO gaps(stream, at, duration_s, reason, created) VALUES (?,?,?,?,?)",
                (op.stream, op.at, op.duration_s, op.reason, now),
            )
        elif isinstance(op, AlertEvent):
            conn.execute(
                "INSERT INTO alerts(id, rule, stream, kind, window, wall, evidence, score, clip, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING",
                (
                    op.id,
                    op.rule,
                    op.stream,
                    op.kind,
                    op.window.id if op.window else None,
                    op.wall,
                    op.evidence,
                    op.score,
                    op.clip,
                    now,
                ),
            )
            if op.window is not None:
                conn.execute(
                    "UPDATE windows SET tags = json_insert(tags, '$[#]', ?) WHERE id = ? AND NOT EXISTS "
                    "(SELECT 1 FROM json_each(tags) WHERE value = ?)",
                    (op.rule, op.window.id, op.rule),
                )
        elif isinstance(op, AlertClearedEvent):
            conn.execute("UPDATE alerts SET cleared = ? WHERE id = ?", (op.time, op.id))
        elif isinstance(op, DigestEvent):
            conn.execute(
                "INSERT INTO digests(id, stream, since, until, text, windows, created) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT(id) DO NOTHING",
                (op.id, op.stream, op.since, op.until, op.text, op.windows, now),
            )
        elif isinstance(op, AnswerRecord):
            d = op.done
            conn.execute(
                "INSERT INTO answers(re, question, text, scope, evidence, reason, created) VALUES (?,?,?,?,?,?,?)",
                (str(d.re), op.question, d.text, d.scope, json.dumps([e.id for e in d.evidence]), d.reason, now),
            )
        elif isinstance(op, RuleChange):
            if op.rule is None:
                conn.execute("DELETE FROM rules WHERE name = ?", (op.name,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO rules(name, rule, created) VALUES (?,?,?)",
                    (op.name, op.rule.model_dump_json(), now),
                )
        elif isinstance(op, LevelRow):
            conn.execute(
                "INSERT INTO levels(stream, at, rms_dbfs, peak_dbfs, created) VALUES (?,?,?,?,?) "
                "ON CONFLICT(stream, at) DO UPDATE SET rms_dbfs = excluded.rms_dbfs, "
                "peak_dbfs = max(peak_dbfs, excluded.peak_dbfs)",
                (op.stream, op.at, op.rms_dbfs, op.peak_dbfs, now),
            )
        elif isinstance(op, Clip):
            self._write_clip(op)
            conn.execute("UPDATE alerts SET clip = ? WHERE id = ?", (op.name, op.alert_id))

    def _embed_rows(self, conn: apsw.Connection, rowids: set[int]) -> None:
        embed = self._embedder() if rowids else None
        if embed is None:
            return
        rows = _q(
            conn,
            f"SELECT rowid, stream, wall_end, transcript, scene FROM windows WHERE rowid IN "
            f"({','.join('?' * len(rowids))})",
            tuple(rowids),
        )
        vectors = embed([_text(t, s) for _, _, _, t, s in rows])
        for (rowid, stream, wall_end, _, _), v in zip(rows, vectors, strict=True):
            conn.execute("DELETE FROM windows_vec WHERE rowid = ?", (rowid,))
            wall = float(wall_end or time.time())
            conn.execute(
                "INSERT INTO windows_vec(rowid, day, embedding, stream, wall_end) VALUES (?,?,?,?,?)",
                (rowid, int(wall // DAY_S), np.asarray(v, np.float32).tobytes(), stream, wall),
            )

    def _write_clip(self, clip: Clip) -> None:
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        pcm = (np.clip(clip.samples, -1, 1) * 32767).astype("<i2")
        with wave.open(str(self.clips_dir / clip.name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(clip.rate)
            w.writeframes(pcm.tobytes())

    def _retention(self) -> None:
        """Delete what is older than `retention_days`, then the oldest windows while the file is over `max_mb`."""
        assert self._write is not None
        conn = self._write
        cutoff = time.time() - self.config.retention_days * 86400
        try:
            with conn:
                old = "SELECT rowid FROM windows WHERE coalesce(wall_end, created) < ?"
                conn.execute(f"DELETE FROM windows_vec WHERE rowid IN ({old})", (cutoff,))
                conn.execute(f"DELETE FROM windows WHERE rowid IN ({old})", (cutoff,))
                for table in _OLD:
                    conn.execute(f"DELETE FROM {table} WHERE created < ?", (cutoff,))
            while self.size_bytes() > self.config.max_mb * 2**20:
                with conn:
                    n = int(_q(conn, "SELECT count(*) FROM windows")[0][0])
                    if n == 0:
                        break
                    oldest = "SELECT rowid FROM windows ORDER BY rowid LIMIT ?"
                    k = max(1, n // 20)
                    conn.execute(f"DELETE FROM windows_vec WHERE rowid IN ({oldest})", (k,))
                    conn.execute(f"DELETE FROM windows WHERE rowid IN ({oldest})", (k,))
                conn.execute("PRAGMA incremental_vacuum")
            conn.execute("PRAGMA incremental_vacuum")
            self._clip_retention()
        except (apsw.Error, OSError) as e:
            log.warning("history store retention failed: %s", e)

    def _clip_retention(self) -> None:
        if not self.clips_dir.is_dir():
            return
        cutoff = time.time() - self.config.clip_retention_days * 86400
        for f in self.clips_dir.glob("*.wav"):
            if f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)

    # --- reads (worker threads) ---

    def _reader(self) -> apsw.Connection:
        if self._read is None:
            self._read = connect(self.path)
        return self._read

    def size_bytes(self) -> int:
        """Bytes in use in the database file (without free pages)."""
        with self._read_lock:
            c = self._reader()
            pages, free, size = (int(_q(c, f"PRAGMA {p}")[0][0]) for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def counts(self) -> dict[str, int]:
        with self._read_lock:
            c = self._reader()
            return {t: int(_q(c, f"SELECT count(*) FROM {t}")[0][0]) for t in ("windows", *_OLD, "rules")}

    def timeline(
        self, since: float, until: float, streams: Sequence[str], buckets: int, max_marks: int = 500
    ) -> list[TimelineStream]:
        """Level history and marks per stream over [since, until) (blocking: run in a thread)."""
        with self._read_lock:
            return read_timeline(self._reader(), since, until, streams, buckets, max_marks)

    def clip_bytes(self, name: str, limit: int = 4 << 20) -> bytes | None:
        """An alert clip's WAV file by name (None if absent, not a clip name, or over `limit` bytes)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}\.wav", name) or name.startswith("."):
            return None
        path = self.clips_dir / name
        try:
            if path.stat().st_size > limit:
                return None
            return path.read_bytes()
        except OSError:
            return None

    def last_indices(self, stream: str) -> tuple[int, int]:
        """(last window index, last utterance index) stored for `stream`: numbering continues after a restart."""
        with self._read_lock:
            c = self._reader()
            w = _q(c, "SELECT max(idx) FROM windows WHERE stream = ?", (stream,))[0][0]
            u = _q(c, "SELECT max(idx) FROM finals WHERE stream = ?", (stream,))[0][0]
        return int(w or 0), int(u or 0)

    def alert_counts(self) -> dict[tuple[str, str], int]:
        """(rule, stream) → the number in its last stored alert id (`<rule>/<stream>/<n>`): numbering continues."""
        with self._read_lock:
            rows = _q(self._reader(), "SELECT id FROM alerts")
        out: dict[tuple[str, str], int] = {}
        for (alert_id,) in rows:
            rule, stream, n = str(alert_id).rsplit("/", 2)
            out[(rule, stream)] = max(out.get((rule, stream), 0), int(n))
        return out

    def rules(self) -> list[AlertRule]:
        """The runtime alert rules, oldest first. One this daemon no longer accepts (stored by an older version, say
        a regex RE2 refuses) is skipped with a warning, and kept in the file."""
        with self._read_lock:
            rows = _q(self._reader(), "SELECT name, rule FROM rules ORDER BY created")
        out: list[AlertRule] = []
        for name, text in rows:
            try:
                out.append(AlertRule.model_validate_json(text))
            except ValueError as e:
                reason = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
                log.warning("stored alert rule %r not loaded: %s (alert.add of that name replaces it)", name, reason)
        return out

    def search(
        self,
        query: str,
        *,
        since: float | None = None,
        until: float | None = None,
        streams: Sequence[str] = ("*",),
        limit: int = 10,
        mode: Literal["combined", "text", "vector", "time"] = "combined",
    ) -> tuple[list[HistoryHit], Literal["combined", "text", "vector", "time"]]:
        """Windows matching `query` within [since, until] (wall clock) on streams matching the globs, best first.

        `text`: FTS5 BM25; `vector`: cosine similarity of MiniLM embeddings; `combined`: both, merged by reciprocal
        rank; `time` (or an empty query): the newest. Returns the hits and the mode actually used (vector search
        falls back to text when embeddings are off)."""
        fts = _fts_query(query)
        if fts is None:
            mode = "time"
        if mode in ("vector", "combined") and self._make_embedder is None:
            mode = "text"
        where, args = _time_filter(since, until, streams)
        ranked: list[list[int]] = []
        with self._read_lock:
            c = self._reader()
            if mode == "time":
                rows = _q(
                    c,
                    f"SELECT rowid FROM windows w WHERE {where} ORDER BY wall_end DESC, rowid DESC LIMIT ?",
                    (*args, limit),
                )
                return self._hits(c, [r[0] for r in rows], {}), mode
            pool = max(limit * 5, 50)  # candidates per ranking before merging
            if mode in ("text", "combined"):
                rows = _q(
                    c,
                    f"SELECT w.rowid FROM windows_fts f JOIN windows w ON w.rowid = f.rowid "
                    f"WHERE windows_fts MATCH ? AND {where} ORDER BY bm25(windows_fts) LIMIT ?",
                    (fts, *args, pool),
                )
                ranked.append([r[0] for r in rows])
        if mode in ("vector", "combined"):
            ranked.append(self._knn(query, since, until, streams, pool))
        scores: dict[int, float] = {}
        for ranking in ranked:  # reciprocal rank fusion (k = 60, as in Cormack et al. 2009)
            for rank, rowid in enumerate(ranking):
                scores[rowid] = scores.get(rowid, 0.0) + 1.0 / (60 + rank + 1)
        best = sorted(scores, key=lambda r: -scores[r])[:limit]
        with self._read_lock:
            return self._hits(self._reader(), best, scores), mode

    def _knn(
        self, query: str, since: float | None, until: float | None, streams: Sequence[str], pool: int
    ) -> list[int]:
        embed = self._embedder()
        if embed is None:
            return []
        vector = np.asarray(embed([query])[0], np.float32).tobytes()
        every = list(streams) == ["*"]
        cond: list[str] = ["v.embedding MATCH ?", "v.k = ?"]
        args: list[Any] = [vector, pool if every else pool * 4]  # room for the stream filter applied after
        # vec0 scans only the day partitions a time range covers (a flat scan of everything otherwise)
        if since is not None:
            cond += ["v.day >= ?", "v.wall_end >= ?"]
            args += [int(since // DAY_S), since]
        if until is not None:
            cond += ["v.day <= ?", "v.wall_end <= ?"]
            args += [int(until // DAY_S), until]
        with self._read_lock:
            rows = _q(
                self._reader(),
                f"SELECT v.rowid, w.stream FROM windows_vec v JOIN windows w ON "
                f"w.rowid = v.rowid WHERE {' AND '.join(cond)} ORDER BY distance",
                args,
            )
        return [r for r, s in rows if any(fnmatch.fnmatchcase(s, g) for g in streams)][:pool]

    def _hits(self, c: apsw.Connection, rowids: list[int], scores: dict[int, float]) -> list[HistoryHit]:
        if not rowids:
            return []
        rows = {
            r[0]: r
            for r in c.execute(
                "SELECT rowid, id, stream, start, end, wall_start, wall_end, transcript, scene, tags FROM windows "
                f"WHERE rowid IN ({','.join('?' * len(rowids))})",
                tuple(rowids),
            )
        }
        return [
            HistoryHit(
                id=r[1],
                stream=r[2],
                start=r[3],
                end=r[4],
                wall_start=r[5],
                wall_end=r[6],
                transcript=r[7],
                scene=r[8],
                tags=json.loads(r[9]),
                score=round(scores.get(i, 0.0), 6),
            )
            for i in rowids
            if (r := rows.get(i)) is not None
        ]

    def last_rowid(self) -> int:
        """The newest window's row number: a watermark for "windows stored since"."""
        with self._read_lock:
            return int(_q(self._reader(), "SELECT coalesce(max(rowid), 0) FROM windows")[0][0])

    def windows_after(self, stream: str, after: int, limit: int) -> tuple[list[HistoryHit], int]:
        """A stream's windows stored after row `after` (the newest `limit`, oldest first), and the new watermark.
        By storage order, not wall time: a window written late (a slow disk, a busy writer) is not skipped."""
        with self._read_lock:
            c = self._reader()
            top = int(_q(c, "SELECT coalesce(max(rowid), 0) FROM windows")[0][0])
            rows = _q(
                c,
                "SELECT rowid FROM windows WHERE stream = ? AND rowid > ? AND rowid <= ? ORDER BY rowid DESC LIMIT ?",
                (stream, after, top, limit),
            )
            return list(reversed(self._hits(c, [r[0] for r in rows], {}))), max(top, after)

    def stats(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "degraded": self.degraded,
            "queue": self._queue.qsize(),
            "dropped": self.dropped,
            "written": self.written,
            "embeddings": self._embed is not None,
            "clips": self.config.clips,
            "retention_days": self.config.retention_days,
            "last_commit": round(self.last_commit, 3) or None,
        }


def _text(transcript: str | None, scene: str | None) -> str:
    """What a window says, for embeddings: the scene description and the speech."""
    parts = [p for p in (scene, f'said: "{transcript}"' if transcript else None) if p]
    return ". ".join(parts) or "silence"


def _time_filter(since: float | None, until: float | None, streams: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    cond = ["(" + " OR ".join("w.stream GLOB ?" for _ in streams) + ")"]
    args: list[Any] = list(streams)
    if since is not None:
        cond.append("w.wall_end >= ?")
        args.append(since)
    if until is not None:
        cond.append("w.wall_end <= ?")
        args.append(until)
    return " AND ".join(cond), tuple(args)
