"""What a fine-tuned checkpoint carries so that the daemon uses it right: the card (its question and answers),
sources that load from any directory, a missing source named as missing, small sets sized in steps, and
closed-set scoring checked against an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_training import fresh, make_store
from transformers import AutoTokenizer

from daemon.config import DaemonConfig
from daemon.understanding.memory import architecture, missing_sources
from ltu_as import CheckpointError, ModelNotFoundError
from ltu_as.loading.card import CARD_NAME, MAX_ANSWERS, TrainedOn
from ltu_as.loading.load import load_model, load_pretrained
from ltu_as.loading.sources import anchored, is_remote, recordable
from ltu_as.model.modeling import CONFIG_NAME
from ltu_as.testing import TEST_LABELS, save_llama_tokenizer
from ltu_as.training.data import Record
from ltu_as.training.trainer import STAGES, TrainConfig, Trainer, make_examples

Q = "What sound is this?"


def test_card_records_the_most_used_question_and_its_answers(tmp_path: Path) -> None:
    records = [Record(Q, a, f"{i}.wav") for i, a in enumerate(["doorbell", "smoke alarm ", "doorbell"])]
    records.append(Record("Describe the sound.", "a bell rings", "x.wav"))
    card = TrainedOn.from_records(records, steps=501, eos=True)
    assert card.question == Q and card.questions == (Q, "Describe the sound.")
    assert card.answers == ("doorbell", "smoke alarm")  # the most used question's, stripped, sorted
    assert (card.examples, card.steps, card.eos) == (4, 501, True)
    card.save(tmp_path)
    assert TrainedOn.load(tmp_path) == card
    assert TrainedOn.load(tmp_path / "nowhere") is None  # no card: the authors' checkpoint, an old folder
    open_ended = [Record(Q, f"answer {i}", f"{i}.wav") for i in range(MAX_ANSWERS + 1)]
    assert TrainedOn.from_records(open_ended, 1).answers == ()
    with pytest.raises(ValueError, match="no training records"):
        TrainedOn.from_records([], 1)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        '{"answers": []}',
        '{"questions": []}',
        '{"questions": ["q"], "answers": [""]}',
        '{"questions": ["q"], "eos": 1}',
    ],
)
def test_a_bad_card_is_an_error_that_says_what_to_do(tmp_path: Path, text: str) -> None:
    (tmp_path / CARD_NAME).write_text(text)
    with pytest.raises(CheckpointError, match="write it again"):
        TrainedOn.load(tmp_path)


def test_sources_are_recorded_absolute_and_relative_ones_found_beside_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "whisper").mkdir(parents=True)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert recordable("models/whisper") == str(tmp_path / "models" / "whisper")
    assert recordable("openai/whisper-large") == "openai/whisper-large"
    ckpt = tmp_path / "runs" / "mine"
    assert anchored("../../models/whisper", ckpt) == str(tmp_path / "models" / "whisper")  # beside the checkpoint
    assert anchored("models/whisper", ckpt) == str(tmp_path / "models" / "whisper")  # the working directory
    assert anchored("/abs/x", ckpt) == "/abs/x"
    assert anchored("openai/whisper-large", ckpt) == "openai/whisper-large"
    assert anchored("./gone", ckpt) == str(ckpt / "gone")  # where it was looked for
    assert [is_remote(s) for s in ("org/name", "authors:x", "https://h/x", "./a/b", "a/b/c", "runs/x.bin")] == [
        True, True, True, False, False, False,
    ]  # fmt: skip


def _old_checkpoint(tiny, tmp_path: Path) -> Path:
    """A checkpoint folder as older versions wrote it: the frozen parts' paths relative (as typed), here
    relative to the checkpoint folder's parent, which is where that user worked."""
    work = tmp_path / "work"
    ckpt = work / "runs" / "mine"
    model = load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", progress=False).model
    model.save_pretrained(ckpt)
    for part in ("whisper", "llm"):
        (work / "tiny").mkdir(exist_ok=True)
        (work / "tiny" / part).symlink_to(getattr(tiny, part))
    cfg = json.loads((ckpt / CONFIG_NAME).read_text())
    cfg["whisper_source"], cfg["llm_source"] = "../../tiny/whisper", "../../tiny/llm"
    (ckpt / CONFIG_NAME).write_text(json.dumps(cfg))
    return ckpt


