"""The CPU dry run of the whole GPU check (`DEVICE=cpu bash bench/gpu_check.sh`): every section runs for real at
tiny dims (2 layers), the JSON and the table hold every section, the figures are the ones claimed (every timed row
running, no graph captured inside a timed window), the console is kept, and a section forced to fail leaves every
other section's figures. So the one GPU run cannot be lost to a bench bug we could have seen here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = [
    "env", "batch1", "ttft", "rows", "questions", "hf_static", "hf_eager", "int8", "int8_aten", "int8_compiled",
    "int4", "streams", "daemon", "encoder",
]  # fmt: skip


def dry_run(out: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=REPO,
        env={**os.environ, "DEVICE": "cpu", "OUT": str(out), "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=400,
    )
    doc = json.loads((out / "gpu_check.json").read_text())
    return proc, doc["sections"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc, sections = dry_run(out)
    return proc, sections, out


def test_the_dry_run_measures_every_section(full) -> None:
    proc, s, out = full
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(s) == SECTIONS
    bad = {k: v for k, v in s.items() if "failed" in v or "skipped" in v}
    assert not bad, bad
    # the rows claimed are the rows running, and no capture fell inside a timed window
    for rows, r in s["rows"].items():
        if isinstance(r, dict):
            assert r["mean_rows"] == int(rows) and r["late_captures_timed"] == 0
    assert s["batch1"]["mean_rows"] == 1 and s["batch1"]["ours_ms"] > 0 and s["batch1"]["floor_ms"] > 0
    assert s["batch1"]["graphs_enabled"] is False  # CPU: and the table says so
    assert s["questions"]["n"] == 3 and s["questions"]["ratio"] > 0
    assert s["hf_static"]["ms"] > 0 and s["hf_eager"]["batch1_ms"] > 0 and "rows4_tokens_per_s" in s["hf_eager"]
    for q in ("int8", "int8_aten", "int8_compiled", "int4"):
        assert s[q]["batch1_ms"] > 0 and s[q]["batch1_vs_bf16"] > 0 and s[q]["rows4_vs_bf16"] > 0
    assert s["int4"]["weights_GB"] < s["int8"]["weights_GB"] == s["int8_aten"]["weights_GB"]
    assert s["streams"]["largest_real_time_streams"] >= 1
    d = s["daemon"]["trials"][0]
    assert d["asr_finals"] > 0 and d["asr_error"] is None and d["scenes"] == d["streams"]
    assert s["encoder"]["int8"]["rel_error_max"] < 0.05
    table = (out / "table.md").read_text()
    for label in (
        "batch-1 decode",
        "TTFT",
        "2 rows",
        "4 rows",
        "questions on one window",
        "HF static",
        "HF eager",
        "int8,",
        "int8_aten",
        "int8_compiled",
        "int4",
        "real-time streams |",
        "with ASR",
        "encoder int8",
    ):
        assert label in table, label
    console = (out / "console.log").read_text()
    assert "[14/14] encoder: ok" in console and "gpu_check.sh: exit 0" in console


def test_a_section_forced_to_fail_leaves_the_others(tmp_path: Path) -> None:
    """batch1 fails: every later section still runs (int8's ratio to bf16, which needs batch1, says None)."""
    proc, s = dry_run(tmp_path, GPU_CHECK_FAIL="batch1")
    assert proc.returncode == 0
    assert list(s) == SECTIONS
    assert s["batch1"]["failed"] == "RuntimeError: forced failure of batch1 (--fail)"
    assert all("failed" not in v for k, v in s.items() if k != "batch1"), s
    assert s["int8"]["batch1_vs_bf16"] is None and s["int8"]["batch1_ms"] > 0
    assert "| batch1 | failed | RuntimeError: forced failure of batch1" in (tmp_path / "table.md").read_text()
