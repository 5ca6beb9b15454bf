"""The LTU-AS training curriculum (section 6 of the reference facts) as one resumable trainer.

Stages differ only in their `TrainConfig` (shipped as `ltu_as/training/stages/stage{1,2,3}.toml`): which parameter
groups train, learning rate, epochs, cutoff length, batch sizes. Each stage starts from the previous stage's output.
Features are precomputed (`featurestore`); the frozen Whisper encoder is not run while training.

Exact resume: the data order is a function of (seed, epoch), and a checkpoint holds the trainable weights, the
optimizer, the LR schedule, the step and every RNG state, so stopping and resuming gives the same weights as an
uninterrupted run. Multi-GPU: launch with `accelerate launch` or `torchrun`; each process takes its share of
every micro-batch index and gradients are averaged by accelerate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..loading.load import load_trainable
from .data import Record
from .featurestore import FeatureStore

log = logging.getLogger(__name__)

# the shipped stage configs (package data; config/train in a checkout links here)
STAGES = Path(__file__).resolve().parent / "stages"
GROUPS = {"audio_proj": ("audio_proj.",), "audio_encoder": ("audio_encoder.",), "lora": ("lora_",)}
STATE = "training_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    stage: int = 1
    trainable: tuple[str, ...] = ("audio_proj",)
    learning_rate: float = 1e-3
    epochs: float = 2.0
    max_steps: int = 0  # > 0 overrides epochs
    cutoff_len: int = 108
    batch_size: int = 256  # effective, across accumulation and processes
    micro_batch_size: int = 8
    warmup_steps: int = 100
    weight_decay: float = 0.0
    loss: str = "whole"  # "whole": every text token (the reference's train_on_inputs=True); "response": answer only
    save_steps: int = 200
    keep_checkpoints: int = 2
    seed: int = 42
    precision: str = "auto"  # auto (bf16 where the GPU supports it, else fp32), fp32, bf16

    def __post_init__(self) -> None:
        unknown = [g for g in self.trainable if g not in GROUPS]
        if unknown:
            raise ValueError(f"trainable: unknown groups {unknown}; choose from {sorted(GROUPS)}")
        if self.loss not in ("whole", "response"):
            raise ValueError(f"loss must be 'whole' or 'response', got {self.loss!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """From a TOML file (unknown keys are errors) plus overrides."""
        values: dict[str, Any] = tomllib.loads(Path(path).read_text()) if path else {}
        values.update(overrides or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path or 'overrides'}: unknown keys {unknown}")
        if "trainable" in values:
            values["trainable"] = tuple(values["trainable"])
        return cls(**values)


def set_trainable(model: torch.nn.Module, groups: tuple[str, ...]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named groups. Returns parameter counts per group."""
    counts = {g: 0 for g in groups}
    for name, p in model.named_parameters():
        hit = next(
            (g for g in groups if any(m in name if m == "lora_" else name.startswith(m) for m in GROUPS[g])), None
        )
        p.requires_grad_(hit is not None)
        if hit is not None:
            counts[hit] += p.numel()
    return counts


@dataclass(frozen=True)
class Example:
    audio_id: str
    ids: list[int]
    labels: list[int]


