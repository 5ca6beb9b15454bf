"""`ltu-as eval` end to end on a tiny synthetic benchmark in the Open-ASQA format, with the three kinds of
closed-ended scoring (label matching by sentence embeddings, WER, caption similarity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltu_as.testing import write_sound_classes

pytestmark = pytest.mark.integration


def test_eval_writes_json_and_markdown(tiny, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_sound_classes(data, 2, seed=5, split="bench")
    records = json.loads((data / "bench.json").read_text())
    for r in records[:4]:
        r["dataset"] = "esc50"
    for r in records[4:7]:
        r.update(dataset="librispeech", task="asr", instruction="Transcribe the speech.", output="hello world")
    for r in records[7:]:
        r.update(
            dataset="audiocaps",
            task="caption",
            instruction="Write an audio caption.",
            output="a dog barks while rain falls",
        )
    records.append({"instruction": "q", "output": "x", "audio_id": "bench/missing.wav", "dataset": "esc50"})
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*a: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ltu_as", *map(str, a)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    ex = run(
        "extract-features",
        "--data",
        bench,
        "--audio-root",
        data,
        "--out",
        tmp_path / "f",
        "--whisper",
        tiny.whisper,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert ex.returncode == 1 and "1 failed" in ex.stdout and "line " in ex.stderr  # missing file, bad row
    ev = run(
        "eval",
        "--data",
        bench,
        "--features",
        tmp_path / "f",
        "--checkpoint",
        tiny.checkpoint,
        "--whisper",
        tiny.whisper,
        "--llm",
        tiny.llm,
        "--out",
        tmp_path / "report",
        "--max-new-tokens",
        6,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {k: v["metric"] for k, v in report.items()} == {
        "audiocaps": "caption_similarity",
        "esc50": "accuracy",
        "librispeech": "wer",
    }
    assert report["esc50"]["n"] == 4 and report["esc50"]["labels"] == 2 and 0 <= report["esc50"]["value"] <= 1
    assert report["librispeech"]["value"] >= 0.5  # random weights: mostly wrong words
    assert -1 <= report["audiocaps"]["value"] <= 1
    assert "| esc50 | accuracy |" in (tmp_path / "report.md").read_text()
    answers = (tmp_path / "report.answers.jsonl").read_text().splitlines()
    assert len(answers) == 10
