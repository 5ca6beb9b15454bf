"""VAD: webrtcvad on real synthesized speech, silence and noise; the segmenter's state machine on exact patterns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import ASSET_SPEECH

from daemon.capture.vad import Segmenter, SilenceBegins, SpeechEnd, SpeechStart
from daemon.config import VadConfig

SR = 16000


def energy_regions(x: np.ndarray, floor_db: float = -45.0) -> list[tuple[float, float]]:
    """Independent ground truth: runs of 30 ms frames above `floor_db`, merged across gaps under 0.5 s."""
    fr = x[: len(x) // 480 * 480].reshape(-1, 480)
    active = 10 * np.log10((fr.astype(np.float64) ** 2).mean(1) + 1e-12) > floor_db
    regions: list[list[float]] = []
    for i in np.flatnonzero(active):
        t = i * 0.03
        if regions and t - regions[-1][1] < 0.5:
            regions[-1][1] = t + 0.03
        else:
            regions.append([t, t + 0.03])
    return [(a, b) for a, b in regions]


def run(x: np.ndarray, block: int = 1600, **opts: object) -> list[SpeechStart | SpeechEnd]:
    seg = Segmenter(VadConfig(**opts))
    events: list[SpeechStart | SpeechEnd | SilenceBegins] = []
    for i in range(0, len(x), block):
        events += seg.push(x[i : i + block])
    return [e for e in events + seg.flush() if not isinstance(e, SilenceBegins)]


def test_asset_layout_matches_energy(speech: np.ndarray) -> None:
    regions = energy_regions(speech)
    for a, b in ASSET_SPEECH:  # every sentence is one energy region that starts where the layout says
        assert any(abs(ra - a) < 0.1 and rb <= b + 0.1 for ra, rb in regions), (a, b, regions)


@pytest.mark.parametrize("aggressiveness", [1, 2, 3])
def test_speech_edges_are_kept(speech: np.ndarray, aggressiveness: int) -> None:
    pre, hang = 300, 450
    ends = [
        e
        for e in run(speech, aggressiveness=aggressiveness, pre_roll_ms=pre, hangover_ms=hang)
        if isinstance(e, SpeechEnd)
    ]
    regions = energy_regions(speech)
    for a, _b in ASSET_SPEECH:
        ra, rb = next((ra, rb) for ra, rb in regions if abs(ra - a) < 0.1)
        utt = next(u for u in ends if u.start / SR <= ra + 0.05 and u.end / SR >= ra)
        # first word: the utterance starts before the first energetic frame, by about the pre-roll
        assert ra - utt.start / SR >= 0.15, (ra, utt)
        assert ra - utt.start / SR <= pre / 1000 + 0.15
        # last word: it ends after the last energetic frame, and keeps the hangover after the last voiced frame
        assert utt.end / SR >= rb
        assert utt.end - utt.speech_end == pytest.approx(hang * SR / 1000, abs=480)
        assert utt.reason == "silence"


def test_silence_and_quiet_noise_give_nothing() -> None:
    rng = np.random.default_rng(0)
    assert run(np.zeros(10 * SR, dtype=np.float32)) == []
    noise = (0.01 * rng.standard_normal(10 * SR)).astype(np.float32)  # -40 dBFS background hiss
    assert run(noise, aggressiveness=3) == []


def test_ids_and_order(speech: np.ndarray) -> None:
    events = run(speech)
    starts = [e for e in events if isinstance(e, SpeechStart)]
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert [e.index for e in starts] == [e.index for e in ends] == list(range(1, len(starts) + 1))
    for s, e in zip(starts, ends, strict=True):
        assert s.start == e.start < e.speech_end < e.end
    assert all(a.end <= b.start for a, b in itertools.pairwise(ends))


def test_block_size_does_not_matter(speech: np.ndarray) -> None:
    assert run(speech, block=160) == run(speech, block=16000) == run(speech, block=4801)


def pattern_classifier(voiced: list[int]):
    frames = iter(voiced)
    return lambda _frame: bool(next(frames, 0))


def feed_pattern(
    voiced: list[int], strip: bool = True, **opts: object
) -> list[SpeechStart | SpeechEnd | SilenceBegins]:
    cfg = VadConfig(
        **{"frame_ms": 30, "start_ms": 90, "pre_roll_ms": 60, "hangover_ms": 90, "min_speech_ms": 150,
           "speculate_ms": 30, **opts}
    )  # fmt: skip
    seg = Segmenter(cfg, is_speech=pattern_classifier(voiced))
    events = seg.push(np.zeros(len(voiced) * 480, dtype=np.float32)) + seg.flush()
    return [e for e in events if not isinstance(e, SilenceBegins)] if strip else events


def test_short_blip_is_discarded() -> None:
    # 4 voiced frames = 120 ms < min_speech 150 ms
    assert feed_pattern([0] * 5 + [1] * 4 + [0] * 10) == []


def test_exact_boundaries() -> None:
    events = feed_pattern([0] * 5 + [1] * 10 + [0] * 10)
    F = 480
    # onset at frame 5, pre-roll 2 frames; last voiced frame ends at frame 15; hangover 3 frames
    assert events == [SpeechStart(1, 3 * F), SpeechEnd(1, 3 * F, 18 * F, 15 * F, "silence")]


def test_max_length_cuts_and_continues() -> None:
    events = feed_pattern([0] * 2 + [1] * 190 + [0] * 10, max_utterance_s=1.0, cut_search_ms=300, cut_window_ms=30)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert ends[0].reason == "max_length"
    assert ends[0].end - ends[0].start == pytest.approx(SR, abs=480)
    assert ends[1].start == ends[0].end  # the next one starts where the cut was
    assert ends[-1].reason == "silence"
    assert sum(e.end - e.start for e in ends) >= 190 * 480


def test_flush_closes_open_utterance() -> None:
    events = feed_pattern([0] * 2 + [1] * 20)
    assert events[-1] == SpeechEnd(1, 0, 22 * 480, 22 * 480, "flush")


def test_max_length_cuts_at_the_quietest_point() -> None:
    # voiced all along (music under speech keeps webrtcvad voiced), loud but for a 180 ms dip at frames 28-33
    F, frames = 480, 60
    x = np.full(frames * F, 0.3, dtype=np.float32)
    x[28 * F : 34 * F] = 0.001
    cfg = VadConfig(
        frame_ms=30, start_ms=90, pre_roll_ms=0, hangover_ms=90, min_speech_ms=150,
        max_utterance_s=1.2, cut_search_ms=480, cut_window_ms=150,
    )  # fmt: skip
    seg = Segmenter(cfg, is_speech=pattern_classifier([1] * frames))
    events = seg.push(x) + seg.flush()
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    # the cap is reached at frame 40; of the last 16 frames, the latest quietest 5-frame window is 29-33: cut at 31
    assert ends[0] == SpeechEnd(1, 0, 31 * F, 31 * F, "max_length")
    assert ends[1] == SpeechEnd(2, 31 * F, frames * F, frames * F, "flush")  # the rest opened the next at once
    assert [e.index for e in events if isinstance(e, SpeechStart)] == [1, 2]


def test_cut_search_must_fit_in_an_utterance() -> None:
    with pytest.raises(ValueError, match="cut_search_ms must be under half"):
        VadConfig(max_utterance_s=2.0, cut_search_ms=1500)


@pytest.mark.parametrize(
    ("text", "dropped"),
    [(". .", True), ("...", True), (" ♪ ", True), ("Thanks for watching!", True), ("you", True),
     ("The kettle is boiling.", False), ("20", False), ("Thank you, Anna.", False)],
)  # fmt: skip
def test_text_without_words_or_a_stock_phrase_is_not_a_transcript(text: str, dropped: bool) -> None:
    from ltu_as.serving.transcribe import is_hallucination

    assert is_hallucination(text) is dropped


def test_silence_begins_before_the_end_and_again_after_speech_resumes() -> None:
    F = 480
    # speech 5-15, a 2-frame pause (under the 3-frame hangover), speech 17-20, then silence
    events = feed_pattern([0] * 5 + [1] * 10 + [0] * 2 + [1] * 3 + [0] * 10, strip=False, speculate_ms=30)
    assert events == [
        SpeechStart(1, 3 * F),
        SilenceBegins(1, 3 * F, 15 * F, 16 * F),  # after 1 unvoiced frame: the guess that speech ended at 15
        SilenceBegins(1, 3 * F, 20 * F, 21 * F),  # speech resumed; the new guess
        SpeechEnd(1, 3 * F, 23 * F, 20 * F, "silence"),  # the same speech_end as the last guess: it stands
    ]
    # off: no guesses at all
    assert not [e for e in feed_pattern([0] * 5 + [1] * 10 + [0] * 10, strip=False, speculate_ms=0)
                if isinstance(e, SilenceBegins)]  # fmt: skip
    # never at or after the hangover (it would come after the end): clamped to the frame before
    assert Segmenter(VadConfig(hangover_ms=90, speculate_ms=400)).speculate_frames == 2
