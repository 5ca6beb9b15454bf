"""Assemble a ready model from its sources: Whisper encoder, LLM (+ tokenizer) and trainable weights."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from ..errors import CheckpointError, ModelNotFoundError
from ..model.config import DEFAULT_CHECKPOINT_SOURCE, LtuAsConfig
from ..model.encoder import load_whisper_encoder, read_whisper_config
from ..model.modeling import CONFIG_NAME, WEIGHTS_NAME, LtuAsForConditionalGeneration
from ..model.processor import LtuAsProcessor
from .card import TrainedOn
from .checkpoint import load_official_checkpoint, report_mismatch
from .precision import resolve_device, resolve_dtype
from .quantize import ENCODER_MODES, MODES, compute_dtype, quantize_linears
from .sources import anchored, recordable, resolve

log = logging.getLogger(__name__)

_LLM_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_theta",
)


def read_llm_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} is not a Hugging Face LLaMA folder: no config.json")
    cfg = json.loads(path.read_text())
    return {k: cfg[k] for k in _LLM_KEYS if k in cfg}


def _embeddings_only_llm(folder: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    """The LLaMA with only its token embedding table loaded; every other weight stays on the meta device (no
    memory). For `llm.backend = "vllm"`, where the LLM runs on the server and only the prompt's embeddings are
    computed here."""
    from safetensors import safe_open
    from transformers import LlamaConfig

    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig.from_pretrained(str(folder)))
    name = "model.embed_tokens.weight"
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                table = st.get_tensor(name).to(dtype)
                break
    else:
        raise ModelNotFoundError(f"{folder} has no {name} in its *.safetensors files")
    llm.model.embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=True)
    llm.name_or_path = str(folder)
    return llm


def load_components(
    config: LtuAsConfig | None = None,
    *,
    whisper: str | Path | None = None,
    llm: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    progress: bool = True,
    llm_weights: str = "all",
    llm_dtype: str | torch.dtype | None = None,
) -> LtuAsForConditionalGeneration:
    """Build the model from the frozen parts' sources; trainable parts are freshly initialised.

    `whisper` and `llm` override `config.whisper_source` / `config.llm_source`. The architecture dims are read
    from the folders' `config.json`, and must agree with `config` when one is given. `llm_weights="embeddings"`
    loads only the LLM's token embeddings (the rest, LoRA included, stays on the meta device). `llm_dtype`: the
    LLM's dtype when it differs from the audio path's `dtype` (a quantized model on CPU).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    llm_dt = dt if llm_dtype is None else resolve_dtype(llm_dtype, dev)
    base = config or LtuAsConfig()
    whisper_src = str(whisper or base.whisper_source)
    llm_src = str(llm or base.llm_source)
    whisper_dir = resolve(whisper_src, "Whisper encoder", progress=progress)
    llm_dir = resolve(llm_src, "LLM", progress=progress)
    found = base.replace(
        whisper={**base.whisper, **read_whisper_config(whisper_dir)},
        llm={**base.llm, **read_llm_config(llm_dir)},
        whisper_source=recordable(whisper_src),
        llm_source=recordable(llm_src),
    )
    if config is not None:
        for name, a, b in (("whisper", config.whisper, found.whisper), ("llm", config.llm, found.llm)):
            diff = {k: (a.get(k), b[k]) for k in b if k in a and a[k] != b[k] and k != "max_source_positions"}
            if diff:
                raise CheckpointError(
                    f"the {name} folder does not match the checkpoint's config: {diff} (config, folder)"
                )
    log.info("loading Whisper encoder from %s", whisper_dir)
    encoder = load_whisper_encoder(whisper_dir, found.n_positions)
    log.info("loading LLM from %s (%s on %s%s)", llm_dir, llm_dt, dev, ", embeddings only" * (llm_weights != "all"))
    try:
        if llm_weights == "embeddings":
            language_model = _embeddings_only_llm(llm_dir, llm_dt)
        else:
            language_model = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=llm_dt)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelNotFoundError(f"cannot load the LLM from {llm_dir}: {e}") from e
    model = LtuAsForConditionalGeneration(found, whisper_encoder=encoder, language_model=language_model)
    for part in (model.whisper_encoder, model.audio_encoder, model.audio_proj):
        part.to(device=dev, dtype=dt)
    if llm_weights == "embeddings":  # move what is real; meta tensors cannot move
        model.llm.model.embed_tokens.to(device=dev, dtype=llm_dt)
    else:
        model.language_model.to(device=dev, dtype=llm_dt)  # LoRA factors included
    return model.eval()


