"""Questions about the past: whether a question is about the past, and the text the LLM reads to answer it.

A history answer reads stored windows, not audio: each window becomes one line with its stream, its wall-clock
times, its scene description and its speech, in time order, as the `### Input:` of the reference prompt (the
question stays the instruction). Retrieval (`Store.search`) ranks the windows; `fit` keeps the best-ranked ones
that fit the LLM's context. The worker and the tests build the prompt with these same functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime

from ..delivery.events import Evidence, HistoryHit

# Words that point a question at the past rather than at the last 10 s (scope "auto").
_PAST = re.compile(
    r"\b(when|did|was there|were there|earlier|before|ago|yesterday|today|tonight|this morning|last (hour|night|"
    r"time|week)|since|happened|history|how many times|how often|what time)\b",
    re.IGNORECASE,
)


def wants_history(question: str) -> bool:
    """Scope `auto`: True when the question asks about the past ("when did …", "what happened since …")."""
    return bool(_PAST.search(question))


def record(hit: HistoryHit, when: Callable[[float], datetime] = datetime.fromtimestamp) -> str:
    """One stored window as a line of the prompt: `[kitchen 14:03:10-14:03:20 26 Nov] scene: …; speech: "…"`."""
    if hit.wall_start is not None and hit.wall_end is not None:
        a, b = when(hit.wall_start), when(hit.wall_end)
        span = f"{a:%H:%M:%S}-{b:%H:%M:%S} {a:%d %b}"
    else:
        span = f"{hit.start:.0f}-{hit.end:.0f} s"
    parts = [f"scene: {hit.scene}" if hit.scene else None, f'speech: "{hit.transcript}"' if hit.transcript else None]
    return f"[{hit.stream} {span}] " + ("; ".join(p for p in parts if p) or "nothing heard")


def history_input(hits: Sequence[HistoryHit]) -> str:
    """The prompt's input: the windows in time order, one per line."""
    ordered = sorted(hits, key=lambda h: (h.wall_start or 0.0, h.stream, h.start))
    return "\n".join(record(h) for h in ordered)


def fit(hits: Sequence[HistoryHit], fits: Callable[[str], bool]) -> list[HistoryHit]:
    """The best-ranked `hits` (given best first) whose `history_input` still `fits` the context; at least none."""
    kept = list(hits)
    while kept and not fits(history_input(kept)):
        kept.pop()  # the lowest-ranked goes first
    return kept


def evidence(hits: Sequence[HistoryHit]) -> list[Evidence]:
    """What `answer.done` cites: the windows of the prompt, in its order."""
    ordered = sorted(hits, key=lambda h: (h.wall_start or 0.0, h.stream, h.start))
    return [
        Evidence(id=h.id, stream=h.stream, start=h.start, end=h.end, wall_start=h.wall_start, wall_end=h.wall_end)
        for h in ordered
    ]
