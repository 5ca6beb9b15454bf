"""Training runs through the shipped CLI, each in its own process, with no seeding in the test: two runs with one
config give bitwise-equal weights; a run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one;
another run's checkpoints, a changed config on resume and a half-written checkpoint get the documented refusal or
fallback; every step is in metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_store

from ltu_as.loading.load import load_model

STEPS = 40


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    store, records = make_store(root, tiny, n=12)
    path = root / "data.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": r.instruction, "input": r.input, "audio_id": r.audio_id, "output": r.output}
                for r in records
            ]
        )
    )
    return path, store.folder


def train(tiny, data, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return finish(start(tiny, data, out, *extra))


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start(tiny, data, out: Path, *extra: str) -> subprocess.Popen[str]:
    path, features = data
    args = [
        sys.executable, "-m", "ltu_as", "train", "--stage", "2", "--init", str(tiny.checkpoint),
        "--whisper", str(tiny.whisper), "--llm", str(tiny.llm), "--device", "cpu", "--dtype", "fp32",
        "--data", str(path), "--features", str(features), "--out", str(out),
        "--set", f"max_steps={STEPS}", "--set", "batch_size=4", "--set", "micro_batch_size=2",
        "--set", "warmup_steps=2", "--set", "learning_rate=1e-3", "--set", "save_steps=10",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "trainable.safetensors"))


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_runs_with_one_config_give_the_same_weights(tiny, data, tmp_path: Path) -> None:
    first, second = train(tiny, data, tmp_path / "a"), train(tiny, data, tmp_path / "b")
    assert first.returncode == second.returncode == 0, first.stderr
    assert_equal(weights(tmp_path / "a"), weights(tmp_path / "b"))
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["grad_norm"] > 0 and m["loss"] > 0 and m["examples_per_s"] > 0 for m in metrics)
    assert metrics[0]["lr"] == 0 and metrics[1]["lr"] == pytest.approx(5e-4)  # warm-up from 0 over 2 steps


def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny, data, tmp_path: Path) -> None:
    straight = train(tiny, data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "stopped"
    proc = start(tiny, data, out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # stop it mid-run, between checkpoints
        lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
        if lines >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "checkpoint saved: continue with the same command and --resume" in err
    stopped_at = int(err.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped_at < STEPS and (out / f"checkpoint-{stopped_at}").is_dir()
    assert not (out / "trainable.safetensors").exists()  # no final output from a stopped run
    resumed = train(tiny, data, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / f'checkpoint-{stopped_at}'}" in resumed.stderr
    assert_equal(weights(tmp_path / "straight"), weights(out))


def test_stale_checkpoints_changed_config_and_half_written_checkpoints(tiny, data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(tiny, data, out).returncode == 0
    # a new run into the same --out: refused, nothing deleted
    again = train(tiny, data, out)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (out / f"checkpoint-{STEPS}").is_dir()
    # resume with another learning rate: refused, naming it
    changed = train(tiny, data, out, "--resume", "--set", "learning_rate=5e-4")
    assert changed.returncode == 2 and "learning_rate: 0.001 → 0.0005" in changed.stderr
    # max_steps may change: the run goes on from the newest checkpoint
    longer = train(tiny, data, out, "--resume", "--set", f"max_steps={STEPS + 5}")
    assert longer.returncode == 0, longer.stderr
    # a checkpoint cut off mid-save is skipped for the previous one
    newest = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    (newest / "trainable.safetensors").write_bytes(b"\0" * 10)
    (out / "checkpoint-99.tmp").mkdir()  # a save interrupted before its rename: never read
    fallback = train(tiny, data, out, "--resume", "--set", f"max_steps={STEPS + 5}")
    assert fallback.returncode == 0, fallback.stderr
    assert f"{newest.name} cannot be read" in fallback.stderr and "falling back" in fallback.stderr
    # --overwrite starts afresh
    fresh = train(tiny, data, out, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert not (out / "checkpoint-99.tmp").exists()
    assert (out / "metrics.jsonl").read_text().count("\n") == STEPS


def test_bad_data_gets_its_message_and_exit_code(tiny, data, tmp_path: Path) -> None:
    """Each bad input in its own CLI process; the processes run side by side (each is mostly Python start-up)."""
    path, features = data
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "q", "output": "a", "audio_id": "a0"},\n {"instruction": "q" "output"}]')
    rows = [
        {"instruction": None, "output": "tone", "audio_id": "a0"},
        {"instruction": "What sound is this?", "output": "", "audio_id": "a1"},
        {"instruction": "What sound is this?", "output": "noise", "audio_id": "a2"},
        {"instruction": "What sound is this?", "output": "silence", "audio_id": "missing"},
    ]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(rows))
    # features made with another Whisper encoder than the model's
    other = tmp_path / "other-feats"
    shutil.copytree(features, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["meta"] = {
        "encoder": "openai/whisper-large",
        "feature_shape": manifest.get("meta", {}).get("feature_shape"),
    }
    (other / "manifest.json").write_text(json.dumps(manifest))
    procs = {
        "bad": start(tiny, (broken, features), tmp_path / "o1"),
        "ok": start(tiny, (mixed, features), tmp_path / "o2", "--set", "max_steps=1"),
        "strict": start(tiny, (mixed, features), tmp_path / "o3", "--strict"),
        "cut": start(
            tiny, data, tmp_path / "o4", "--set", "max_steps=1", "--set", "cutoff_len=12", "--set", 'loss="response"'
        ),
        "bad_value": start(tiny, data, tmp_path / "o6", "--set", "learning_rate=fast"),
        "wrong": start(tiny, (path, other), tmp_path / "o7"),
        "no_init": subprocess.Popen(
            [sys.executable, "-m", "ltu_as", "train", "--stage", "2", "--data", str(path), "--features", str(features),
             "--out", str(tmp_path / "o5")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        ),
    }  # fmt: skip
    r = {name: finish(p) for name, p in procs.items()}
    bad = r["bad"]
    assert bad.returncode == 2 and "not JSON at line 2 column" in bad.stderr and "Traceback" not in bad.stderr
    ok = r["ok"]
    assert ok.returncode == 0, ok.stderr
    assert "item 0: instruction is null" in ok.stderr and "item 1: output is empty" in ok.stderr
    assert "1 record(s) without features" in ok.stderr
    assert r["strict"].returncode == 2 and "--strict" in r["strict"].stderr
    cut = r["cut"]
    assert cut.returncode == 2 and "whole answer lies beyond cutoff_len = 12" in cut.stderr
    assert "--set cutoff_len=" in cut.stderr and "no example to train on" in cut.stderr
    bad_value = r["bad_value"]
    assert bad_value.returncode == 2 and "learning_rate must be float, got 'fast'" in bad_value.stderr
    assert "loading" not in bad_value.stderr  # refused before any model loads
    wrong = r["wrong"]
    assert wrong.returncode == 2 and "were made with the Whisper encoder 'openai/whisper-large'" in wrong.stderr
    no_init = r["no_init"]
    assert no_init.returncode == 2 and "--init" in no_init.stderr and "--from-scratch" in no_init.stderr


def test_two_processes_with_torchrun_on_cpu_write_one_output(tiny, data, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2` on CPU (gloo): both ranks train their share of each batch, only rank 0 writes
    checkpoints, metrics and the output, and it trained (LoRA dropout draws differ per rank, so its weights are not
    a one-process run's)."""
    path, features = data
    out = tmp_path / "ddp"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "ltu_as", "train", "--stage", "2", "--init", str(tiny.checkpoint),
        "--whisper", str(tiny.whisper), "--llm", str(tiny.llm), "--device", "cpu", "--dtype", "fp32",
        "--data", str(path), "--features", str(features), "--out", str(out),
        "--set", "max_steps=6", "--set", "batch_size=4", "--set", "micro_batch_size=2",
        "--set", "warmup_steps=2", "--set", "learning_rate=1e-3", "--set", "save_steps=3",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("stage 2 done") == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (out / "metrics.jsonl").read_text().count("\n") == 6  # one writer
    assert "Traceback" not in ddp.stderr
    trained = weights(out)
    init = load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", progress=False)
    before = init.model.trainable_state_dict()
    assert trained.keys() == before.keys()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert sum(not torch.equal(trained[k], before[k].float()) for k in trained) == len(trained)