def make_examples(
    processor: Any, records: list[Record], store: FeatureStore, cutoff: int, loss: str
) -> tuple[list[Example], list[str]]:
    """Tokenized examples, and the audio ids left out because their features are missing or failed."""
    out, missing = [], []
    for r in records:
        if r.audio_id not in store:
            missing.append(r.audio_id)
            continue
        ids, prompt_len = processor.encode_example(r.instruction, r.input, r.output)
        labels = list(ids) if loss == "whole" else [-100] * prompt_len + ids[prompt_len:]
        # BOS is always the same token and would be "predicted" from the last audio position: never a target
        labels[0] = -100
        out.append(Example(r.audio_id, ids[:cutoff], labels[:cutoff]))
    return out, missing


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(
        self,
        model: Any,
        processor: Any,
        examples: list[Example],
        store: FeatureStore,
        cfg: TrainConfig,
        out: str | Path,
        progress: bool = True,
    ) -> None:
        from accelerate import Accelerator

        if not examples:
            raise ValueError("no training examples (are the features extracted?)")
        mixed = "no"
        if cfg.precision == "bf16" or (
            cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        ):
            mixed = "bf16"
        self.acc = Accelerator(mixed_precision=mixed, cpu=model.device.type == "cpu")
        self.cfg, self.processor, self.examples, self.store = cfg, processor, examples, store
        self.out = Path(out)
        self.progress = progress
        self.counts = set_trainable(model, cfg.trainable)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        world = self.acc.num_processes
        self.accum = cfg.batch_size // (cfg.micro_batch_size * world) or 1
        self.rows_per_step = cfg.micro_batch_size * world * self.accum
        self.steps_per_epoch = max(1, math.ceil(len(examples) / self.rows_per_step))
        self.total_steps = cfg.max_steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.step = 0

    # --- data order: a pure function of (seed, epoch), so a resumed run sees the same batches ---

    def _rows(self, step: int, micro: int) -> list[Example]:
        per_epoch = self.steps_per_epoch * self.rows_per_step
        start = (
            step * self.rows_per_step
            + (micro * self.acc.num_processes + self.acc.process_index) * self.cfg.micro_batch_size
        )
        epoch, offset = divmod(start, per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        idx = [
            int(order[(offset + i) % len(order)]) for i in range(self.cfg.micro_batch_size) if offset + i < per_epoch
        ]
        return [self.examples[i] for i in idx]

    def _loss(self, rows: list[Example]) -> torch.Tensor:
        unwrapped = self.acc.unwrap_model(self.model)
        feats = torch.stack([self.store.load(r.audio_id) for r in rows]).to(unwrapped.device)
        with self.acc.autocast():
            out = self.model(feats, [r.ids for r in rows], [r.labels for r in rows])
        return out.loss

    # --- checkpoints ---

    def save_checkpoint(self) -> Path:
        if not self.acc.is_main_process:
            return self.out
        folder = self.out / f"checkpoint-{self.step}"
        self.acc.unwrap_model(self.model).save_pretrained(folder)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "rng": _rng_state(),
                "config": dataclasses.asdict(self.cfg),
            },
            folder / STATE,
        )
        olds = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in olds[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return folder

    def resume(self) -> bool:
        """Continue from the newest checkpoint in `out`; False if there is none."""
        olds = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not olds:
            return False
        folder = olds[-1]
        load_trainable(self.acc.unwrap_model(self.model), folder / "trainable.safetensors")
        state = torch.load(folder / STATE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        _set_rng_state(state["rng"])
        log.info("resumed from %s (step %d of %d)", folder, self.step, self.total_steps)
        return True

    # --- the loop ---

    def train(self, stop_after: int | None = None) -> list[float]:
        """Train to `total_steps` (or stop after `stop_after` steps: for tests of resume). Returns step losses."""
        self.model.train()
        losses = []
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"stage {self.cfg.stage}",
            unit="step",
            disable=not self.progress or not self.acc.is_main_process,
        )
        t0, done = time.monotonic(), 0
        while self.step < self.total_steps and (stop_after is None or done < stop_after):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(self.accum):
                rows = self._rows(self.step, micro)
                if not rows:
                    continue
                sync = micro == self.accum - 1
                ctx = self.acc.no_sync(self.model) if not sync else contextlib.nullcontext()
                with ctx:
                    loss = self._loss(rows) / self.accum
                    self.acc.backward(loss)
                total += float(loss.detach())
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            done += 1
            losses.append(total)
            rate = done * self.rows_per_step / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", ex_s=f"{rate:.0f}")
            bar.update(1)
            if self.cfg.save_steps and self.step % self.cfg.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.model.eval()
        return losses

    def finish(self) -> tuple[Path, Path]:
        """The stage's output: `save_pretrained` in `out` and the authors' `.bin` layout next to it."""
        from ..loading.checkpoint import save_official_checkpoint

        model = self.acc.unwrap_model(self.model)
        model.save_pretrained(self.out)
        return self.out, save_official_checkpoint(model, self.out / "ltuas.bin")
