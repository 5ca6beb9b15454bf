"""Training: trainable sets per stage, loss masks, exact resume, export, bad data reported, evaluation scoring."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ltu_as import load_official_checkpoint, trainable_parameter_counts
from ltu_as.loading.load import load_components, load_model
from ltu_as.training.data import Record, read_records
from ltu_as.training.evaluation import score, wer
from ltu_as.training.featurestore import FeatureEncoder, FeatureStore, extract_features
from ltu_as.training.trainer import STAGES, TrainConfig, Trainer, make_examples, set_trainable


def fresh(tiny, seed: int = 0):
    torch.manual_seed(seed)
    return load_components(whisper=tiny.whisper, llm=tiny.llm, device="cpu", dtype="fp32", progress=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_the_reference_parameters(tiny, stage: int) -> None:
    cfg = TrainConfig.load(STAGES / f"stage{stage}.toml")
    model = fresh(tiny)
    counts = set_trainable(model, cfg.trainable)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = trainable_parameter_counts(model.config)
    if stage == 1:
        assert all(n.startswith("audio_proj.") for n in names)
        assert counts == {"audio_proj": expected["audio_proj"]}
        assert cfg.learning_rate == 1e-3 and cfg.cutoff_len == 108
    else:
        assert {n.split(".")[0] for n in names} == {"audio_encoder", "audio_proj", "language_model"}
        assert all("lora_" in n for n in names if n.startswith("language_model"))
        assert counts == {
            "audio_encoder": expected["tltr"],
            "audio_proj": expected["audio_proj"],
            "lora": expected["lora"],
        }
        assert cfg.learning_rate == (1e-4 if stage == 2 else 2e-4)
        assert cfg.cutoff_len == (108 if stage == 2 else 160)
    assert cfg.batch_size == 256 and cfg.loss == "whole"


def make_store(tmp_path: Path, tiny, n: int = 12) -> tuple[FeatureStore, list[Record]]:
    """Random features in the store layout, and records about them."""
    shape = fresh(tiny).config.feature_shape
    store = FeatureStore(tmp_path / "feats")
    (store.folder / "features").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(n):
        save_file({"features": torch.randn(*shape, generator=g)}, str(store.folder / "features" / f"{i}.st"))
        store.manifest["files"][f"a{i}"] = f"{i}.st"
        records.append(Record("What sound is this?", ["tone", "noise", "silence"][i % 3], f"a{i}", "hello"))
    store.save_manifest()
    return FeatureStore(store.folder), records


def test_loss_masks_audio_pads_and_prompt(tiny, loaded, tmp_path: Path) -> None:
    store, records = make_store(tmp_path, tiny, 3)
    proc = loaded.processor
    whole, _ = make_examples(proc, records, store, 108, "whole")
    resp, _ = make_examples(proc, records, store, 108, "response")
    for w, r, rec in zip(whole, resp, records, strict=True):
        assert w.labels == [-100, *w.ids[1:]]  # BOS is never a target
        plen = len(proc.encode(rec.instruction, rec.input))
        assert r.labels[:plen] == [-100] * plen and r.labels[plen:] == r.ids[plen:] and len(r.ids) > plen
    short, _ = make_examples(proc, records, store, 10, "whole")
    assert all(len(e.ids) == len(e.labels) == 10 for e in short)
    # the model's loss over a padded batch equals an independent cross-entropy over exactly the labelled tokens
    model = loaded.model
    rows = resp[:2] + short[:1]  # different lengths: left padding
    feats = torch.stack([store.load(e.audio_id) for e in rows])
    out = model(feats, [e.ids for e in rows], [e.labels for e in rows])
    logits = out.logits.float()
    total, count = 0.0, 0
    s = logits.shape[1]
    for b, e in enumerate(rows):
        n = len(e.ids)
        for j in range(n - 1):  # position s-n+j predicts token j+1 of the row
            if e.labels[j + 1] != -100:
                total += -torch.log_softmax(logits[b, s - n + j], -1)[e.labels[j + 1]].item()
                count += 1
    assert out.loss.item() == pytest.approx(total / count, rel=1e-4)


def test_resume_gives_the_same_weights(tiny, loaded, tmp_path: Path) -> None:
    store, records = make_store(tmp_path, tiny)
    cfg = TrainConfig(
        stage=2,
        trainable=("audio_encoder", "audio_proj", "lora"),
        learning_rate=1e-3,
        max_steps=6,
        batch_size=4,
        micro_batch_size=2,
        warmup_steps=2,
        save_steps=3,
        loss="response",
    )
    examples, _ = make_examples(loaded.processor, records, store, 108, cfg.loss)

    def run(out: Path, stop_after: int | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        t = Trainer(fresh(tiny), loaded.processor, examples, store, cfg, out, progress=False)
        t.resume()
        t.train(stop_after=stop_after)
        return {k: v.clone() for k, v in t.acc.unwrap_model(t.model).trainable_state_dict().items()}

    straight = run(tmp_path / "a", None)
    run(tmp_path / "b", 3)  # interrupted after the step-3 checkpoint
    torch.manual_seed(123)  # whatever the process did meanwhile
    resumed = run(tmp_path / "b", None)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)
    assert any((straight[k] != fresh(tiny).trainable_state_dict()[k]).any() for k in straight)


def test_export_loads_back_with_zero_leftovers(tiny, loaded, tmp_path: Path) -> None:
    store, records = make_store(tmp_path, tiny, 4)
    cfg = TrainConfig(
        stage=2,
        trainable=("audio_encoder", "audio_proj", "lora"),
        max_steps=2,
        batch_size=2,
        micro_batch_size=2,
        warmup_steps=0,
        save_steps=0,
    )
    examples, _ = make_examples(loaded.processor, records, store, 108, cfg.loss)
    t = Trainer(fresh(tiny), loaded.processor, examples, store, cfg, tmp_path / "out", progress=False)
    t.train()
    folder, official = t.finish()
    target = fresh(tiny, seed=99)
    counts = load_official_checkpoint(target, official)  # strict: raises on any missing or unexpected tensor
    assert counts["tensors"] == len(target.trainable_state_dict())
    trained = t.acc.unwrap_model(t.model).trainable_state_dict()
    for k, v in target.trainable_state_dict().items():
        torch.testing.assert_close(v, trained[k])
    assert (folder / "trainable.safetensors").is_file()


def test_bad_records_are_reported(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    good = {"instruction": "q", "input": "", "output": "a", "audio_id": "x.wav"}
    p.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{broken",
                json.dumps({"instruction": "q", "output": "a"}),
                json.dumps({**good, "output": 3}),
                json.dumps({**good, "audio_id": " "}),
                "",
                json.dumps({**good, "task": "cla"}),
            ]
        )
    )
    records, bad = read_records(p)
    assert [r.audio_id for r in records] == ["x.wav", "x.wav"] and records[1].task == "cla"
    assert [(b.where, b.reason.split(":")[0]) for b in bad] == [
        ("line 2", "not JSON"),
        ("line 3", "missing audio_id"),
        ("line 4", "output must be a string, got int"),
        ("line 5", "audio_id is empty"),
    ]


def test_undecodable_audio_is_recorded_not_zeroed(tiny, tmp_path: Path) -> None:
    import wave

    import numpy as np

    (tmp_path / "a").mkdir()
    with wave.open(str(tmp_path / "a" / "ok.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 5) * 9000).astype("<i2").tobytes())
    (tmp_path / "a" / "junk.wav").write_bytes(b"not audio at all" * 20)
    enc = FeatureEncoder(tiny.whisper, "cpu", "fp32")
    store = extract_features(enc, ["ok.wav", "junk.wav", "missing.wav"], tmp_path / "a", tmp_path / "f", progress=False)
    assert list(store.manifest["files"]) == ["ok.wav"]
    assert set(store.failed) == {"junk.wav", "missing.wav"}
    assert len(list((tmp_path / "f" / "features").iterdir())) == 1
    with pytest.raises(KeyError, match="extraction failed"):
        store.load("junk.wav")
    assert store.manifest["meta"]["device_type"] == "cpu" and store.manifest["meta"]["dtype"] == "float32"
    feats = store.load("ok.wav")
    assert tuple(feats.shape) == enc.config.feature_shape and feats.abs().sum() > 0
    # resumable: a second run does nothing new
    again = extract_features(enc, ["ok.wav"], tmp_path / "a", tmp_path / "f", progress=False)
    assert again.manifest["files"] == store.manifest["files"]
    # failed files are not tried again, until asked to after they were fixed
    (tmp_path / "a" / "junk.wav").write_bytes((tmp_path / "a" / "ok.wav").read_bytes())
    ids = ["ok.wav", "junk.wav", "missing.wav"]
    same = extract_features(enc, ids, tmp_path / "a", tmp_path / "f", progress=False)
    assert set(same.failed) == {"junk.wav", "missing.wav"} and "junk.wav" not in same
    fixed = extract_features(enc, ids, tmp_path / "a", tmp_path / "f", progress=False, retry_failed=True)
    assert "junk.wav" in fixed and set(fixed.failed) == {"missing.wav"}
    assert torch.equal(fixed.load("junk.wav"), feats)


def test_wer_and_scoring() -> None:
    assert wer("the cat sat on the mat", "the cat sat on mat") == (1, 6)
    assert wer("Hello, World!", "hello world") == (0, 2)
    recs = [
        Record("q", "dog", "1", dataset="esc50"),
        Record("q", "rain", "2", dataset="esc50"),
        Record("q", "hello world", "3", dataset="librispeech", task="asr"),
    ]
    res = score(recs, ["a dog is barking", "the sound of a dog", "hello word"])
    assert res["esc50"] == {"metric": "accuracy", "value": 0.5, "n": 2, "labels": 2}
    assert res["librispeech"]["metric"] == "wer" and res["librispeech"]["value"] == 0.5


def test_bf16_autocast_training_moves_every_trainable_tensor_like_fp32(tiny, loaded, tmp_path: Path) -> None:
    """A model loaded in bf16 trains fp32 master weights under bf16 autocast: at stage 2's learning rate every
    element of every trainable tensor moves, as in fp32 (bf16 weights would round most of those updates away)."""
    store, records = make_store(tmp_path, tiny)
    cfg = TrainConfig(
        stage=2,
        trainable=("audio_encoder", "audio_proj", "lora"),
        learning_rate=1e-4,
        max_steps=3,
        batch_size=4,
        micro_batch_size=2,
        warmup_steps=0,
        save_steps=0,
    )
    examples, _ = make_examples(loaded.processor, records, store, 108, cfg.loss)

    def moved(dtype: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        from accelerate.state import AcceleratorState

        # accelerate keeps one mixed-precision setting per process; two runs here need two
        AcceleratorState._reset_state(reset_partial_state=True)
        model = load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", dtype=dtype).model
        before = {k: v.float().clone() for k, v in model.trainable_state_dict().items()}
        run = dataclasses.replace(cfg, precision="bf16" if dtype == "bf16" else "fp32")
        t = Trainer(model, loaded.processor, examples, store, run, tmp_path / dtype, progress=False)
        t.train()
        after = t.acc.unwrap_model(t.model).trainable_state_dict()
        return {k: float((after[k].float() != before[k]).float().mean()) for k in before}, after

    fp32, _ = moved("fp32")
    try:
        bf16, after = moved("bf16")
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # the tests after this one train in fp32
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights
    assert all(share > 0.99 for share in fp32.values()), fp32
    assert all(bf16[k] > 0.99 for k in fp32), {k: v for k, v in bf16.items() if v <= 0.99}


def test_tensorboard_writer_gets_every_step(tiny, loaded, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, records = make_store(tmp_path, tiny)
    cfg = TrainConfig(
        stage=2,
        trainable=("audio_proj",),
        learning_rate=1e-3,
        max_steps=3,
        batch_size=4,
        micro_batch_size=2,
        warmup_steps=0,
        save_steps=0,
        tensorboard=True,
    )
    examples, _ = make_examples(loaded.processor, records, store, 108, cfg.loss)
    t = Trainer(fresh(tiny), loaded.processor, examples, store, cfg, tmp_path / "out", progress=False)
    losses = t.train()
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/examples_per_s"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx(losses, rel=1e-5)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == pytest.approx(losses, rel=1e-5)
