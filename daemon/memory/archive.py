"""The history store in and out of its file: export to JSON Lines (all of it, or what was recorded in a span),
import from them (what the store already has is skipped, so importing twice adds nothing), and SQLite's online
backup, which is safe while the daemon writes.

The export's first line is a header, `{"format": "ltu-daemon-store", "schema": N, "exported": T, "since": ...,
"until": ...}`; every other line is one row, `{"table": NAME, COLUMN: VALUE, ...}`, tables in the order of `TABLES`
and rows in the order they were written. The vector index is not exported: an import rebuilds it from the windows'
text. Alert clips (WAV files beside the store) are named in their alerts' rows, not embedded; copy `clips/` along.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import apsw

from .schema import SCHEMA_VERSION, StoreError, connect, query

FORMAT = "ltu-daemon-store"
TABLES = ("windows", "finals", "answers", "alerts", "gaps", "digests", "rules", "levels")
# What makes a row the same row when importing: a unique id where the table has one, else its content.
_SAME: dict[str, tuple[str, ...]] = {
    "windows": ("id",),
    "alerts": ("id",),
    "digests": ("id",),
    "rules": ("name",),
    "finals": ("id", "stream", "created"),
    "answers": ("question", "created"),
    "gaps": ("stream", "at", "created"),
    "levels": ("stream", "at"),
}
BATCH = 1000  # rows per import transaction: a daemon writing the same file waits at most that long for its turn


def parse_time(text: str) -> float:
    """Unix seconds from `text`: a number (Unix seconds) or an ISO 8601 date or date-time (local time when it has
    no offset). Raises `ValueError` naming both forms."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use Unix seconds or ISO 8601 (2026-12-07 or 2026-12-07T18:30)"
        ) from None


def _columns(conn: apsw.Connection, table: str) -> list[str]:
    return [str(r[1]) for r in query(conn, f"PRAGMA table_info({table})")]


def export_rows(
    conn: apsw.Connection, since: float | None = None, until: float | None = None
) -> Iterator[dict[str, Any]]:
    """The header, then every row recorded (`created`, Unix s) in [since, until)."""
    version = int(query(conn, "PRAGMA user_version")[0][0])
    yield {"format": FORMAT, "schema": version, "exported": round(time.time(), 3), "since": since, "until": until}
    lo = since if since is not None else float("-inf")
    hi = until if until is not None else float("inf")
    for table in TABLES:
        cols = [c for c in _columns(conn, table) if c != "rowid"]
        sql = f"SELECT {', '.join(cols)} FROM {table} WHERE created >= ? AND created < ? ORDER BY created, rowid"
        for row in conn.execute(sql, (lo, hi)):
            yield {"table": table, **dict(zip(cols, row, strict=True))}


@dataclass
class ImportResult:
    added: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    windows: set[int] = field(default_factory=set)  # rowids of the windows added (their vectors are to be built)


def import_rows(conn: apsw.Connection, lines: Iterable[str]) -> ImportResult:
    """Add the rows of an export (`lines`, header first) that the store does not have. Raises `StoreError` naming
    the line for anything malformed; the batches before it stay imported (importing again skips them)."""
    result = ImportResult()
    columns = {t: set(_columns(conn, t)) - {"rowid"} for t in TABLES}
    pending: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        with conn:
            for number, row in pending:
                table = row.pop("table")
                same = _SAME[table]
                if query(conn, f"SELECT 1 FROM {table} WHERE " + " AND ".join(f"{c} IS ?" for c in same),
                         tuple(row.get(c) for c in same)):  # fmt: skip
                    result.skipped[table] += 1
                    continue
                names = list(row)
                try:
                    conn.execute(
                        f"INSERT INTO {table}({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        tuple(row[n] for n in names),
                    )
                except apsw.ConstraintError as e:
                    raise StoreError(f"line {number}: a {table} row the store refuses: {e}") from e
                result.added[table] += 1
                if table == "windows":
                    result.windows.add(conn.last_insert_rowid())
        pending.clear()

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"line {number}: not JSON ({e})") from e
        if not isinstance(record, dict):
            raise StoreError(f"line {number}: expected an object, got {type(record).__name__}")
        if number == 1:
            if record.get("format") != FORMAT:
                raise StoreError(f"line 1: not an ltu-daemon store export (its header has no format {FORMAT!r})")
            if not isinstance(record.get("schema"), int) or record["schema"] > SCHEMA_VERSION:
                raise StoreError(
                    f"line 1: exported from schema {record.get('schema')!r}, newer than this daemon's "
                    f"{SCHEMA_VERSION}: import it with the daemon that wrote it, or upgrade"
                )
            continue
        table = record.get("table")
        if table not in columns:
            raise StoreError(f"line {number}: unknown table {table!r} (tables: {', '.join(TABLES)})")
        unknown = set(record) - columns[table] - {"table"}
        if unknown:
            raise StoreError(f"line {number}: {table} has no column(s) {', '.join(sorted(unknown))}")
        pending.append((number, record))
        if len(pending) >= BATCH:
            flush()
    if pending:
        flush()
    return result


def backup(source: Path, dest: Path) -> int:
    """Copy the store at `source` to a new file `dest` with SQLite's online backup API, in one step: the store is in
    WAL mode, so that step reads one snapshot while the daemon's writer goes on committing (a copy in several steps
    would restart at every commit in between, and might never finish under a steady writer). Checks the copy's
    integrity. Returns its pages. Raises `StoreError` if `dest` exists or the copy is not sound."""
    if dest.exists():
        raise StoreError(f"{dest} exists: back up to a new file (or remove it first)")
    if not source.is_file():
        raise StoreError(f"no store at {source} (store.path)")
    src = connect(source)
    dst = connect(dest)
    try:
        with dst.backup("main", src, "main") as b:
            b.step(-1)
            total = int(b.page_count)
        check = query(dst, "PRAGMA integrity_check")
        if check != [("ok",)]:
            raise StoreError(f"the backup {dest} failed its integrity check: {check[:3]}")
        return total
    finally:
        dst.close()
        src.close()
