"""Open-ASQA-format data: JSON (a list) or JSONL records with `instruction`, `input` (the transcript), `output`,
`audio_id`, and optionally `dataset` and `task`. Every record is validated; bad rows are reported with their
line (JSONL) or index (JSON) and the reason, never silently dropped or patched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("instruction", "output", "audio_id")
OPTIONAL = ("input", "dataset", "task")


@dataclass(frozen=True)
class Record:
    instruction: str
    output: str
    audio_id: str
    input: str = ""
    dataset: str = ""
    task: str = ""


@dataclass(frozen=True)
class BadRow:
    where: str  # "line 12" or "item 12"
    reason: str


def _validate(raw: object) -> Record:
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    nulls = [k for k in REQUIRED if raw[k] is None]
    if nulls:
        raise ValueError(f"{', '.join(nulls)} is null")
    for k in (*REQUIRED, *OPTIONAL):
        if k in raw and raw[k] is not None and not isinstance(raw[k], str):
            raise ValueError(f"{k} must be a string, got {type(raw[k]).__name__}")
    for k in REQUIRED:
        if not raw[k].strip():
            raise ValueError(f"{k} is empty" + (" (nothing to train on)" if k == "output" else ""))
    return Record(**{k: (raw.get(k) or "") for k in (*REQUIRED, *OPTIONAL)})


def read_records(path: str | Path) -> tuple[list[Record], list[BadRow]]:
    """Read and validate every record of a `.json` or `.jsonl` file: (good records, bad rows)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    records: list[Record] = []
    bad: list[BadRow] = []
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(BadRow(f"line {n}", f"not JSON: {e.msg}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not JSON at line {e.lineno} column {e.colno} ({e.msg}); fix that row, or write one record "
                "per line as .jsonl, where a broken line is reported and skipped"
            ) from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        items = [(f"item {i}", r) for i, r in enumerate(data)]
    for where, raw in items:
        try:
            records.append(_validate(raw))
        except ValueError as e:
            bad.append(BadRow(where, str(e)))
    return records, bad


def resolve_audio(root: str | Path, audio_id: str) -> Path:
    """The file for `audio_id`: absolute ids as they are, relative ones under `root`."""
    p = Path(audio_id).expanduser()
    return p if p.is_absolute() else Path(root) / p
