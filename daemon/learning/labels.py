"""The labelled clips: a folder dataset in the layout `ltu-as dataset from-folders` reads.

    <dir>/sounds/<folder>/answer.txt      the label, exactly as the user wrote it (the answer the model learns)
    <dir>/sounds/<folder>/<clip>.wav      10 s, 16 kHz mono, 16-bit: a window's audio
    <dir>/sounds/<folder>/<clip>.json     where it came from: {"window", "added"}

A label's folder name is its lower-case letters and digits joined by `_` ("The kettle!" → `the_kettle`), or a
hash of it when it has none. Bounded by `max_clips` and `max_bytes`: a label beyond either is refused, never an
older clip silently dropped. Writes are atomic (temporary file, then rename), so a crash leaves no half clip.
Blocking file work: the desk runs it in a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
_NOT_WORD = re.compile(r"[^a-z0-9]+")


class LabelError(Exception):
    """A label refused; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Clip:
    name: str
    window: str | None
    bytes: int
    added: float


@dataclass(frozen=True)
class LabelClass:
    label: str
    folder: str
    clips: tuple[Clip, ...]


def folder_name(label: str) -> str:
    """The folder of `label` (see the module docstring)."""
    slug = _NOT_WORD.sub("_", label.lower()).strip("_")[:48]
    return slug or "label_" + hashlib.sha1(label.encode()).hexdigest()[:10]


def clip_name(window: str, added: float) -> str:
    """`kitchen_w812_1796660111.wav`: the window and the time it was labelled (unique per label)."""
    return f"{window.replace(':', '_')}_{int(added * 1000)}.wav"


class LabelSet:
    def __init__(self, root: Path, max_clips: int, max_bytes: int) -> None:
        self.root = Path(root)
        self.sounds = self.root / "sounds"
        self.max_clips, self.max_bytes = max_clips, max_bytes
        self._lock = threading.Lock()  # one writer at a time: the bounds are checked and kept together

    def add(self, label: str, audio: np.ndarray, window: str, now: float | None = None) -> tuple[str, int]:
        """Keep `audio` (`[N]` float32 in [-1, 1] at 16 kHz) as an example of `label`. Returns the clip's name and
        the number of clips of that label now. Raises `LabelError` ("labels_full") beyond the bounds, or when
        another label already owns the folder name."""
        now = time.time() if now is None else now
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        size = len(pcm) + 44
        with self._lock:
            classes = self.classes()
            clips = sum(len(c.clips) for c in classes)
            used = sum(c.bytes for k in classes for c in k.clips)
            if clips + 1 > self.max_clips or used + size > self.max_bytes:
                raise LabelError(
                    "labels_full",
                    f"the labelled clips are at their bound ({clips} clips, {used / 2**20:.1f} MB of at most "
                    f"{self.max_clips} clips and {self.max_bytes / 2**20:.0f} MB: learn.max_clips, learn.max_mb); "
                    "remove some (label.remove) first",
                )
            folder = self.sounds / folder_name(label)
            answer = folder / "answer.txt"
            if answer.is_file() and answer.read_text(encoding="utf-8").strip() != label:
                other = answer.read_text(encoding="utf-8").strip()
                raise LabelError(
                    "bad_message", f"{label!r} and the existing label {other!r} share a folder: use that one"
                )
            folder.mkdir(parents=True, exist_ok=True)
            if not answer.is_file():
                _atomic(answer, (label + "\n").encode())
            name = clip_name(window, now)
            _atomic(folder / name.replace(".wav", ".json"), json.dumps({"window": window, "added": now}).encode())
            tmp = folder / f".{name}.tmp"
            with wave.open(str(tmp), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(SAMPLE_RATE)
                w.writeframes(pcm)
            os.replace(tmp, folder / name)
            return name, len(list(folder.glob("*.wav")))

    def classes(self) -> list[LabelClass]:
        """Every label with its clips, by label."""
        out: list[LabelClass] = []
        if not self.sounds.is_dir():
            return out
        for folder in sorted(p for p in self.sounds.iterdir() if p.is_dir()):
            answer = folder / "answer.txt"
            if not answer.is_file():
                continue
            clips = []
            for wav in sorted(folder.glob("*.wav")):
                meta = _meta(wav.with_suffix(".json"))
                clips.append(Clip(wav.name, meta.get("window"), wav.stat().st_size, float(meta.get("added", 0.0))))
            out.append(LabelClass(answer.read_text(encoding="utf-8").strip(), folder.name, tuple(clips)))
        return sorted(out, key=lambda c: c.label.lower())

    def remove(self, label: str, clip: str | None = None) -> int:
        """Delete one clip of `label`, or the whole label; returns the clips deleted. Raises `LabelError`
        ("unknown_label") when there is no such label or clip."""
        with self._lock:
            found = next((c for c in self.classes() if c.label == label), None)
            if found is None:
                raise LabelError("unknown_label", f"no label {label!r}")
            folder = self.sounds / found.folder
            if clip is None:
                shutil.rmtree(folder)
                return len(found.clips)
            if not (folder / clip).is_file():
                raise LabelError("unknown_label", f"{label!r} has no clip {clip!r}")
            (folder / clip).unlink()
            (folder / clip).with_suffix(".json").unlink(missing_ok=True)
            if not any(folder.glob("*.wav")):
                shutil.rmtree(folder)
            return 1

    def signature(self) -> str:
        """Changes whenever a clip is added or removed (a scheduled job runs only when it changed)."""
        h = hashlib.sha256()
        for c in self.classes():
            h.update(c.label.encode())
            for clip in c.clips:
                h.update(clip.name.encode())
        return h.hexdigest()[:16]


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _meta(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}
