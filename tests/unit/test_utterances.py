"""The stream's utterance state machine, proven with a stateful property test.

Hypothesis drives the real `StreamPipeline` and the real `AsrWorker` queues (its decoding thread replaced by the
test, which takes jobs in the worker's own order and completes them in any order, with text, without, or failed):
VAD starts, voiced stretches, silences that begin (speculative decodes), confirmed ends (matching the last silence,
or cut elsewhere), partials, and a stop. After every step, and after a final drain:

- every `speech.start` id gets exactly one `transcript.final`, and finals leave in id order;
- a final's text comes from a decode of exactly its own audio (same start, same last voiced frame, nothing past its
  end), or it is empty with outcome no_speech or failed;
- no partial follows its utterance's final;
- nothing waits forever: once every decode has come back, no utterance is left open and the last window reaches
  the end of the stream.

`test_the_property_test_finds_the_lost_final_race` runs the same machine against the bug issue 21 reported (a
superseded speculative decode that finishes after the hangover confirmed a later end took that end with it) and
requires the machine to find it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from daemon.capture.vad import SilenceBegins, SpeechEnd, SpeechStart
from daemon.clock import SAMPLE_RATE
from daemon.config import AsrConfig, AudioConfig, VadConfig, WindowsConfig
from daemon.delivery.events import FinalEvent, PartialEvent, SpeechStartEvent, StreamEvent, WindowEvent
from daemon.reply import Reply
from daemon.speech.asr import AsrJob, AsrResult, AsrWorker
from daemon.speech.utterances import Utterances
from daemon.stream import StreamPipeline

FRAME = 480  # 30 ms: every position in this test is a whole frame, exact on the events' 0.1 ms clock
EXAMPLES = 300


def samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def decoded(job: AsrJob) -> str:
    """The fake decode's text: which audio it decoded, so a final can be traced to its decode."""
    if job.end is None:
        return f"partial {job.index} {job.start} {job.stop}"
    return f"final {job.index} {job.start} {job.stop} {job.end.speech_end}"


class UtteranceMachine(RuleBasedStateMachine):
    book: type[Utterances] = Utterances

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.events: list[StreamEvent] = []
        self.asr = AsrWorker(AsrConfig(final_queue=10_000))  # its thread never starts: the test decodes
        self.pipeline = StreamPipeline(
            "s",
            "file",
            audio=AudioConfig(ring_seconds=120),
            vad=VadConfig(),
            asr=AsrConfig(),
            windows=WindowsConfig(),
            publish=self.events.append,
            asr_worker=self.asr,
        )
        self.pipeline.open_utterances = self.book()
        self.pipeline._on_result = Reply(self.loop, self.pipeline.on_result)
        self.inflight: list[AsrJob] = []
        self.index = 0
        self.open: dict[str, int] | None = None  # start, speech_end, silent (0/1) of the VAD's open utterance
        self.floor = 0  # an utterance starts no earlier than the previous one's end
        self.stopped = False

    def teardown(self) -> None:
        self.loop.close()

    # --- the audio and the VAD ---

    @property
    def pos(self) -> int:
        return self.pipeline.ring.end

    def _advance(self, frames: int) -> None:
        self.pipeline.ring.write(np.zeros(frames * FRAME, np.float32))
        self.pipeline._close_windows()

    def _vad(self, ev: SpeechStart | SpeechEnd | SilenceBegins) -> None:
        self.loop.run_until_complete(self.pipeline._vad_event(ev))
        self._settle()

    def _settle(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))  # the replies the worker scheduled run now

    @precondition(lambda self: not self.stopped)
    @rule(frames=st.integers(1, 140))
    def audio(self, frames: int) -> None:
        """Time passes (up to 4.2 s): voiced if an utterance is open and not silent, else unvoiced."""
        self._advance(frames)
        if self.open is not None and not self.open["silent"]:
            self.open["speech_end"] = self.pos

    @precondition(lambda self: not self.stopped and self.open is None)
    @rule(pre_roll=st.integers(0, 10), voiced=st.integers(1, 30))
    def speech_starts(self, pre_roll: int, voiced: int) -> None:
        start = max(self.floor, self.pos - pre_roll * FRAME)
        self._advance(voiced)
        self.index += 1
        self.open = {"start": start, "speech_end": self.pos, "silent": 0}
        self._vad(SpeechStart(self.index, start))

    @precondition(lambda self: self.open is not None and self.open["silent"])
    @rule(voiced=st.integers(1, 30))
    def speech_resumes(self, voiced: int) -> None:
        assert self.open is not None
        self._advance(voiced)
        self.open.update(speech_end=self.pos, silent=0)

    @precondition(lambda self: self.open is not None and not self.open["silent"])
    @rule(unvoiced=st.integers(1, 5))
    def silence_begins(self, unvoiced: int) -> None:
        assert self.open is not None
        self._advance(unvoiced)
        self.open["silent"] = 1
        self._vad(SilenceBegins(self.index, self.open["start"], self.open["speech_end"], self.pos))

    @precondition(lambda self: self.open is not None)
    @rule(hangover=st.integers(0, 15), cut=st.booleans())
    def speech_ends(self, hangover: int, cut: bool) -> None:
        """The hangover confirms the end (after the last silence), or the length cap cuts the utterance."""
        assert self.open is not None
        u, self.open = self.open, None
        self._advance(hangover)
        speech_end = self.pos if cut else u["speech_end"]
        self.floor = self.pos
        self._vad(SpeechEnd(self.index, u["start"], self.pos, speech_end, "max_length" if cut else "silence"))

    @precondition(lambda self: self.open is not None and not self.open["silent"])
    @rule()
    def partial(self) -> None:
        assert self.open is not None
        start = self.open["start"]
        self.asr.offer_partial(self.pipeline._job(self.index, start, self.pos, None))

    # --- the ASR: jobs taken in its order, results back in any order ---

    @rule(limit=st.integers(1, 3))
    def asr_takes(self, limit: int) -> None:
        self.inflight += self.asr.take(limit)

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 100), how=st.sampled_from(["text", "text", "empty", "failed"]))
    def asr_finishes(self, pick: int, how: str) -> None:
        job = self.inflight.pop(pick % len(self.inflight))
        text = decoded(job) if how == "text" else ""
        self.asr.deliver(job, text, 0, 0.01, job.submitted, failed=how == "failed")
        self._settle()

    @precondition(lambda self: not self.stopped)
    @rule()
    def stop(self) -> None:
        """The stream ends: the open utterance is flushed; later steps only decode."""
        self.stopped = True
        if self.open is not None:
            u, self.open = self.open, None
            self._vad(SpeechEnd(self.index, u["start"], self.pos, u["speech_end"], "flush"))
        self.pipeline.ended = True
        self.pipeline._close_windows()

    # --- what must hold ---

    def _of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @invariant()
    def finals_are_whole_ordered_and_traceable(self) -> None:
        starts = [e.id for e in self._of(SpeechStartEvent)]
        finals = self._of(FinalEvent)
        ids = [f.id for f in finals]
        assert ids == starts[: len(ids)], f"finals out of id order or not one per start: {ids} vs {starts}"
        for f in finals:
            index = int(f.id.split("/")[1])
            if f.outcome != "speech":
                assert f.text == "" and f.outcome in ("no_speech", "failed"), f
                continue
            kind, i, start, stop, speech_end = f.text.split()
            assert kind == "final" and int(i) == index, f"final {f.id} carries another decode's text: {f.text}"
            assert int(start) == samples(f.start), f"final {f.id} decoded from another start: {f.text}"
            assert int(speech_end) == samples(f.speech_end), f"{f.id}: decoded for another end: {f.text}"
            assert int(stop) <= samples(f.end), f"{f.id}: decoded audio past its end: {f.text}"

    @invariant()
    def no_partial_after_its_final(self) -> None:
        done: set[str] = set()
        for e in self.events:
            if isinstance(e, FinalEvent):
                done.add(e.id)
            elif isinstance(e, PartialEvent):
                assert e.id not in done, f"partial of {e.id} after its final"
                assert e.text.startswith(f"partial {e.id.split('/')[1]} ") or (e.text == "" and e.revision > 1), e

    def drain(self) -> None:
        """Stop, then let the ASR finish everything it holds."""
        if not self.stopped:
            self.stop()
        while True:
            self.inflight += self.asr.take(100)
            if not self.inflight:
                break
            for job in self.inflight:
                self.asr.deliver(job, decoded(job), 0, 0.01, job.submitted)
            self.inflight = []
            self._settle()


