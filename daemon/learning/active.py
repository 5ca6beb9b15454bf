"""Which learned checkpoint is in use, and the ones before it: `<learn.dir>/active.json`.

    {"checkpoint": "/var/lib/ltu-daemon/learn/runs/job-20261207-031500/checkpoint",
     "previous": ["/var/lib/ltu-daemon/learn/runs/job-20261206-031500/checkpoint"], "accuracy": 0.95}

The daemon starts on `checkpoint` when it exists (instead of `model.checkpoint`); `learn.rollback` goes back to
the newest of `previous` (or to `model.checkpoint` when there is none). Learned checkpoints beyond `keep` are
deleted with their runs. Written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
NAME = "active.json"


@dataclass
class Active:
    checkpoint: str | None = None
    previous: list[str] = field(default_factory=list)
    accuracy: float | None = None

    @classmethod
    def load(cls, root: Path) -> Active:
        path = root / NAME
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(raw.get("checkpoint"), [str(p) for p in raw.get("previous", [])], raw.get("accuracy"))
        except (OSError, ValueError, AttributeError) as e:
            log.error("%s cannot be read (%s): starting on model.checkpoint; delete it to silence this", path, e)
            return cls()

    def save(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{NAME}.tmp"
        tmp.write_text(
            json.dumps({"checkpoint": self.checkpoint, "previous": self.previous, "accuracy": self.accuracy})
        )
        os.replace(tmp, root / NAME)

    def usable(self) -> str | None:
        """The learned checkpoint to start on, if it is still there."""
        if self.checkpoint and Path(self.checkpoint).is_dir():
            return self.checkpoint
        if self.checkpoint:
            log.warning("the learned checkpoint %s is gone: starting on model.checkpoint", self.checkpoint)
        return None

    def swapped_in(self, checkpoint: Path, accuracy: float, keep: int) -> list[Path]:
        """Record `checkpoint` as in use; return the run folders beyond `keep` (for the caller to delete)."""
        if self.checkpoint:
            self.previous.insert(0, self.checkpoint)
        self.checkpoint, self.accuracy = str(checkpoint), accuracy
        extra, self.previous = self.previous[keep - 1 :], self.previous[: keep - 1]
        return [Path(p).parent for p in extra]

    def rolled_back(self) -> str | None:
        """Drop the checkpoint in use; return the one to use now (None: model.checkpoint)."""
        dropped = self.checkpoint
        self.checkpoint = self.previous.pop(0) if self.previous else None
        self.accuracy = None
        if dropped:
            shutil.rmtree(Path(dropped).parent, ignore_errors=True)
        return self.checkpoint
