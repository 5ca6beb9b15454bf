"""The daemon's memory plan (`ltu_as.serving.memory_plan`) from its config, before any weight is loaded: the
model's dims from the checkpoint's config and the local model folders (real sizes for real weights, tiny ones for
the demo), the ASR model when it shares the model's device, and the engine settings. `Service` refuses to start on
a plan that does not fit; `ltu-daemon check --memory` prints it."""

from __future__ import annotations

from pathlib import Path

import torch

from ltu_as.errors import ModelNotFoundError
from ltu_as.loading.load import read_llm_config
from ltu_as.loading.precision import resolve_device, resolve_dtype
from ltu_as.loading.sources import anchored, is_remote
from ltu_as.model.config import LtuAsConfig
from ltu_as.model.encoder import read_whisper_config
from ltu_as.model.modeling import CONFIG_NAME
from ltu_as.serving.memory_plan import MemoryPlan, plan_memory

from ..config import DaemonConfig

GB = 1024**3


def _folder(source: str | None) -> Path | None:
    if not source:
        return None
    path = Path(source).expanduser()
    return path if (path / "config.json").is_file() else None


def missing_sources(config: DaemonConfig) -> list[str]:
    """What the model needs and this machine lacks: the checkpoint given as a local path that does not exist, or
    a checkpoint folder's recorded Whisper/LLM folder (found as `ltu_as.loading.sources.anchored` finds it) that is
    not there. Hub ids, URLs and `authors:` names are fetched on start and never listed."""
    m = config.model
    ckpt = Path(m.checkpoint).expanduser()
    if not is_remote(m.checkpoint) and not ckpt.exists():
        return [f"model.checkpoint {m.checkpoint}"]
    out = []
    for key in ("whisper", "llm"):
        given = getattr(m, key)
        if given and not is_remote(given) and not Path(given).expanduser().exists():
            out.append(f"model.{key} {given}")
    if (ckpt / CONFIG_NAME).is_file():
        arch = LtuAsConfig.load(ckpt / CONFIG_NAME)
        for key, source in (("whisper", arch.whisper_source), ("llm", arch.llm_source)):
            found = anchored(source, ckpt)
            if not getattr(m, key) and not is_remote(found) and not Path(found).exists():
                out.append(f"the {key} folder {source} recorded in {ckpt / CONFIG_NAME} (looked for: {found})")
    return out


def architecture(config: DaemonConfig) -> LtuAsConfig:
    """The model's dims: the checkpoint folder's config, else the paper's; local Whisper/LLM folders override.
    Raises `ModelNotFoundError` when a local part is missing (`missing_sources`): a plan made from the paper's
    dims instead would report a 7B model that does not fit, when the truth is a wrong path."""
    missing = missing_sources(config)
    if missing:
        raise ModelNotFoundError(
            "LTU-AS cannot load: missing " + "; ".join(missing) + ". Fix the path (relative paths in a config file "
            "are relative to its folder), or set model.whisper / model.llm to where the folders are now"
        )
    m = config.model
    ckpt = Path(m.checkpoint).expanduser()
    arch = LtuAsConfig.load(ckpt / CONFIG_NAME) if (ckpt / CONFIG_NAME).is_file() else LtuAsConfig()
    whisper = _folder(m.whisper) or _folder(anchored(arch.whisper_source, ckpt))
    llm = _folder(m.llm) or _folder(anchored(arch.llm_source, ckpt))
    return arch.replace(
        whisper={**arch.whisper, **(read_whisper_config(whisper) if whisper else {})},
        llm={**arch.llm, **(read_llm_config(llm) if llm else {})},
    )


def memory_plan(config: DaemonConfig, available: int | None = None) -> MemoryPlan:
    """The plan for the model's device. `available` (bytes) defaults to `engine.memory_budget_gb` when set, else
    the device's free memory. The ASR model counts when it runs on the same kind of device."""
    m, e = config.model, config.engine
    device = resolve_device(m.device)
    dtype = resolve_dtype(m.dtype, device)
    if available is None and e.memory_budget_gb > 0:
        available = int(e.memory_budget_gb * GB)
    asr = config.asr_effective()
    asr_device = asr.device if asr.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shared = asr_device.split(":")[0] == device.type
    return plan_memory(
        architecture(config),
        device=device,
        dtype=dtype,
        quantization=m.quantization,
        encoder_quantization=m.encoder_quantization,
        slots=e.slots,
        max_slots=e.max_slots,
        max_positions=e.max_positions,
        memory_fraction=e.memory_fraction,
        prefill_chunk=e.prefill_chunk,
        asr=(asr.model, asr.compute_type) if shared else None,
        available=available,
        llm_local=config.llm.backend == "local",
    )