def load_trainable(model: LtuAsForConditionalGeneration, path: str | Path) -> None:
    """Load `trainable.safetensors` into `model` strictly: every trainable tensor present with the right shape,
    nothing else. Raises `CheckpointError` (and changes nothing) otherwise."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several error types for truncated or foreign files
        raise CheckpointError(f"cannot read {path}: {e}; the file is corrupt or not an ltu_as checkpoint") from e
    expected = model.trainable_state_dict()
    report_mismatch(str(path), expected, tensors)
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)


def load_pretrained(
    directory: str | Path,
    *,
    whisper: str | Path | None = None,
    llm: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    progress: bool = True,
    llm_weights: str = "all",
    llm_dtype: str | torch.dtype | None = None,
) -> LtuAsForConditionalGeneration:
    """Load a model saved by `save_pretrained`; the frozen parts come from the recorded sources unless given."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{directory} is not an ltu_as checkpoint: no {CONFIG_NAME}")
    config = LtuAsConfig.load(cfg_path)
    # sources recorded as relative paths are found beside the checkpoint first (`anchored`)
    config = config.replace(
        whisper_source=anchored(config.whisper_source, directory), llm_source=anchored(config.llm_source, directory)
    )
    model = load_components(
        config,
        whisper=whisper,
        llm=llm,
        device=device,
        dtype=dtype,
        progress=progress,
        llm_weights=llm_weights,
        llm_dtype=llm_dtype,
    )
    load_trainable(model, directory / WEIGHTS_NAME)
    return model


@dataclass
class LoadedModel:
    """A model with its processor, ready for `ltu_as.pipeline.ask`."""

    model: LtuAsForConditionalGeneration
    processor: LtuAsProcessor
    trained: TrainedOn | None = None  # what the checkpoint was trained to answer (`ltu_as.loading.card`)


def quantize_for_inference(
    model: LtuAsForConditionalGeneration,
    quantization: str,
    encoder_quantization: str = "none",
    int8_kernel: str = "auto",
) -> int:
    """Merge LoRA into the LLM, then quantize its linear layers (`ltu_as.loading.quantize`), and the Whisper
    encoder's with `encoder_quantization` ("none" or "int8"); returns how many layers in all. The model is then for
    inference only (`unmerge_lora` refuses). An unknown mode raises ValueError before anything changes.
    `int8_kernel` ("auto", "torchao", "aten", "compiled"): how the LLM's int8 layers multiply (`quantize_linears`)."""
    if quantization not in MODES:
        raise ValueError(f"model.quantization must be one of {', '.join(MODES)}, not {quantization!r}")
    if encoder_quantization not in ENCODER_MODES:
        raise ValueError(
            f"model.encoder_quantization must be one of {', '.join(ENCODER_MODES)}, not {encoder_quantization!r}"
        )
    n = 0
    if quantization != "none":
        llm_dtype = compute_dtype(quantization, model.llm_dtype, model.device)
        if llm_dtype != model.llm_dtype:  # a model loaded unquantized (`ltu-as eval`): as the daemon would load it
            model.language_model.to(llm_dtype)
        model.merge_lora()
        kernel = None if int8_kernel == "auto" else int8_kernel
        n = quantize_linears(model.llm, quantization, model.device, int8_kernel=kernel)  # type: ignore[arg-type]
        model.quantization = quantization
        log.info("LLM quantized to %s: %d linear layers", quantization, n)
    if encoder_quantization != "none":
        e = quantize_linears(model.whisper_encoder, encoder_quantization, model.device)
        model.encoder_quantization = encoder_quantization
        log.info("Whisper encoder quantized to %s: %d linear layers", encoder_quantization, e)
        n += e
    return n


def load_model(
    checkpoint: str | Path | None = None,
    *,
    whisper: str | Path | None = None,
    llm: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str = "none",
    encoder_quantization: str = "none",
    int8_kernel: str = "auto",
    llm_weights: str = "all",
    progress: bool = True,
) -> LoadedModel:
    """Load a complete model and its processor.

    `checkpoint` is a folder written by `save_pretrained`, or an authors'-layout `.bin` (a path, URL or
    `authors:` name); default: the authors' `ltuas_long_noqa_a6.bin`.

    `quantization` ("none", "int8", "int4"): merge LoRA and quantize the LLM's linear layers for inference
    (`ltu_as.loading.quantize`); on CPU a quantized LLM computes in bf16 while the audio path keeps `dtype`
    (fp32 by default there). `encoder_quantization` ("none", "int8"): the Whisper encoder's linear layers too.
    `int8_kernel`: how int8 LLM layers multiply (`quantize_linears`; "auto": torchao on CUDA, aten on CPU).
    `llm_weights="embeddings"`: only the LLM's token embeddings are loaded (for a remote LLM); its LoRA is not
    loaded either.
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    llm_dtype = compute_dtype(quantization, dtype, dev)
    ckpt = str(checkpoint or DEFAULT_CHECKPOINT_SOURCE)
    local = Path(ckpt).expanduser()
    sources: dict[str, Any] = dict(
        whisper=whisper,
        llm=llm,
        device=device,
        dtype=dtype,
        progress=progress,
        llm_weights=llm_weights,
        llm_dtype=llm_dtype,
    )
    trained = None
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{local} is not an ltu_as checkpoint folder (no {CONFIG_NAME})")
        trained = TrainedOn.load(local)
        model = load_pretrained(local, **sources)
    else:
        model = load_components(**sources)
        path = resolve(ckpt, "LTU-AS checkpoint", progress=progress)
        counts = load_official_checkpoint(model, path)
        log.info("loaded %d tensors (%d parameters) from %s", counts["tensors"], counts["parameters"], path)
    # The LLM folder was resolved while loading; transformers records it as the model's name_or_path.
    processor = LtuAsProcessor.from_pretrained(model.llm.name_or_path, model.config)
    if quantization != "none" or encoder_quantization != "none":
        quantize_for_inference(model, quantization, encoder_quantization, int8_kernel)
    return LoadedModel(model, processor, trained)
