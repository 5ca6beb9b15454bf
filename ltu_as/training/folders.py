"""`ltu-as dataset from-folders`: a folder of labelled clips → Open-ASQA records (train and held-out).

Layout: one subfolder per class, holding that class's clips in any format PyAV reads (`.wav`, `.flac`, `.ogg`,
`.mp3`, `.m4a`, `.opus`). The answer is the folder's name with `_` and `-` as spaces (`smoke_alarm/` → "smoke
alarm"), or the first line of an `answer.txt` in the folder ("a smoke alarm is beeping"). Every clip asks the same
question. The held-out share is drawn per class (so each class is in both splits), with a fixed seed.

    sounds/
      smoke_alarm/  answer.txt  001.wav  002.wav ...
      doorbell/     ding.flac  ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .data import Record

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".webm")
DEFAULT_QUESTION = "What sound is this?"


@dataclass(frozen=True)
class FolderDataset:
    train: list[Record]
    held_out: list[Record]
    answers: dict[str, str]  # class folder → answer
    skipped: list[str]  # files that are not audio (by suffix)


def answer_for(folder: Path) -> str:
    """The class's answer: `answer.txt`'s first line, else the folder name with `_`/`-` as spaces."""
    note = folder / "answer.txt"
    if note.is_file():
        line = note.read_text(encoding="utf-8").strip().splitlines()
        if line and line[0].strip():
            return line[0].strip()
    return folder.name.replace("_", " ").replace("-", " ").strip()


def from_folders(
    root: str | Path,
    *,
    question: str = DEFAULT_QUESTION,
    held_out: float = 0.2,
    seed: int = 0,
    dataset: str = "my_sounds",
) -> FolderDataset:
    """Records for every clip under `root/<class>/` (audio ids relative to `root`). Raises ValueError when `root`
    has no class folder with clips, or a class has too few clips to hold any out."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of class folders")
    if not 0 <= held_out < 1:
        raise ValueError("the held-out fraction must be in [0, 1)")
    train: list[Record] = []
    test: list[Record] = []
    answers: dict[str, str] = {}
    skipped: list[str] = []
    rng = random.Random(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        clips = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
        skipped += [str(p.relative_to(root)) for p in files if p not in clips and p.name != "answer.txt"]
        if not clips:
            continue
        answers[folder.name] = answer_for(folder)
        rng.shuffle(clips)
        n_test = round(len(clips) * held_out)
        if held_out and n_test == 0:
            raise ValueError(f"{folder.name}/ has {len(clips)} clip(s): too few to hold {held_out:.0%} out")
        for i, clip in enumerate(clips):
            record = Record(question, answers[folder.name], str(clip.relative_to(root)), "", dataset, "cla_label")
            (test if i < n_test else train).append(record)
    if not answers:
        raise ValueError(f"{root} has no class folder with audio clips ({', '.join(AUDIO_SUFFIXES)})")
    return FolderDataset(train, test, answers, skipped)
