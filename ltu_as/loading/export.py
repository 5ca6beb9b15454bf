"""Export the LLM half of an LTU-AS checkpoint in the layouts a vLLM server (or plain `transformers`) reads.

`export_llm(checkpoint, out)` loads the model on the CPU and writes under `out`:

- `merged/`: a plain Hugging Face `LlamaForCausalLM` folder (`config.json`, `generation_config.json`,
  `model*.safetensors`, tokenizer files) whose weights have the LoRA deltas folded in. No peft names
  (`lora_*`, `base_layer`) remain: `LlamaForCausalLM.from_pretrained(out / "merged")` *is* the LTU-AS LLM. The
  one to serve: `vllm serve`-style with `--enable-prompt-embeds`, the audio tokens going in as embeddings.
- `adapter/`: the LoRA as a standard PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`),
  its `base_model_name_or_path` the absolute path of `base/`, so that
  `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "adapter")` reproduces the
  LLM. vLLM's `--enable-lora` reads it too, but crashes on concurrent requests (vllm-project/vllm#51122).
- `base/`: the unmodified base LLM (the weights LoRA was trained against) with its tokenizer.
- `export.json`: the manifest: source checkpoint, dtype, the LLM's dims, the parts written, the suggested vLLM
  command for `merged/` and warnings (vLLM's CPU attention needs head_dim ≥ 32).

The Whisper encoder, TLTR and projector are not exported: they stay with the caller, which turns audio into the
prompt embeddings it sends.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import save_torch_state_dict
from peft.tuners.lora import LoraLayer

from ..errors import LtuAsError
from ..model.modeling import ADAPTER_NAME, LtuAsForConditionalGeneration
from .load import load_model
from .precision import resolve_dtype

log = logging.getLogger(__name__)

PARTS = ("merged", "adapter", "base")
MANIFEST_NAME = "export.json"
VLLM_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MIN_VLLM_CPU_HEAD_DIM = 32
LORA_ISSUE = "vllm-project/vllm#51122"


class ExportError(LtuAsError, ValueError):
    """The export cannot start: the output folder is in the way, or the arguments are wrong."""


def parse_parts(parts: str | Iterable[str]) -> tuple[str, ...]:
    """`"merged,adapter"` or an iterable of names → the parts in canonical order; unknown or none → `ExportError`."""
    names = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise ExportError(f"unknown export part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not names:
        raise ExportError(f"no export parts given; choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in names)


def vllm_command(merged: Path, dtype: torch.dtype, max_model_len: int = 1024) -> str:
    """The suggested vLLM OpenAI-server command line for a merged folder."""
    return shlex.join(
        [
            "python",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(merged),
            "--dtype",
            VLLM_DTYPES[dtype],
            "--enable-prompt-embeds",
            "--max-model-len",
            str(max_model_len),
        ]
    )


def _check_out(out: Path, parts: tuple[str, ...], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; give a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace the export")
        # Only what an export writes is removed: an --overwrite pointed at the wrong folder loses nothing else.
        for name in (*parts, MANIFEST_NAME):
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()


def _llm_state_dict(model: LtuAsForConditionalGeneration, merged: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stock `LlamaForCausalLM` state dict of `model.llm`: peft's `base_layer` names folded back, `lora_*`
    tensors dropped, and with `merged` each LoRA delta added to its base weight (in fp32, then cast)."""
    llm = model.llm
    if any(isinstance(m, LoraLayer) and m.merged for m in llm.modules()):
        raise RuntimeError("the LoRA is merged into the base weights: export a freshly loaded, unquantized model")
    out: dict[str, torch.Tensor] = {}
    for k, v in llm.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    if merged:
        for name, module in llm.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            key = f"{name}.weight"
            with torch.no_grad():
                delta = cast(Any, module).get_delta_weight(ADAPTER_NAME)  # declared by each layer type
                out[key] = out[key].float() + delta.to(device=out[key].device, dtype=torch.float32)
    return {k: v.detach().to(device="cpu", dtype=dtype) if v.is_floating_point() else v for k, v in out.items()}


def _write_llama(
    model: LtuAsForConditionalGeneration, tokenizer: Any, folder: Path, *, merged: bool, dtype: torch.dtype
) -> None:
    """A plain `LlamaForCausalLM` folder: config, generation config, safetensors shards, tokenizer."""
    llm = model.llm
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = copy.deepcopy(llm.config)
    config.dtype = dtype
    config.bos_token_id, config.eos_token_id = bos, eos
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(folder))
    gen = copy.deepcopy(llm.generation_config)
    gen.bos_token_id, gen.eos_token_id = bos, eos
    if gen.pad_token_id is None and config.pad_token_id is not None:
        gen.pad_token_id = config.pad_token_id
    gen.save_pretrained(str(folder))
    state = _llm_state_dict(model, merged, dtype)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # transformers and vLLM tie it to the embeddings again
    save_torch_state_dict(state, folder, max_shard_size="5GB", metadata={"format": "pt"})
    _write_tokenizer(tokenizer, Path(str(llm.name_or_path)), folder)


