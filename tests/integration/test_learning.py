"""The curriculum learns: synthetic sound classes, the shipped CLI (extract-features, train --stage 1 and 2, eval),
a tiny model whose frozen parts are initialised so that they carry signal (shared/recipes/learning-test.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltu_as.loading.load import LoadedModel, load_components
from ltu_as.model.processor import LtuAsProcessor
from ltu_as.testing import save_tiny_llama, save_tiny_whisper, write_sound_classes
from ltu_as.training.data import read_records
from ltu_as.training.evaluation import generate_answers, score
from ltu_as.training.featurestore import FeatureStore

pytestmark = [pytest.mark.integration, pytest.mark.learning]

# The recipe's settings (answer-only loss, lr 1e-3, batch 32), with 250 stage-1 steps instead of 150: with the
# linear LR decay, 150 left some seeds at 0.66-0.68 after stage 1 (0.84 with 250).
FAST = [
    "--set",
    'loss="response"',
    "--set",
    "batch_size=32",
    "--set",
    "micro_batch_size=32",
    "--set",
    "warmup_steps=10",
    "--set",
    "learning_rate=1e-3",
    "--set",
    "save_steps=0",
]


def ltu_as(*args: object) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "ltu_as", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def accuracy(report: Path) -> float:
    return json.loads(report.with_suffix(".json").read_text())["synthetic_sounds"]["value"]


def test_stages_1_and_2_learn_sound_classes(tmp_path: Path) -> None:
    whisper = save_tiny_whisper(tmp_path / "tiny" / "whisper", seed=0)  # init_std 0.2: audio carries signal
    llm = save_tiny_llama(tmp_path / "tiny" / "llm", seed=1, hidden_size=128, intermediate_size=256)
    data = tmp_path / "data"
    train = write_sound_classes(data, 64, seed=1, split="train")
    test = write_sound_classes(data, 17, seed=2, split="test")  # held out: another seed
    feats = tmp_path / "features"
    for split in (train, test):
        ltu_as(
            "extract-features",
            "--data",
            split,
            "--audio-root",
            data,
            "--out",
            feats,
            "--whisper",
            whisper,
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--batch-size",
            32,
        )
    # before: the stage-1 starting point (fresh TLTR and projector, seeded like the trainer does)
    torch.manual_seed(42)
    model = load_components(whisper=whisper, llm=llm, device="cpu", dtype="fp32", progress=False)
    records, _ = read_records(test)
    store = FeatureStore(feats)
    before = score(
        records,
        generate_answers(
            LoadedModel(model, LtuAsProcessor.from_pretrained(llm, model.config)),
            records,
            store,
            max_new_tokens=4,
            progress=False,
        ),
    )
    common = ["--data", train, "--features", feats, "--device", "cpu", "--dtype", "fp32", *FAST]
    ltu_as(
        "train",
        "--stage",
        1,
        "--out",
        tmp_path / "s1",
        "--whisper",
        whisper,
        "--llm",
        llm,
        *common,
        "--set",
        "max_steps=250",
    )
    ltu_as(
        "eval",
        "--data",
        test,
        "--features",
        feats,
        "--checkpoint",
        tmp_path / "s1",
        "--out",
        tmp_path / "r1",
        "--max-new-tokens",
        4,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    ltu_as(
        "train", "--stage", 2, "--init", tmp_path / "s1", "--out", tmp_path / "s2", *common, "--set", "max_steps=300"
    )
    ltu_as(
        "eval",
        "--data",
        test,
        "--features",
        feats,
        "--checkpoint",
        tmp_path / "s2",
        "--out",
        tmp_path / "r2",
        "--max-new-tokens",
        4,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    acc0, acc1, acc2 = before["synthetic_sounds"]["value"], accuracy(tmp_path / "r1"), accuracy(tmp_path / "r2")
    print(f"held-out accuracy: before {acc0:.2f}, after stage 1 {acc1:.2f}, after stage 2 {acc2:.2f}")
    assert acc0 <= 0.40  # chance is 0.2: label matching maps any answer to some class
    assert acc1 >= 0.60
    assert acc2 >= 0.85
    assert (tmp_path / "s2" / "ltuas.bin").is_file() and (tmp_path / "r2.md").read_text().startswith("| dataset")
