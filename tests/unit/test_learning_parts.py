"""The parts of teaching the daemon: the labelled clips (a folder dataset that `ltu-as dataset from-folders`
reads back), their bounds under any sequence of labels and removals, which learned checkpoint is in use, and the
daily schedule."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from daemon.learning.active import Active
from daemon.learning.desk import seconds_until
from daemon.learning.labels import LabelError, LabelSet, folder_name
from ltu_as.training.folders import from_folders

SECOND = 16000


def tone(seed: int, n: int = SECOND) -> np.ndarray:
    return (0.5 * np.sin(np.arange(n) * (0.01 + seed / 1000))).astype(np.float32)


def test_folder_names() -> None:
    assert folder_name("The kettle!") == "the_kettle"
    assert folder_name("smoke alarm") == "smoke_alarm"
    assert folder_name("門鈴").startswith("label_") and folder_name("門鈴") != folder_name("鈴")


def test_labelled_clips_are_a_folder_dataset_that_from_folders_reads(tmp_path: Path) -> None:
    labels = LabelSet(tmp_path, max_clips=100, max_bytes=10 * 2**20)
    audio = tone(1)
    for i in range(5):
        name, n = labels.add("The kettle!", audio, f"kitchen:w{i + 1}", now=1000.0 + i)
        assert n == i + 1 and name == f"kitchen_w{i + 1}_{1000000 + 1000 * i}.wav"
    for i in range(3):
        labels.add("doorbell", tone(2 + i), f"hall:w{i + 1}", now=2000.0 + i)
    with wave.open(str(tmp_path / "sounds" / "the_kettle" / "kitchen_w1_1000000.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        back = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767
    np.testing.assert_allclose(back, audio, atol=1 / 32767)
    classes = labels.classes()
    assert [(c.label, c.folder, len(c.clips)) for c in classes] == [
        ("doorbell", "doorbell", 3),
        ("The kettle!", "the_kettle", 5),
    ]
    assert classes[1].clips[0].window == "kitchen:w1" and classes[1].clips[0].added == 1000.0
    found = from_folders(tmp_path / "sounds", held_out=0.2, seed=0)  # the trainer's reader, independent of ours
    assert sorted(found.answers.values()) == ["The kettle!", "doorbell"]
    assert (len(found.train), len(found.held_out)) == (6, 2)


def test_bounds_and_removal_say_what_to_do(tmp_path: Path) -> None:
    labels = LabelSet(tmp_path, max_clips=2, max_bytes=10 * 2**20)
    labels.add("a", tone(1), "s:w1")
    labels.add("b", tone(2), "s:w2")
    with pytest.raises(LabelError, match=r"learn\.max_clips.*label\.remove") as e:
        labels.add("a", tone(3), "s:w3")
    assert e.value.code == "labels_full"
    small = LabelSet(tmp_path / "small", max_clips=10, max_bytes=SECOND * 2 + 100)
    small.add("a", tone(1), "s:w1")
    with pytest.raises(LabelError, match="MB"):
        small.add("a", tone(2), "s:w2")
    with pytest.raises(LabelError) as e:
        labels.remove("nope")
    assert e.value.code == "unknown_label"
    with pytest.raises(LabelError, match="no clip"):
        labels.remove("a", "x.wav")
    before = labels.signature()
    assert labels.remove("a") == 1 and labels.signature() != before
    assert [c.label for c in labels.classes()] == ["b"]
    name = labels.classes()[0].clips[0].name
    assert labels.remove("b", name) == 1 and labels.classes() == []  # the empty label's folder goes too


def test_labels_that_share_a_folder_are_refused(tmp_path: Path) -> None:
    labels = LabelSet(tmp_path, max_clips=10, max_bytes=2**30)
    labels.add("Door bell", tone(1), "s:w1")
    with pytest.raises(LabelError, match="share a folder"):
        labels.add("door-bell", tone(2), "s:w2")


class LabelMachine(RuleBasedStateMachine):
    """Any sequence of labels and removals: the bounds hold, nothing is lost or invented (a model dict of what
    was added and removed agrees with the folders)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.max_clips, self.clip_bytes = 6, SECOND // 4 * 2 + 44
        self.labels = LabelSet(self.dir, self.max_clips, self.clip_bytes * 5)  # bytes bind first: 5 clips
        self.model: dict[str, set[str]] = {}
        self.t = 0.0

    @rule(label=st.sampled_from(["tone", "chirp", "door bell"]))
    def add(self, label: str) -> None:
        self.t += 1
        total = sum(len(v) for v in self.model.values())
        try:
            name, n = self.labels.add(label, tone(int(self.t), SECOND // 4), f"s:w{int(self.t)}", now=self.t)
        except LabelError as e:
            assert e.code == "labels_full" and total == 5
            return
        self.model.setdefault(label, set()).add(name)
        assert n == len(self.model[label])

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def remove_one(self, data: st.DataObject) -> None:
        label = data.draw(st.sampled_from(sorted(k for k, v in self.model.items() if v)))
        clip = data.draw(st.sampled_from(sorted(self.model[label])))
        assert self.labels.remove(label, clip) == 1
        self.model[label].discard(clip)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def remove_label(self, data: st.DataObject) -> None:
        label = data.draw(st.sampled_from(sorted(k for k, v in self.model.items() if v)))
        assert self.labels.remove(label) == len(self.model.pop(label))

    @invariant()
    def agrees(self) -> None:
        got = {c.label: {k.name for k in c.clips} for c in self.labels.classes()}
        assert got == {k: v for k, v in self.model.items() if v}
        clips = [k for c in self.labels.classes() for k in c.clips]
        assert len(clips) <= self.max_clips and sum(k.bytes for k in clips) <= self.clip_bytes * 5


TestLabelMachine = LabelMachine.TestCase
TestLabelMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)


def test_active_checkpoints_keep_and_roll_back(tmp_path: Path) -> None:
    runs = []
    for i in range(4):
        ckpt = tmp_path / "runs" / f"job-{i}" / "checkpoint"
        ckpt.mkdir(parents=True)
        runs.append(ckpt)
    a = Active.load(tmp_path)
    assert a.checkpoint is None and a.usable() is None
    assert a.swapped_in(runs[0], 0.8, keep=2) == []
    assert a.swapped_in(runs[1], 0.9, keep=2) == []
    assert a.swapped_in(runs[2], 1.0, keep=2) == [runs[0].parent]  # beyond keep: the caller deletes it
    a.save(tmp_path)
    b = Active.load(tmp_path)
    assert (b.checkpoint, b.previous, b.accuracy) == (str(runs[2]), [str(runs[1])], 1.0)
    assert b.rolled_back() == str(runs[1]) and not runs[2].exists()
    assert b.rolled_back() is None and b.checkpoint is None
    (tmp_path / "active.json").write_text("{not json")
    assert Active.load(tmp_path).checkpoint is None  # a corrupt file: start on model.checkpoint, said in the log
    (tmp_path / "active.json").write_text(json.dumps({"checkpoint": str(tmp_path / "gone")}))
    assert Active.load(tmp_path).usable() is None


def test_seconds_until_the_daily_run() -> None:
    now = dt.datetime(2026, 12, 7, 2, 59, 30)
    assert seconds_until("03:00", now) == 30
    assert seconds_until("03:00", now.replace(hour=3, minute=0, second=0)) == 86400
    assert seconds_until("00:00", dt.datetime(2026, 12, 31, 23, 0)) == 3600