def _write_tokenizer(tokenizer: Any, source: Path, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))
    # The SentencePiece model as well, for readers that want the slow tokenizer (save_pretrained of a fast one
    # writes only tokenizer.json).
    for name in ("tokenizer.model",):
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def _write_adapter(model: LtuAsForConditionalGeneration, folder: Path, base: Path) -> None:
    peft_config = model.language_model.peft_config[ADAPTER_NAME]
    before = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = str(base)
    try:
        model.language_model.save_pretrained(str(folder))
    finally:
        peft_config.base_model_name_or_path = before


def export_llm(
    checkpoint: str | Path,
    out: str | Path,
    *,
    whisper: str | Path | None = None,
    llm: str | Path | None = None,
    dtype: str = "fp32",
    parts: str | Iterable[str] = PARTS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the LTU-AS LLM from `checkpoint` under `out` for vLLM; return the manifest (also `out/export.json`).

    Parameters
    ----------
    checkpoint: an ltu_as folder, an authors' `.bin`, URL or `authors:` name (as `load_model`).
    out: the export folder; it must be missing or empty unless `overwrite` (which replaces only the parts
        written here and the manifest).
    whisper, llm: override the frozen parts' sources (as `load_model`); the LLM folder gives the base weights
        and the tokenizer.
    dtype: fp32, fp16 or bf16, the weights' dtype on disk (fp16 is computed in fp32 on the CPU, then cast).
    parts: any of `merged`, `adapter`, `base` (see the module docstring); `adapter` is written together with
        `base`, which its `adapter_config.json` points to.

    Raises `ExportError` (a `ValueError`) for a non-empty `out` without `overwrite` or bad `parts`/`dtype`, and
    the loaders' `ModelNotFoundError` / `CheckpointError`.
    """
    wanted = parse_parts(parts)
    if "adapter" in wanted and "base" not in wanted:
        log.info("the adapter needs its base: writing base/ as well")
        wanted = tuple(p for p in PARTS if p in (*wanted, "base"))
    if dtype == "auto":
        raise ExportError("give the export dtype explicitly: fp32, fp16 or bf16")
    try:
        out_dtype = resolve_dtype(dtype, "cuda")  # validates the name; fp16 is fine on disk
    except ValueError as e:
        raise ExportError(str(e)) from e
    out = Path(out).expanduser().resolve()
    _check_out(out, wanted, overwrite)

    # CPU kernels lack fp16: load fp16 exports in fp32 and cast on writing.
    load_dtype = torch.float32 if out_dtype == torch.float16 else out_dtype
    loaded = load_model(checkpoint, whisper=whisper, llm=llm, device="cpu", dtype=load_dtype, progress=progress)
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    cfg = model.llm.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    warnings: list[str] = []
    if head_dim < MIN_VLLM_CPU_HEAD_DIM:
        warnings.append(
            f"head_dim {head_dim} < {MIN_VLLM_CPU_HEAD_DIM}: vLLM's CPU attention backend cannot serve this model "
            "(a GPU backend can)"
        )

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if "base" in wanted:
        _write_llama(model, tokenizer, out / "base", merged=False, dtype=out_dtype)
        written["base"] = str(out / "base")
    if "adapter" in wanted:
        _write_adapter(model, out / "adapter", out / "base")
        written["adapter"] = str(out / "adapter")
    if "merged" in wanted:
        _write_llama(model, tokenizer, out / "merged", merged=True, dtype=out_dtype)
        written["merged"] = str(out / "merged")

    lora = model.config.lora
    manifest: dict[str, Any] = {
        "source_checkpoint": str(Path(checkpoint).expanduser().resolve())
        if Path(checkpoint).expanduser().exists()
        else str(checkpoint),
        "llm_source": str(model.llm.name_or_path),
        "dtype": VLLM_DTYPES[out_dtype],
        "llm": {
            "hidden_size": int(cfg.hidden_size),
            "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
            "head_dim": head_dim,
            "num_hidden_layers": int(cfg.num_hidden_layers),
            "vocab_size": int(cfg.vocab_size),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules)},
        "parts": written,
        "recommended": "merged",
        "vllm_command": vllm_command(out / "merged", out_dtype, min(1024, int(cfg.max_position_embeddings)))
        if "merged" in written
        else None,
        "notes": [
            "merged/ is the one to serve: the audio tokens go in as prompt embeddings (--enable-prompt-embeds).",
            f"Serving base/ with adapter/ through --enable-lora crashes vLLM on concurrent requests ({LORA_ISSUE}).",
            f"vLLM's CPU attention needs head_dim >= {MIN_VLLM_CPU_HEAD_DIM}.",
        ],
        "warnings": warnings,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    for w in warnings:
        log.warning("%s", w)
    return manifest
