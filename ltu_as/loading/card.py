"""What a checkpoint was trained to answer: `ltu_as_trained.json`, written by `ltu-as train` beside
`ltu_as_config.json`.

A fine-tuned checkpoint knows one question well ("What sound is this?") and a closed set of answers ("doorbell",
"smoke alarm", ...); asked anything else, a small fine-tune answers badly. The card records both, so the daemon's
scenes ask the question the checkpoint was trained on (`TrainedOn.question`), `ltu-daemon check` warns when the
config asks another, and a closed-set scene can score each known answer (`ltu_as.model.modeling.answer_scores`).

    {"questions": ["What sound is this?"], "answers": ["doorbell", "smoke alarm"], "examples": 48, "steps": 501,
     "eos": true}

`questions`: every instruction of the training records, the most used first. `answers`: the distinct answers to
the most used question, sorted, when there are at most `MAX_ANSWERS` of them (a classification task); empty for an
open-ended set such as Open-ASQA's, where no answer set exists.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

CARD_NAME = "ltu_as_trained.json"
MAX_ANSWERS = 200  # more distinct answers than this to one question: an open-ended task, no answer set


@dataclass(frozen=True)
class TrainedOn:
    questions: tuple[str, ...]  # the most used first
    answers: tuple[str, ...]  # the most used question's distinct answers, sorted; () when open-ended
    examples: int  # training examples
    steps: int  # optimizer steps
    eos: bool = True  # whether each answer was trained to end with EOS (the fine-tune preset's `eos = true`)

    @property
    def question(self) -> str:
        """The question the checkpoint was trained on most: what its scenes should ask."""
        return self.questions[0]

    @classmethod
    def from_records(cls, records: Iterable[Any], steps: int, eos: bool = True) -> TrainedOn:
        """From training records (anything with `instruction` and `output`). Raises ValueError on none."""
        rows = list(records)
        if not rows:
            raise ValueError("no training records")
        counts = Counter(r.instruction for r in rows)
        questions = tuple(q for q, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        answers = sorted({r.output.strip() for r in rows if r.instruction == questions[0]})
        return cls(questions, tuple(answers) if len(answers) <= MAX_ANSWERS else (), len(rows), steps, eos)

    def to_dict(self) -> dict[str, Any]:
        return {
            "questions": list(self.questions),
            "answers": list(self.answers),
            "examples": self.examples,
            "steps": self.steps,
            "eos": self.eos,
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, checkpoint: str | Path) -> TrainedOn | None:
        """The card of a checkpoint folder; None for a checkpoint without one (the authors' `.bin`, a folder
        written before cards existed, a hub id). Raises `CheckpointError` for a card that cannot be read."""
        path = Path(str(checkpoint)).expanduser() / CARD_NAME
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            questions = tuple(str(q) for q in raw["questions"])
            answers = tuple(str(a) for a in raw.get("answers", ()))
            if not questions or not all(q.strip() for q in questions) or not all(a.strip() for a in answers):
                raise ValueError("empty question or answer")
            eos = raw.get("eos", True)
            if not isinstance(eos, bool):
                raise ValueError(f"eos must be true or false, not {eos!r}")
            return cls(questions, answers, int(raw.get("examples", 0)), int(raw.get("steps", 0)), eos)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"cannot read {path}: {e!r}; write it again (`ltu-as train` does) or delete it to ask the default "
                "questions"
            ) from e
