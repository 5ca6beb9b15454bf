"""The history store's file: its schema as migrations applied in order (`PRAGMA user_version`), and how every
user of the file connects (apsw with sqlite-vec loaded).

Migration i takes the schema from version i to i + 1. Never edit one that has shipped: add the next, and add the
rows a daemon of the new version writes to tests/fixtures/stores/ (the migration tests open every version's)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import apsw
import sqlite_vec

log = logging.getLogger(__name__)

EMBED_DIM = 384  # all-MiniLM-L6-v2
# Migration i takes the schema from version i to i + 1. Never edit one that has shipped: add the next.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE windows(
        rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, stream TEXT NOT NULL, idx INTEGER NOT NULL,
        start REAL NOT NULL, end REAL NOT NULL, wall_start REAL, wall_end REAL,
        transcript TEXT NOT NULL DEFAULT '', scene TEXT, tags TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL);
    CREATE INDEX windows_stream_wall ON windows(stream, wall_end);
    CREATE INDEX windows_wall ON windows(wall_end);
    CREATE VIRTUAL TABLE windows_fts USING fts5(transcript, scene, content='windows', content_rowid='rowid',
                                                tokenize='porter unicode61');
    CREATE TRIGGER windows_ai AFTER INSERT ON windows BEGIN
        INSERT INTO windows_fts(rowid, transcript, scene) VALUES (new.rowid, new.transcript, new.scene); END;
    CREATE TRIGGER windows_ad AFTER DELETE ON windows BEGIN
        INSERT INTO windows_fts(windows_fts, rowid, transcript, scene)
        VALUES ('delete', old.rowid, old.transcript, old.scene); END;
    CREATE TRIGGER windows_au AFTER UPDATE OF transcript, scene ON windows BEGIN
        INSERT INTO windows_fts(windows_fts, rowid, transcript, scene)
        VALUES ('delete', old.rowid, old.transcript, old.scene);
        INSERT INTO windows_fts(rowid, transcript, scene) VALUES (new.rowid, new.transcript, new.scene); END;
    CREATE VIRTUAL TABLE windows_vec USING vec0(day INTEGER PARTITION KEY, embedding float[{EMBED_DIM}],
                                                stream TEXT, wall_end FLOAT);
    CREATE TABLE finals(
        rowid INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL, idx INTEGER NOT NULL,
        start REAL NOT NULL, end REAL NOT NULL, wall_start REAL, wall_end REAL, text TEXT NOT NULL,
        reason TEXT NOT NULL, created REAL NOT NULL);
    CREATE INDEX finals_stream_wall ON finals(stream, wall_end);
    CREATE TABLE answers(
        rowid INTEGER PRIMARY KEY, re TEXT, question TEXT NOT NULL, text TEXT NOT NULL, scope TEXT NOT NULL,
        evidence TEXT NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE alerts(
        rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, rule TEXT NOT NULL, stream TEXT NOT NULL,
        kind TEXT NOT NULL, window TEXT, wall REAL, evidence TEXT NOT NULL, score REAL, clip TEXT,
        cleared REAL, created REAL NOT NULL);
    CREATE INDEX alerts_created ON alerts(created);
    CREATE TABLE gaps(
        rowid INTEGER PRIMARY KEY, stream TEXT NOT NULL, at REAL NOT NULL, duration_s REAL NOT NULL,
        reason TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE digests(
        rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, stream TEXT NOT NULL, since REAL NOT NULL,
        until REAL NOT NULL, text TEXT NOT NULL, windows INTEGER NOT NULL, created REAL NOT NULL);
    CREATE TABLE rules(name TEXT PRIMARY KEY, rule TEXT NOT NULL, created REAL NOT NULL);
    """,
    # 2: level history for the page's timeline, one row per stream per 10 s
    """
    CREATE TABLE levels(
        rowid INTEGER PRIMARY KEY, stream TEXT NOT NULL, at REAL NOT NULL, rms_dbfs REAL NOT NULL,
        peak_dbfs REAL NOT NULL, created REAL NOT NULL, UNIQUE(stream, at));
    CREATE INDEX levels_at ON levels(at);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The store cannot be opened (the message says where and what to do)."""


def connect(path: Path) -> apsw.Connection:
    """A connection with sqlite-vec loaded and the pragmas every user of the file needs."""
    conn = apsw.Connection(str(path))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.enable_load_extension(False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def migrate(conn: apsw.Connection) -> int:
    """Bring the schema to `SCHEMA_VERSION`; returns the version found. Raises `StoreError` for a newer file."""
    found = int(query(conn, "PRAGMA user_version")[0][0])
    if found > SCHEMA_VERSION:
        raise StoreError(f"the store's schema is version {found}, newer than this daemon's {SCHEMA_VERSION}")
    if found == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table: lets retention give space back
    for version in range(found, SCHEMA_VERSION):
        with conn:
            conn.execute(MIGRATIONS[version])
            conn.execute(f"PRAGMA user_version = {version + 1}")
        log.info("store schema migrated to version %d", version + 1)
    return found


def query(conn: apsw.Connection, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query (apsw types each value as any SQLite value; the schema says which they are)."""
    return cast(list[tuple[Any, ...]], conn.execute(sql, tuple(args)).fetchall())
