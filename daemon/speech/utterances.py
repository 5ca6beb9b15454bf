"""One stream's utterances, from the VAD's events to their finals: a pure state machine (no asyncio, no clock, no
threads), driven by the stream pipeline and proven by a stateful property test (`tests/unit/test_utterances.py`).

What it promises, whatever order decodes come back in:

- every confirmed utterance (`SpeechStart`) gets exactly one final, and finals leave in utterance order (a result
  for a later utterance waits until every earlier one has its final);
- a final's text comes from one decode of the utterance's own audio: the speculative decode started when silence
  began, kept when the hangover confirms an end with the same last voiced frame and nothing past that end was
  decoded, or else a decode of [start, end) started when the end was confirmed;
- a speculative decode that speech resumed after is *superseded*: its result is ignored whenever it arrives (it
  once took the confirmed end with it, and the final that should have followed never came);
- a partial is wanted only while its utterance's end is not confirmed, so no partial follows its final.

The pipeline asks the ASR for the decodes this machine names and hands every result back through `result`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capture.vad import SpeechEnd
from .asr import AsrJob, AsrResult


@dataclass
class _Utterance:
    start: int
    guess: AsrJob | None = None  # the newest speculative decode (before the end is confirmed)
    guessed: AsrResult | None = None  # its result, if back already
    end: SpeechEnd | None = None  # the confirmed end
    decode: AsrJob | None = None  # the decode whose result becomes the final
    result: AsrResult | None = None


@dataclass(frozen=True)
class Ending:
    """What a confirmed end asks of the ASR: `promote` the guess that stands for it, or `decode` the utterance
    anew (the caller makes the job and calls `decoding`); `withdraw` a stale guess that need not run."""

    promote: AsrJob | None
    withdraw: AsrJob | None

    @property
    def decode(self) -> bool:
        return self.promote is None


@dataclass
class Speculation:
    """Counts for /healthz: speculative decodes started, used for a final, wasted (superseded or not matching)."""

    started: int = 0
    used: int = 0
    wasted: int = 0


@dataclass
class Utterances:
    """The open utterances of one stream (confirmed, final not yet out), oldest first."""

    _open: dict[int, _Utterance] = field(default_factory=dict)
    speculation: Speculation = field(default_factory=Speculation)

    def __len__(self) -> int:
        return len(self._open)

    def starts(self) -> list[int]:
        """Start samples of the utterances without a final (windows overlapping them wait)."""
        return [u.start for u in self._open.values()]

    def started(self, index: int, start: int) -> None:
        """Utterance `index` was confirmed at sample `start`."""
        if index in self._open or (self._open and index < max(self._open)):
            raise ValueError(f"utterance {index} started out of order")
        self._open[index] = _Utterance(start)

    def speculating(self, job: AsrJob) -> AsrJob | None:
        """`job` (speculative) decodes utterance `job.index` up to the silence that just began. Returns the guess it
        supersedes (withdraw it from the ASR), if any."""
        u = self._open.get(job.index)
        if u is None or u.end is not None:
            raise ValueError(f"speculative decode for utterance {job.index}, which is not open")
        old, u.guess, u.guessed = u.guess, job, None
        self.speculation.started += 1
        if old is not None:
            self.speculation.wasted += 1  # speech resumed after that silence
        return old

    def ended(self, end: SpeechEnd) -> Ending:
        """The VAD confirmed `end`. The utterance's guess stands for it when nothing was voiced after the silence
        the guess saw began (same last voiced frame) and it decoded no audio past the end."""
        u = self._open.get(end.index)
        if u is None or u.end is not None:
            raise ValueError(f"end of utterance {end.index}, which is not open")
        u.end = end
        guess, u.guess = u.guess, None
        if guess is not None and same_end(guess, end):
            self.speculation.used += 1
            u.decode, u.result = guess, u.guessed
            return Ending(promote=guess, withdraw=None)
        if guess is not None:
            self.speculation.wasted += 1
        return Ending(promote=None, withdraw=guess)

    def decoding(self, job: AsrJob) -> None:
        """`job` decodes the utterance's audio after its end was confirmed (when `ended` said `decode`)."""
        u = self._open.get(job.index)
        if u is None or u.end is None or u.decode is not None:
            raise ValueError(f"decode for utterance {job.index}, which does not wait for one")
        u.decode = job

    def result(self, r: AsrResult) -> None:
        """A final or speculative decode came back (a superseded one is ignored)."""
        u = self._open.get(r.job.index)
        if u is None:
            return  # its final went out already (a guess decoded twice, say)
        if r.job is u.decode:
            u.result = r
        elif r.job is u.guess:
            u.guessed = r

    def ready(self) -> list[tuple[SpeechEnd, AsrResult]]:
        """The finals that can go out now, in utterance order (each exactly once)."""
        out: list[tuple[SpeechEnd, AsrResult]] = []
        while self._open:
            index, u = next(iter(self._open.items()))
            if u.end is None or u.result is None:
                break
            out.append((u.end, u.result))
            del self._open[index]
        return out

    def wants_partial(self, index: int) -> bool:
        """Whether a partial of utterance `index` may still go out (its end is not confirmed yet)."""
        u = self._open.get(index)
        return u is not None and u.end is None


def same_end(guess: AsrJob, end: SpeechEnd) -> bool:
    """A speculative decode stands for the confirmed end when nothing was voiced after the silence it saw began
    (same last voiced frame) and it decoded no audio past the utterance's end."""
    return (
        guess.end is not None
        and guess.index == end.index
        and guess.start == end.start
        and guess.end.speech_end == end.speech_end
        and guess.stop <= end.end
    )
