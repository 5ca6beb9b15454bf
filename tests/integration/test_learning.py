"""The curriculum learns: synthetic sound classes, the shipped CLI (extract-features, train --stage 1 and 2, eval),
a tiny model whose frozen parts are initialised so that they carry signal (shared/recipes/learning-test.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


ANSWERS = {  # class folder → a multi-word answer (answer.txt)
    "tone": "a steady beep",
    "chirp": "a rising whistle",
    "noise": "bursts of static",
    "clicks": "a ticking clock",
    "silence": "nothing at all",
}


def test_fine_tune_on_a_folder_of_clips_answers_and_stops(tmp_path: Path) -> None:
    """The "teach it your own sounds" workflow through the CLI: class folders of clips → `dataset from-folders`
    → `make-tiny --labels` → `extract-features` → `train --preset fine-tune` → `eval`. Held-out accuracy ≥ 0.9,
    and the answers stop by themselves (EOS is trained): each is exactly an answer, nothing after it."""
    import wave

    from ltu_as.testing import _sound

    root = tmp_path / "sounds"
    rng = np.random.default_rng(3)
    for kind, answer in ANSWERS.items():
        (root / kind).mkdir(parents=True)
        (root / kind / "answer.txt").write_text(answer + "\n")
        for i in range(30):
            with wave.open(str(root / kind / f"{i:03d}.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((_sound(kind, rng) * 32767).astype("<i2").tobytes())
    train, test = tmp_path / "train.json", tmp_path / "test.json"
    made = ltu_as("dataset", "from-folders", root, "--out", train, "--held-out-out", test)
    assert "'a steady beep': 24 train, 6 held out" in made.stdout
    ltu_as("make-tiny", tmp_path / "tiny", "--labels", train)
    tiny = tmp_path / "tiny"
    model = ["--whisper", tiny / "whisper", "--llm", tiny / "llm", "--device", "cpu", "--dtype", "fp32"]
    feats = tmp_path / "features"
    for split in (train, test):
        ltu_as(
            "extract-features", "--data", split, "--audio-root", root, "--out", feats, *model[:2], *model[4:],
            "--batch-size", 32,
        )  # fmt: skip
    ltu_as(
        "train", "--stage", 2, "--preset", "fine-tune", "--init", tiny / "ltuas_tiny.bin", "--data", train,
        "--features", feats, "--out", tmp_path / "ft", *model,
        # the tiny checkpoint's TLTR and projector are random, not a trained stage 2 as a real --init: more epochs
        "--set", "epochs=60",
    )  # fmt: skip
    ltu_as(
        "eval", "--data", test, "--features", feats, "--checkpoint", tmp_path / "ft", "--out", tmp_path / "report",
        "--max-new-tokens", 12, *model,
    )  # fmt: skip
    acc = json.loads((tmp_path / "report.json").read_text())["my_sounds"]["value"]
    answers = [json.loads(line) for line in (tmp_path / "report.answers.jsonl").read_text().splitlines()]
    exact = sum(a["answer"].strip() == a["reference"] for a in answers) / len(answers)
    print(f"held-out accuracy {acc:.2f}, exact answers {exact:.2f}: {[a['answer'] for a in answers[:5]]}")
    assert acc >= 0.9
    assert exact >= 0.9  # stopped right after the answer (12 tokens allowed)