def test_a_checkpoint_with_relative_sources_loads_from_any_directory(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _old_checkpoint(tiny, tmp_path)
    monkeypatch.chdir(tmp_path)  # not where the user trained
    model = load_pretrained(ckpt, device="cpu", progress=False)
    assert model.config.whisper_source == str((ckpt / "../../tiny/whisper").resolve())
    config = DaemonConfig.model_validate({"model": {"checkpoint": str(ckpt), "device": "cpu"}})
    assert missing_sources(config) == []
    assert architecture(config).d_llm == tiny.config.d_llm  # the tiny dims, not the paper's 7B


def test_a_missing_source_is_reported_as_missing_not_as_memory(tiny, tmp_path: Path) -> None:
    ckpt = _old_checkpoint(tiny, tmp_path)
    (tmp_path / "work" / "tiny" / "llm").unlink()  # the user moved the LLM folder
    config = DaemonConfig.model_validate({"model": {"checkpoint": str(ckpt), "device": "cpu"}})
    assert len(missing_sources(config)) == 1 and "the llm folder ../../tiny/llm" in missing_sources(config)[0]
    with pytest.raises(ModelNotFoundError, match=r"missing the llm folder .* set model.whisper / model.llm"):
        architecture(config)
    gone = DaemonConfig.model_validate({"model": {"checkpoint": str(tmp_path / "typo"), "device": "cpu"}})
    with pytest.raises(ModelNotFoundError, match=r"missing model\.checkpoint"):
        architecture(gone)
    # the given override wins over the recorded source
    fixed = DaemonConfig.model_validate({"model": {"checkpoint": str(ckpt), "llm": str(tiny.llm), "device": "cpu"}})
    assert missing_sources(fixed) == []


def test_the_fine_tune_preset_sizes_a_small_set_in_steps(tiny, loaded, tmp_path: Path) -> None:
    cfg = TrainConfig.load(STAGES / "finetune.toml", {"batch_size": 4, "micro_batch_size": 4, "save_steps": 0})
    assert cfg.min_steps == 500 and cfg.epochs == 20
    store, records = make_store(tmp_path, tiny, 12)  # 3 steps an epoch: 20 epochs would be 60 steps
    examples, _ = make_examples(loaded.processor, records, store, cfg.cutoff_len, cfg.loss, cfg.eos)
    t = Trainer(fresh(tiny), loaded.processor, examples, store, cfg, tmp_path / "a", progress=False)
    assert t.steps_per_epoch == 3 and t.total_steps == 3 * math.ceil(500 / 3) == 501
    big = TrainConfig.load(STAGES / "finetune.toml", {"batch_size": 1, "micro_batch_size": 1, "save_steps": 0})
    t = Trainer(fresh(tiny), loaded.processor, examples * 3, store, big, tmp_path / "b", progress=False)
    assert t.total_steps == 20 * 36  # 720 steps in 20 epochs: min_steps changes nothing
    fixed = TrainConfig.load(STAGES / "finetune.toml", {"max_steps": 7, "batch_size": 4, "micro_batch_size": 4})
    assert (
        Trainer(fresh(tiny), loaded.processor, examples, store, fixed, tmp_path / "c", progress=False).total_steps == 7
    )


def test_answer_log_likelihoods_match_a_direct_teacher_forced_sum(loaded) -> None:
    model, processor = loaded.model, loaded.processor
    feats = torch.randn(1, *model.config.feature_shape, generator=torch.Generator().manual_seed(1))
    answers = ["tone", "a rising whistle", "nothing at all", "noise"]
    rows = processor.answer_rows(Q, answers, "hello there", eos=True)
    got = model.answer_log_likelihoods(model.audio_embeddings(feats), rows, chunk=3)  # two chunks
    for (ids, n), value in zip(rows, got, strict=True):
        assert ids[-1] == processor.eos_token_id
        with torch.no_grad():
            logits = model(feats, [ids]).logits[0].float()  # [T + len(ids), vocab], one row: no padding
        logp = logits.log_softmax(-1)
        s = logp.shape[0]
        want = sum(float(logp[s - n - 1 + j, ids[len(ids) - n + j]]) for j in range(n))
        assert float(value) == pytest.approx(want, abs=1e-4)
    assert rows[1][1] > rows[0][1]  # longer answers score more tokens


def test_make_tiny_labels_get_the_standing_of_the_test_labels(tmp_path: Path) -> None:
    mine = ["smoke alarm", "doorbell", "kettle whistle"]
    save_llama_tokenizer(tmp_path / "mine", labels=mine)
    save_llama_tokenizer(tmp_path / "test")
    tok_mine = AutoTokenizer.from_pretrained(str(tmp_path / "mine"))
    tok_test = AutoTokenizer.from_pretrained(str(tmp_path / "test"))
    n_mine = [len(tok_mine(w, add_special_tokens=False)["input_ids"]) for w in " ".join(mine).split()]
    n_test = [len(tok_test(w, add_special_tokens=False)["input_ids"]) for w in TEST_LABELS]
    assert max(n_mine) == max(n_test) == 1, (n_mine, n_test)  # every word one token, as the test's are
