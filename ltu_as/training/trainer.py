"""The LTU-AS training curriculum (section 6 of the reference facts) as one resumable trainer.

Stages differ only in their `TrainConfig` (shipped as `ltu_as/training/stages/stage{1,2,3}.toml`): which parameter
groups train, learning rate, epochs, cutoff length, batch sizes. Each stage starts from the previous stage's output.
Features are precomputed (`featurestore`); the frozen Whisper encoder is not run while training.

Exact resume: every RNG (torch, numpy, random; CUDA) is seeded from `cfg.seed` when the trainer is made (LoRA
dropout draws from the global torch generator), the data order is a function of (seed, epoch), and a checkpoint
holds the trainable weights, the optimizer, the LR schedule, the step and every RNG state, so two runs with one
config give the same weights, and stopping and resuming gives the same weights as an uninterrupted run.

Safe runs: a checkpoint is written to `checkpoint-N.tmp` and renamed when complete; `resume` takes the newest
complete checkpoint and falls back past broken ones; `check_out` refuses an output folder holding another run's
checkpoints; `resume` refuses a checkpoint whose config differs from this run's except in `RESUMABLE` keys;
`stop()` (a signal handler) makes `train` save a checkpoint after the current step and return. Each step appends
a line to `metrics.jsonl` (step, loss, lr, examples/s, grad norm) beside the checkpoints.

Multi-GPU: launch with `accelerate launch` or `torchrun`; each process takes its share of every micro-batch index
and gradients are averaged by accelerate; only the main process writes checkpoints, metrics and the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from ..errors import CheckpointError, LtuAsError
from ..loading.load import load_trainable
from .data import Record
from .featurestore import FeatureStore

log = logging.getLogger(__name__)

# the shipped stage configs (package data; config/train in a checkout links here)
STAGES = Path(__file__).resolve().parent / "stages"
GROUPS = {"audio_proj": ("audio_proj.",), "audio_encoder": ("audio_encoder.",), "lora": ("lora_",)}
STATE = "training_state.pt"
METRICS = "metrics.jsonl"
# config keys a resumed run may change: they extend or reshape the run's bookkeeping, not its optimisation
RESUMABLE = ("max_steps", "save_steps", "keep_checkpoints")


class RunError(LtuAsError):
    """A training run that would lose or mix work: stale checkpoints in --out, or a changed config on resume."""


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random: a run's every random draw follows from its config."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (`checkpoint-N.tmp` folders are half-written)."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_out(out: Path, *, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """Refuse an `out` holding checkpoints unless this run resumes from them or may delete them (then they go;
    `delete` False: another process deletes them, e.g. rank 0 of a multi-process run)."""
    old = checkpoints(out) + sorted(out.glob("checkpoint-*.tmp"))
    if not old or resume:
        return
    if not overwrite:
        raise RunError(
            f"{out} holds checkpoints of a run ({', '.join(p.name for p in old[-3:])}): continue it with --resume, "
            "or start afresh with --overwrite (deletes them), or choose another --out"
        )
    if delete:
        for p in old:
            shutil.rmtree(p)
        (out / METRICS).unlink(missing_ok=True)


@dataclass(frozen=True)
class TrainConfig:
    stage: int = 1
    trainable: tuple[str, ...] = ("audio_proj",)
    learning_rate: float = 1e-3
    epochs: float = 2.0
    max_steps: int = 0  # > 0 overrides epochs
    min_steps: int = 0  # > 0: a small set trains more epochs, until the run has at least this many steps
    cutoff_len: int = 108
    batch_size: int = 256  # effective, across accumulation and processes
    micro_batch_size: int = 8
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # > 0: warm-up is this fraction of the run's steps instead of warmup_steps
    eos: bool = False  # append EOS to every answer, so the model learns to stop (the authors' runs did not)
    tensorboard: bool = False  # also write the metrics for TensorBoard, under <out>/tensorboard
    weight_decay: float = 0.0
    loss: str = "whole"  # "whole": every text token (the reference's train_on_inputs=True); "response": answer only
    save_steps: int = 200
    keep_checkpoints: int = 2
    seed: int = 42
    precision: str = "auto"  # auto (bf16 where the GPU supports it, else fp32), fp32, bf16

    def __post_init__(self) -> None:
        kinds: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), kinds.get(str(f.type))
            bad_bool = isinstance(value, bool) and str(f.type) in ("int", "float")
            if kind is not None and (not isinstance(value, kind) or bad_bool):
                raise ValueError(f"{f.name} must be {f.type}, got {value!r} (a TOML value: --set {f.name}=...)")
        unknown = [g for g in self.trainable if g not in GROUPS]
        if unknown:
            raise ValueError(f"trainable: unknown groups {unknown}; choose from {sorted(GROUPS)}")
        if self.loss not in ("whole", "response"):
            raise ValueError(f"loss must be 'whole' or 'response', got {self.loss!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")

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


@dataclass
class ExampleReport:
    """What `make_examples` left out or cut, reported before training starts."""

    missing: list[str] = dataclasses.field(default_factory=list)  # audio ids without features
    answer_cut: list[str] = dataclasses.field(default_factory=list)  # whole answer beyond cutoff_len
    dropped: int = 0  # of those, left out: with loss "response" they would train nothing (a nan loss)
    truncated: int = 0  # answers cut short by cutoff_len (kept)
    longest: int = 0  # tokens of the longest prompt + answer

    def problems(self, cutoff: int) -> list[str]:
        out = []
        if self.missing:
            out.append(
                f"{len(self.missing)} record(s) without features (failed or not extracted), e.g. {self.missing[:3]}"
            )
        if self.answer_cut:
            fate = "left out: with loss 'response' they would train nothing" if self.dropped else "their prompt trains"
            out.append(
                f"{len(self.answer_cut)} record(s) whose whole answer lies beyond cutoff_len = {cutoff} ({fate}), "
                f"e.g. {self.answer_cut[:3]}: raise it with --set cutoff_len={self.longest}"
            )
        if self.truncated:
            out.append(
                f"{self.truncated} answer(s) cut short by cutoff_len = {cutoff} (the longest example is "
                f"{self.longest} tokens: --set cutoff_len={self.longest} keeps them whole)"
            )
        return out


def make_examples(
    processor: Any, records: list[Record], store: FeatureStore, cutoff: int, loss: str, eos: bool = False
) -> tuple[list[Example], ExampleReport]:
    """Tokenized examples, and a report of what was left out (features missing, the whole answer beyond
    `cutoff`) or cut short. `eos`: EOS ends every answer (and is a target)."""
    out, report = [], ExampleReport()
    for r in records:
        if r.audio_id not in store:
            report.missing.append(r.audio_id)
            continue
        ids, prompt_len = processor.encode_example(r.instruction, r.input, r.output)
        if eos:
            ids = [*ids, processor.eos_token_id]
        report.longest = max(report.longest, len(ids))
        if prompt_len >= cutoff:
            report.answer_cut.append(r.audio_id)
            if loss == "response":
                report.dropped += 1
                continue
        else:
            report.truncated += len(ids) > cutoff
        labels = list(ids) if loss == "whole" else [-100] * prompt_len + ids[prompt_len:]
        # BOS is always the same token and would be "predicted" from the last audio position: never a target
        labels[0] = -100
        out.append(Example(r.audio_id, ids[:cutoff], labels[:cutoff]))
    return out, report


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
        seed_everything(cfg.seed)
        self.counts = set_trainable(model, cfg.trainable)
        # Master weights: what trains is fp32 whatever the model was loaded in (a bf16 weight would drop most
        # updates at these learning rates: an update under 2^-8 of the weight rounds away). The frozen parts stay
        # in their dtype and the forward runs under autocast when they are bf16/fp16.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        low = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        low -= {torch.float32}
        mixed = "no"
        if cfg.precision == "bf16" or (
            cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        ):
            mixed = "bf16"
        if low and mixed == "no":
            mixed = "fp16" if torch.float16 in low else "bf16"
            log.info("the frozen model is in %s: training under %s autocast", sorted(map(str, low)), mixed)
        self.acc = Accelerator(mixed_precision=mixed, cpu=model.device.type == "cpu")
        self.cfg, self.processor, self.examples, self.store = cfg, processor, examples, store
        self.out = Path(out)
        self.progress = progress
        self.model = model
        self.board: Any = None
        if cfg.tensorboard and self.acc.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard = true needs the tensorboard package: pip install tensorboard") from e
            self.board = SummaryWriter(str(self.out / "tensorboard"))
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        world = self.acc.num_processes
        self.accum = cfg.batch_size // (cfg.micro_batch_size * world) or 1
        self.rows_per_step = cfg.micro_batch_size * world * self.accum
        self.steps_per_epoch = max(1, math.ceil(len(examples) / self.rows_per_step))
        self.total_steps = cfg.max_steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        if not cfg.max_steps and self.total_steps < cfg.min_steps:
            # a few dozen clips per class give a few steps per epoch: size the run in steps, whole epochs
            epochs = math.ceil(cfg.min_steps / self.steps_per_epoch)
            log.info(
                "%d examples give %d steps in %g epochs, under min_steps=%d: training %d epochs (%d steps)",
                len(examples),
                self.total_steps,
                cfg.epochs,
                cfg.min_steps,
                epochs,
                epochs * self.steps_per_epoch,
            )
            self.total_steps = epochs * self.steps_per_epoch
        from transformers import get_linear_schedule_with_warmup

        self.warmup = round(cfg.warmup_ratio * self.total_steps) if cfg.warmup_ratio else cfg.warmup_steps
        if self.warmup >= self.total_steps:
            log.warning(
                "this run has %d steps (%d examples, %d per step) and never leaves its %d warm-up steps: the "
                "learning rate never reaches %g. Set warmup_ratio (e.g. --set warmup_ratio=0.1), lower batch_size, "
                "or use the fine-tune preset (--config %s)",
                self.total_steps,
                len(examples),
                self.rows_per_step,
                self.warmup,
                cfg.learning_rate,
                STAGES / "finetune.toml",
            )
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, self.warmup, self.total_steps)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.step = 0
        self.stop_reason: str | None = None

    def stop(self, reason: str = "stop requested") -> None:
        """Ask `train` to save a checkpoint after the current step and return (safe from a signal handler)."""
        self.stop_reason = reason

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
        """Write `checkpoint-<step>` (to a `.tmp` folder, renamed when complete), then drop the oldest beyond
        `keep_checkpoints`."""
        if not self.acc.is_main_process:
            return self.out
        folder = self.out / f"checkpoint-{self.step}"
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.acc.unwrap_model(self.model).save_pretrained(tmp)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "rng": _rng_state(),
                "config": dataclasses.asdict(self.cfg),
            },
            tmp / STATE,
        )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)  # atomic: a checkpoint folder is complete or absent
        for old in checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return folder

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in `out` (falling back past any that cannot be read);
        False if there is none. Raises RunError when the checkpoint's config differs from this run's in a key
        outside `RESUMABLE`."""
        for folder in reversed(checkpoints(self.out)):
            try:
                state = torch.load(folder / STATE, weights_only=False)
                recorded = state["config"]
            except Exception as e:  # missing, truncated or foreign: try the one before
                log.warning("%s cannot be read (%s): falling back to the previous checkpoint", folder.name, e)
                continue
            ours = dataclasses.asdict(self.cfg)
            # a key added since the checkpoint was written counts as its default
            defaults = dataclasses.asdict(TrainConfig())
            changed = sorted(
                k for k in ours if k not in RESUMABLE and _plain(recorded.get(k, defaults[k])) != _plain(ours[k])
            )
            if changed:
                diff = ", ".join(f"{k}: {recorded.get(k)!r} → {ours[k]!r}" for k in changed)
                raise RunError(
                    f"--resume with a different config ({diff}); only {', '.join(RESUMABLE)} may change on resume. "
                    "Resume with the run's own settings, or start a new run in another --out"
                )
            try:
                load_trainable(self.acc.unwrap_model(self.model), folder / "trainable.safetensors")
            except CheckpointError as e:
                log.warning("%s cannot be read (%s): falling back to the previous checkpoint", folder.name, e)
                continue
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            _set_rng_state(state["rng"])
            log.info("resumed from %s (step %d of %d)", folder, self.step, self.total_steps)
            return True
        return False

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
            grad_norm = _grad_norm(self.optimizer)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            done += 1
            losses.append(total)
            rate = done * self.rows_per_step / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.0f}")
            bar.update(1)
            self._log_metrics(
                {"step": self.step, "loss": total, "lr": lr, "examples_per_s": rate, "grad_norm": grad_norm}
            )
            if self.stop_reason is not None:
                log.warning("%s: saving a checkpoint at step %d", self.stop_reason, self.step)
                self.save_checkpoint()
                break
            if self.cfg.save_steps and self.step % self.cfg.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.model.eval()
        return losses

    @property
    def stopped(self) -> bool:
        """`train` returned early because of `stop()` (a checkpoint was saved)."""
        return self.stop_reason is not None and self.step < self.total_steps

    def _log_metrics(self, row: dict[str, float]) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}) + "\n")
            if self.board is not None:
                for k, v in row.items():
                    if k != "step":
                        self.board.add_scalar(f"train/{k}", v, int(row["step"]))
                self.board.flush()

    def finish(self) -> tuple[Path, Path]:
        """The stage's output: `save_pretrained` in `out` and the authors' `.bin` layout next to it (written by the
        main process only; the others wait for it)."""
        from ..loading.checkpoint import save_official_checkpoint

        official = self.out / "ltuas.bin"
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            model.save_pretrained(self.out)
            save_official_checkpoint(model, official)
        self.acc.wait_for_everyone()
        return self.out, official


def _grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The L2 norm of every trainable gradient (one device sync per step)."""
    grads = [p.grad.detach().float().norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _plain(value: Any) -> Any:
    """Config values compared across a checkpoint (lists there, tuples here)."""
    return list(value) if isinstance(value, tuple | list) else value
