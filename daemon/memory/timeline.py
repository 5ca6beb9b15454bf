"""What the page's timeline shows, from the history store: each stream's level history and its events (speech,
scenes, alerts, gaps) over a span.

Levels arrive as `level` events several times a second; the store keeps one row per stream per `LEVEL_BUCKET_S`
(the mean power as dBFS, the highest peak), folded here on the event loop before anything is queued for the disk.
A timeline request then folds those rows into as many buckets as the client asked for.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from ..delivery.events import LevelEvent, TimelineMark, TimelineStream
from .schema import query

LEVEL_BUCKET_S = 10.0  # one stored level row per stream per this many seconds of wall time
SILENCE_DBFS = -120.0


@dataclass(frozen=True)
class LevelRow:
    """One stored level bucket: [at, at + LEVEL_BUCKET_S) of wall time on `stream`."""

    stream: str
    at: float
    rms_dbfs: float
    peak_dbfs: float


class LevelBuckets:
    """Folds a stream's level events into `LEVEL_BUCKET_S` buckets: `feed` returns the bucket a new event closed."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[float, float, int, float]] = {}  # stream → (bucket start, power sum, n, peak)

    def feed(self, e: LevelEvent) -> LevelRow | None:
        at = math.floor(e.time / LEVEL_BUCKET_S) * LEVEL_BUCKET_S
        power = 10 ** (e.rms_dbfs / 10)
        current = self._open.get(e.stream)
        if current is not None and current[0] == at:
            _, total, n, peak = current
            self._open[e.stream] = (at, total + power, n + 1, max(peak, e.peak_dbfs))
            return None
        self._open[e.stream] = (at, power, 1, e.peak_dbfs)
        return _row(e.stream, current) if current is not None else None

    def flush(self) -> list[LevelRow]:
        """The open buckets (at shutdown)."""
        rows = [_row(stream, b) for stream, b in self._open.items()]
        self._open.clear()
        return rows


def _row(stream: str, bucket: tuple[float, float, int, float]) -> LevelRow:
    at, total, n, peak = bucket
    rms = 10 * math.log10(total / n) if total > 0 else SILENCE_DBFS
    return LevelRow(stream, at, round(max(rms, SILENCE_DBFS), 2), round(peak, 2))


def _fold(rms: list[list[float]], peak: list[list[float]]) -> tuple[list[float | None], list[float | None]]:
    """Mean power (as dBFS) and highest peak of each bucket's rows; None where a bucket has none."""
    out_rms: list[float | None] = []
    out_peak: list[float | None] = []
    for r, p in zip(rms, peak, strict=True):
        if not r:
            out_rms.append(None)
            out_peak.append(None)
            continue
        mean = sum(10 ** (x / 10) for x in r) / len(r)
        out_rms.append(round(max(10 * math.log10(mean), SILENCE_DBFS) if mean > 0 else SILENCE_DBFS, 2))
        out_peak.append(round(max(p), 2))
    return out_rms, out_peak


def read_timeline(
    conn: apsw.Connection,
    since: float,
    until: float,
    streams: Sequence[str],
    buckets: int,
    max_marks: int,
) -> list[TimelineStream]:
    """Each stream (matching the globs) that has levels or marks in [since, until): `buckets` level values and at
    most `max_marks` marks (the newest, in time order)."""
    width = (until - since) / buckets
    names = sorted(
        str(r[0])
        for r in query(
            conn,
            "SELECT stream FROM levels WHERE at >= ? AND at < ? UNION SELECT stream FROM windows "
            "WHERE wall_end >= ? AND wall_start < ? UNION SELECT stream FROM alerts WHERE wall >= ? AND wall < ?",
            (since - LEVEL_BUCKET_S, until) * 3,
        )
        if any(fnmatch.fnmatchcase(str(r[0]), g) for g in streams)
    )
    out = []
    for name in names:
        rms: list[list[float]] = [[] for _ in range(buckets)]
        peak: list[list[float]] = [[] for _ in range(buckets)]
        for at, r, p in query(
            conn,
            "SELECT at, rms_dbfs, peak_dbfs FROM levels WHERE stream = ? AND at >= ? AND at < ?",
            (name, since - LEVEL_BUCKET_S, until),
        ):
            i = int((max(float(at), since) - since) // width)
            if 0 <= i < buckets:
                rms[i].append(float(r))
                peak[i].append(float(p))
        levels = _fold(rms, peak)
        marks = _marks(conn, name, since, until, max_marks + 1)
        out.append(
            TimelineStream(
                stream=name,
                rms_dbfs=levels[0],
                peak_dbfs=levels[1],
                marks=marks[-max_marks:],
                truncated=len(marks) > max_marks,
            )
        )
    return out


def _marks(conn: apsw.Connection, stream: str, since: float, until: float, limit: int) -> list[TimelineMark]:
    """The newest `limit` marks of each kind, merged in time order (so a month of speech costs `limit` rows)."""
    rows: list[dict[str, Any]] = []
    for fid, start, end, text in query(
        conn,
        "SELECT id, wall_start, wall_end, text FROM finals WHERE stream = ? AND text != '' "
        "AND coalesce(wall_start, created) >= ? AND coalesce(wall_start, created) < ? "
        "ORDER BY coalesce(wall_start, created) DESC LIMIT ?",
        (stream, since, until, limit),
    ):
        rows.append({"kind": "speech", "at": start, "end": end, "text": text, "id": fid, "clip": None})
    for wid, end, scene in query(
        conn,
        "SELECT id, wall_end, scene FROM windows WHERE stream = ? AND scene IS NOT NULL AND wall_end >= ? "
        "AND wall_end < ? ORDER BY wall_end DESC LIMIT ?",
        (stream, since, until, limit),
    ):
        rows.append({"kind": "scene", "at": end, "end": None, "text": scene, "id": wid, "clip": None})
    for aid, rule, wall, evidence, clip, cleared in query(
        conn,
        "SELECT id, rule, wall, evidence, clip, cleared FROM alerts WHERE stream = ? AND wall >= ? AND wall < ? "
        "ORDER BY wall DESC LIMIT ?",
        (stream, since, until, limit),
    ):
        rows.append(
            {"kind": "alert", "at": wall, "end": cleared, "text": f"{rule}: {evidence}", "id": aid, "clip": clip}
        )
    for created, duration, reason in query(
        conn,
        "SELECT created, duration_s, reason FROM gaps WHERE stream = ? AND created >= ? AND created < ? "
        "ORDER BY created DESC LIMIT ?",
        (stream, since, until, limit),
    ):
        rows.append({"kind": "gap", "at": created - duration, "end": created, "text": reason, "id": None, "clip": None})
    rows.sort(key=lambda m: (m["at"] is None, m["at"] or 0.0))
    return [TimelineMark(**{**m, "at": float(m["at"] or 0.0)}) for m in rows]
