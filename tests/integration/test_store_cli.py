"""`ltu-daemon store backup|export|import` as a user runs them: a backup taken while the daemon runs and writes,
exported (all, and a span), imported into a new store, and the counts agree with the rows themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ASSET
from daemon_harness import REPO, Daemon, tiny_asr_config

pytestmark = pytest.mark.integration


def cli(*args: str | Path, config: Path, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--set", f'store.path="{store}"'] if store else []
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "store", *map(str, args), "--config", str(config), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_backup_while_running_then_export_and_import(tiny: Any, tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    config = (
        tiny_asr_config(tiny)
        + f"""
[store]
path = "{db}"
embeddings = false
commit_interval_s = 0.1

[windows]
hop_s = 2.0

[[streams]]
name = "talk"
source = "file"
path = "{ASSET}"
realtime = true
loop = true
"""
    )
    d = Daemon(tmp_path, config)
    try:
        deadline = time.monotonic() + 90
        while d.health()[1]["store"]["written"] < 6:  # windows and finals on disk
            assert time.monotonic() < deadline, d.health()[1]["store"]
            time.sleep(0.5)
        backup = tmp_path / "backup.db"
        r = cli("backup", backup, config=d.config_path)
        assert r.returncode == 0 and "integrity ok" in r.stderr, r.stderr
        again = cli("backup", backup, config=d.config_path)
        assert again.returncode == 1 and "exists" in again.stderr
    finally:
        assert d.stop() == 0, d.log()

    out = tmp_path / "all.jsonl"
    r = cli("export", "--out", out, config=d.config_path, store=backup)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["format"] == "ltu-daemon-store"
    windows = [x for x in rows[1:] if x["table"] == "windows"]
    assert len(windows) >= 1 and f"exported {len(windows)} windows" in r.stderr

    cut = sorted(float(x["created"]) for x in rows[1:])[len(rows) // 2]
    r = cli("export", "--since", str(cut), config=d.config_path, store=backup)
    assert r.returncode == 0, r.stderr
    later = [json.loads(line) for line in r.stdout.splitlines()[1:]]
    assert later == [x for x in rows[1:] if float(x["created"]) >= cut] and later

    bad = cli("export", "--since", "last tuesday", config=d.config_path, store=backup)
    assert bad.returncode == 2 and "Unix seconds or ISO 8601" in bad.stderr

    fresh = tmp_path / "fresh.db"
    r = cli("import", out, config=d.config_path, store=fresh)
    assert r.returncode == 0 and f"imported {len(windows)} windows" in r.stderr, r.stderr
    r = cli("import", out, config=d.config_path, store=fresh)
    assert r.returncode == 0 and "imported nothing" in r.stderr and f"{len(rows) - 1} rows it already had" in r.stderr
