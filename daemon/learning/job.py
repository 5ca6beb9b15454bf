"""A fine-tune job over the labelled clips, as `ltu-as` runs it from the command line (docs/training.md), in child
processes so that training never competes with the daemon's model thread for the interpreter, and a crash or an
out-of-memory in training cannot take the daemon down:

1. dataset: `from_folders` on the labelled clips → `train.json` and `test.json` (`held_out` of each class);
2. features: `ltu-as extract-features` for both (kept across jobs in `feats-<encoder>/`, so a clip is encoded
   once);
3. train: `ltu-as train --stage 2 --preset fine-tune --init <the checkpoint in use>` → `runs/<job>/checkpoint`;
4. eval: `ltu-as eval` of the new checkpoint and of the one in use on the held-out clips.

`run` blocks (call it in a thread that owns the job) and reports each phase through `progress`. The result says
whether the new checkpoint is at least as good as the one in use (`better`); the swap itself is the desk's.
`cancel` ends the running child and the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]  # phase, done, total, detail
_STEPS = re.compile(r"(\d+) examples, (\d+) steps of")
POLL_S = 0.5


class JobFailed(Exception):
    """A step of the job failed; the message says which and why (the tail of its log)."""


@dataclass(frozen=True)
class JobPlan:
    root: Path  # learn.dir
    job: str  # its name: runs/<job>/ holds everything it writes
    init: str  # the checkpoint it starts from: the one in use
    current: str  # the checkpoint in use, scored on the same held-out clips
    whisper: str | None = None  # model.whisper / model.llm, when the config gives them
    llm: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    held_out: float = 0.2
    train_set: tuple[str, ...] = ()  # extra --set key=value for `ltu-as train`

    @property
    def folder(self) -> Path:
        return self.root / "runs" / self.job

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"


@dataclass(frozen=True)
class JobResult:
    accuracy: float  # the new checkpoint's, held out
    previous_accuracy: float  # the one in use, on the same clips
    checkpoint: Path
    examples: int
    held_out: int

    @property
    def better(self) -> bool:
        """Not worse: a tie swaps, so a job on more labels of the same quality still takes their new answers."""
        return self.accuracy >= self.previous_accuracy


class FineTuneJob:
    def __init__(self, plan: JobPlan, progress: Progress) -> None:
        self.plan, self.progress = plan, progress
        self._child: subprocess.Popen[str] | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                self._child.terminate()

    def run(self) -> JobResult:
        """Raises `JobFailed` (with the reason) when a step fails or the job was cancelled."""
        from ltu_as.training.folders import from_folders

        p = self.plan
        p.folder.mkdir(parents=True, exist_ok=True)
        self.progress("dataset", 0, 0, "splitting the labelled clips")
        try:
            found = from_folders(p.root / "sounds", held_out=p.held_out, seed=0)
        except ValueError as e:
            raise JobFailed(f"the labelled clips do not make a dataset: {e}") from None
        train, test = p.folder / "train.json", p.folder / "test.json"
        train.write_text(json.dumps([asdict(r) for r in found.train], indent=1))
        test.write_text(json.dumps([asdict(r) for r in found.held_out], indent=1))
        n_train, n_test = len(found.train), len(found.held_out)
        self.progress("dataset", 1, 1, f"{len(found.answers)} labels: {n_train} clips to train on, {n_test} held out")

        feats = p.root / f"feats-{hashlib.sha1((p.whisper or p.init).encode()).hexdigest()[:8]}"
        whisper = ["--whisper", p.whisper] if p.whisper else []
        models = [*whisper, *(["--llm", p.llm] if p.llm else [])]
        device = ["--device", p.device, "--dtype", p.dtype]
        sounds = str(p.root / "sounds")
        for i, split in enumerate((train, test)):
            self.progress("features", i, 2, f"encoding the clips of {split.name}")
            args = ["extract-features", "--data", str(split), "--audio-root", sounds, "--out", str(feats)]
            self._ltu_as("features", [*args, *whisper, *device])
        self.progress("features", 2, 2, "features ready")

        overrides = [a for kv in p.train_set for a in ("--set", kv)]
        self._ltu_as(
            "train",
            ["train", "--stage", "2", "--preset", "fine-tune", "--init", p.init, "--data", str(train),
             "--features", str(feats), "--out", str(p.checkpoint), "--overwrite", *models, *device, *overrides],
            watch=p.checkpoint / "metrics.jsonl",
        )  # fmt: skip

        scores = []
        for i, (name, ckpt) in enumerate((("new", str(p.checkpoint)), ("current", p.current))):
            self.progress("eval", i, 2, f"scoring the {name} checkpoint on {n_test} held-out clips")
            report = p.folder / f"eval-{name}"
            self._ltu_as(
                f"eval-{name}",
                ["eval", "--data", str(test), "--features", str(feats), "--checkpoint", ckpt, "--out", str(report),
                 "--max-new-tokens", "24", *models, *device],
            )  # fmt: skip
            results = json.loads(report.with_suffix(".json").read_text())
            scores.append(float(next(iter(results.values()))["value"]))
        self.progress("eval", 2, 2, f"held-out accuracy: new {scores[0]:.2f}, in use {scores[1]:.2f}")
        return JobResult(scores[0], scores[1], p.checkpoint, n_train, n_test)

    def _ltu_as(self, step: str, args: Sequence[str], watch: Path | None = None) -> None:
        """Run `python -m ltu_as ARGS`, its output to `<step>.log`; while training, report the steps written to
        `watch` (metrics.jsonl) against the total the trainer announces."""
        if self._cancelled.is_set():
            raise JobFailed("cancelled")
        logfile = self.plan.folder / f"{step}.log"
        cmd = [sys.executable, "-m", "ltu_as", *args]
        log.info("learn %s: %s", self.plan.job, " ".join(cmd[2:]))
        with open(logfile, "w") as out:
            with self._lock:
                self._child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
            child = self._child
            total = done = 0
            while child.poll() is None:
                time.sleep(POLL_S)
                if watch is None:
                    continue
                if not total and (m := _STEPS.search(logfile.read_text(errors="replace"))):
                    total = int(m.group(2))
                steps = _lines(watch)
                if steps != done:
                    done = steps
                    self.progress("train", done, total, f"step {done} of {total or '?'}")
        if self._cancelled.is_set():
            raise JobFailed("cancelled")
        if child.returncode != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
            raise JobFailed(f"{step} failed (exit {child.returncode}, {logfile}): " + " | ".join(tail))
        if watch is not None:
            self.progress("train", total, total, "trained")


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