def check_drained(machine: UtteranceMachine) -> None:
    """Nothing waits forever: every start has its final, and the windows reach the end of the stream."""
    machine.drain()
    starts = [e.id for e in machine._of(SpeechStartEvent)]
    finals = [e.id for e in machine._of(FinalEvent)]
    assert finals == starts, f"utterances without a final after every decode came back: {set(starts) - set(finals)}"
    assert len(machine.pipeline.open_utterances) == 0
    windows = machine._of(WindowEvent)
    if machine.pos >= samples(0.5):
        assert windows and samples(windows[-1].end) == machine.pos, "the stream's last audio is in no window"


class DrainedMachine(UtteranceMachine):
    def teardown(self) -> None:
        try:
            check_drained(self)
        finally:
            super().teardown()


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never flakes, and a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_every_start_gets_one_final_in_order_from_its_own_audio() -> None:
    run_state_machine_as_test(DrainedMachine, settings=SETTINGS)


class LostFinalBug(Utterances):
    """The race issue 21 reported, as the old code had it: a speculative result whose utterance's end is already
    confirmed, but which is not the decode chosen for that end, took the awaiting end with it."""

    def result(self, r: AsrResult) -> None:
        u = self._open.get(r.job.index)
        if u is not None and r.job.speculative and u.end is not None and r.job is not u.decode:
            u.decode = None
        super().result(r)


class BuggyMachine(DrainedMachine):
    book = LostFinalBug


def test_the_property_test_finds_the_lost_final_race() -> None:
    """The property test can fail: against the old race it finds a start without a final, within its budget."""
    # Up to 2000 examples: the search stops at the first failure, so the budget costs nothing when it finds the
    # race early. With 300, the same derandomized search missed it in some processes (after test_training.py had
    # run in the same session, on this 2-core machine), which made the suite's outcome depend on test order.
    with pytest.raises(AssertionError, match="without a final"):
        run_state_machine_as_test(
            BuggyMachine,
            settings=settings(SETTINGS, max_examples=2000, phases=[Phase.explicit, Phase.reuse, Phase.generate]),
        )
