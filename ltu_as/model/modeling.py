"""`LtuAsForConditionalGeneration`: Whisper encoder → TLTR → projector → stock LLaMA (+ LoRA through peft).

The model composes stock parts and adds only the audio path; nothing in transformers or peft is edited. The 25
audio embeddings are prepended to the text embeddings and fed through `inputs_embeds`. In a batch, rows are
left-padded and the pads go *before* the audio tokens, so a request gives the same result alone and in a batch
(the reference appends the audio mask after the text mask instead, which is wrong for padded batches).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .config import LtuAsConfig
from .encoder import build_whisper_encoder, pooled_layer_states
from .generation import GenerationOptions, _cache_kwarg, generate_tokens
from .tltr import TLTR, build_projector

log = logging.getLogger(__name__)

CONFIG_NAME = "ltu_as_config.json"
WEIGHTS_NAME = "trainable.safetensors"
ADAPTER_NAME = "default"


def lora_config(config: LtuAsConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


class LtuAsForConditionalGeneration(nn.Module):
    """LTU-AS: audio + transcript + question → answer.

    Attributes
    ----------
    whisper_encoder: stock `transformers` `WhisperEncoder` (frozen), cut to `config.n_positions` positions.
    audio_encoder: `TLTR` (trainable).
    audio_proj: `LayerNorm → Linear(d_audio, d_llm)` (trainable).
    language_model: `peft.PeftModel` around a stock `LlamaForCausalLM` (frozen, LoRA trainable).
    """

    def __init__(
        self,
        config: LtuAsConfig,
        whisper_encoder: WhisperEncoder | None = None,
        language_model: LlamaForCausalLM | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if whisper_encoder is None:
            whisper_encoder = build_whisper_encoder(config.whisper, config.n_positions)
        whisper_encoder.requires_grad_(False)
        self.whisper_encoder = whisper_encoder.eval()
        self.audio_encoder = TLTR(config.d_audio, config.time_heads, config.layer_heads, config.mlp_ratio)
        self.audio_proj = build_projector(config.d_audio, config.d_llm)
        if language_model is None:
            language_model = LlamaForCausalLM(LlamaConfig(**config.llm))
        if language_model.config.hidden_size != config.d_llm:
            raise ValueError(f"LLM hidden size {language_model.config.hidden_size} != config d_llm {config.d_llm}")
        language_model.requires_grad_(False)
        self.language_model: PeftModel = get_peft_model(language_model, lora_config(config))
        self.quantization = "none"  # set by `ltu_as.loading.load.quantize_for_inference`
        self.encoder_quantization = "none"  # likewise
        self.eval()  # inference by default, as Hugging Face models; training code calls .train()

    # --- parts -------------------------------------------------------------------------------------------------
    @property
    def llm(self) -> LlamaForCausalLM:
        """The stock `LlamaForCausalLM` (with LoRA layers injected by peft)."""
        llm = self.language_model.base_model.model
        assert isinstance(llm, LlamaForCausalLM)
        return llm

    @property
    def device(self) -> torch.device:
        return cast(nn.Linear, self.audio_proj[1]).weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The audio path's dtype (TLTR and projector)."""
        return cast(nn.Linear, self.audio_proj[1]).weight.dtype

    @property
    def llm_dtype(self) -> torch.dtype:
        """The LLM's compute dtype. It differs from `dtype` for a quantized model on CPU, where the LLM computes
        in bf16 (its int8/int4 kernels take bf16) while the audio path keeps fp32 (`ltu_as.loading.quantize`)."""
        return cast(nn.Embedding, self.llm.get_input_embeddings()).weight.dtype

    def _eos(self, eos_token_id: int | None) -> int:
        if eos_token_id is not None:
            return int(eos_token_id)
        eos = self.llm.config.eos_token_id
        return int(eos[0] if isinstance(eos, list) else eos if eos is not None else 2)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors LTU-AS trains: TLTR, projector and LoRA, under this module's names."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if k.startswith(("audio_encoder.", "audio_proj.")) or "lora_" in k
        }

    # --- audio path --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        """`[B, n_mels, n_frames]` log-mel → `[B, L, T, D]` pooled pre-LN encoder states (`[B, 32, 25, 1280]`)."""
        if mel.ndim != 3 or tuple(mel.shape[1:]) != (self.config.n_mels, self.config.n_frames):
            raise ValueError(
                f"mel must be [B, {self.config.n_mels}, {self.config.n_frames}], got {tuple(mel.shape)}; "
                "use LtuAsProcessor.mel()"
            )
        enc_dtype = next(self.whisper_encoder.parameters()).dtype
        return pooled_layer_states(self.whisper_encoder, mel.to(self.device, enc_dtype), self.config.pool)

    def audio_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, L, T, D]` pooled encoder states → `[B, T, d_llm]` audio token embeddings."""
        expected = self.config.feature_shape
        if features.ndim != 4 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"features must be [B, {', '.join(map(str, expected))}], got {tuple(features.shape)}")
        return self.audio_proj(self.audio_encoder(features.to(self.device, self.dtype)))

    # --- sequence assembly ---------------------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def assemble(
        self, audio_embeds: torch.Tensor, input_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay out `[pads][audio][text]` rows, left-padded to one length.

        Parameters
        ----------
        audio_embeds: `[B, T, d_llm]`.
        input_ids: B token-id sequences of the text part (BOS first), of any lengths.

        Returns
        -------
        inputs_embeds `[B, S, d_llm]`, attention_mask `[B, S]` (0 on pads), position_ids `[B, S]` (0..T-1 over the
        audio, continuing over the text; pads get 0), with S = T + the longest text.
        """
        b, t, _ = audio_embeds.shape
        if len(input_ids) != b:
            raise ValueError(f"{b} audio clips but {len(input_ids)} prompts")
        rows = [torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1) for ids in input_ids]
        longest = max(r.numel() for r in rows)
        pad_id = int(self.llm.config.pad_token_id or 0)
        ids = torch.full((b, longest), pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((b, t + longest), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            n = r.numel()
            ids[i, longest - n :] = r
            mask[i, longest - n :] = 1  # pads (longest - n of them), then audio + text
        text = self.embed_tokens(ids)  # [B, longest, d_llm]
        embeds = torch.empty((b, t + longest, text.shape[-1]), dtype=text.dtype, device=self.device)
        for i, r in enumerate(rows):
            p = longest - r.numel()
            embeds[i, :p] = text[i, :p]  # pad embeddings, masked out
            embeds[i, p : p + t] = audio_embeds[i].to(text.dtype)
            embeds[i, p + t :] = text[i, p:]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return embeds, mask, positions

    # --- training forward --------------------------------------------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        labels: Sequence[Sequence[int] | torch.Tensor] | None = None,
    ) -> Any:
        """Teacher-forced pass. `labels` align with `input_ids` (-100 = no loss); audio and pads never carry loss.

        Returns the `CausalLMOutputWithPast` of the LLM with logits `[B, S, vocab]` (S = T + longest text).
        """
        embeds, mask, positions = self.assemble(self.audio_embeddings(features), input_ids)
        full_labels = None
        if labels is not None:
            b, s = mask.shape
            full_labels = torch.full((b, s), -100, dtype=torch.long, device=self.device)
            for i, lab in enumerate(labels):
                lab = torch.as_tensor(lab, dtype=torch.long, device=self.device).reshape(-1)
                if lab.numel():
                    full_labels[i, s - lab.numel() :] = lab
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=full_labels)

    # --- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self,
        features: torch.Tensor,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        options: GenerationOptions | None = None,
        eos_token_id: int | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield, per decoding step, each row's new token id (None once that row has stopped).

        Stops each row on EOS (not yielded) or `options.max_new_tokens`. Closing the iterator stops decoding, so a
        caller can cancel between tokens.
        """
        options = options or GenerationOptions()
        eos = self._eos(eos_token_id)
        embeds, mask, positions = self.assemble(self.audio_embeddings(features), input_ids)
        yield from generate_tokens(
            self.llm, embeds, mask, positions, [list(map(int, r)) for r in input_ids], eos, options
        )

    @torch.no_grad()
    def stream_shared(
        self,
        features: torch.Tensor,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        options: GenerationOptions | None = None,
        eos_token_id: int | None = None,
    ) -> Iterator[list[int | None]]:
        """`stream` for several prompts about ONE clip (`features` `[1, L, T, D]`): the audio tokens and the
        prompts' common text prefix are prefilled once and their KV cache is shared by every row.

        Rows are laid out `[audio][common prefix][pads][own suffix]`; the result equals `stream` on each prompt
        alone (greedy decoding gives the same tokens). With the reference template the question precedes the
        transcript, so the shared text is the prompt header up to the question.
        """
        options = options or GenerationOptions()
        if features.shape[0] != 1:
            raise ValueError(f"stream_shared takes one clip, got features for {features.shape[0]}")
        if not options.use_cache:
            raise ValueError("sharing a prefix needs options.use_cache=True")
        eos = self._eos(eos_token_id)
        rows = [list(map(int, r)) for r in input_ids]
        b = len(rows)
        p = 0  # common prefix, leaving every row at least one token of its own to start decoding from
        while p < min(len(r) for r in rows) - 1 and all(r[p] == rows[0][p] for r in rows):
            p += 1
        audio = self.audio_embeddings(features)  # [1, T, d]
        t = audio.shape[1]
        prefix_ids = torch.tensor([rows[0][:p]], dtype=torch.long, device=self.device)
        prefix = torch.cat([audio.to(self.llm_dtype), self.embed_tokens(prefix_ids)], dim=1)  # [1, T + p, d]
        cache = DynamicCache()
        positions = torch.arange(t + p, device=self.device).unsqueeze(0)
        self.llm(
            inputs_embeds=prefix,
            attention_mask=torch.ones((1, t + p), dtype=torch.long, device=self.device),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{_cache_kwarg(type(self.llm)): cache},
        )
        cache.batch_repeat_interleave(b)
        suffixes = [r[p:] for r in rows]
        s = max(len(x) for x in suffixes)
        pad_id = int(self.llm.config.pad_token_id or 0)
        ids = torch.full((b, s), pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((b, t + p + s), dtype=torch.long, device=self.device)
        mask[:, : t + p] = 1
        pos = torch.zeros((b, s), dtype=torch.long, device=self.device)
        for i, x in enumerate(suffixes):
            ids[i, s - len(x) :] = torch.tensor(x, dtype=torch.long, device=self.device)
            mask[i, t + p + s - len(x) :] = 1
            pos[i, s - len(x) :] = torch.arange(t + p, t + p + len(x), device=self.device)
        yield from generate_tokens(self.llm, self.embed_tokens(ids), mask, pos, rows, eos, options, cache=cache)

    @torch.no_grad()
    def stream_text(
        self,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        options: GenerationOptions | None = None,
        eos_token_id: int | None = None,
    ) -> Iterator[list[int | None]]:
        """`stream` for prompts without audio: the LoRA LLM reading text only (answers over stored transcripts
        and scene descriptions, digests). Rows are left-padded; the same tokens alone and in a batch."""
        options = options or GenerationOptions()
        eos = self._eos(eos_token_id)
        no_audio = torch.zeros((len(input_ids), 0, self.config.d_llm), dtype=self.llm_dtype, device=self.device)
        embeds, mask, positions = self.assemble(no_audio, input_ids)
        rows = [list(map(int, r)) for r in input_ids]
        yield from generate_tokens(self.llm, embeds, mask, positions, rows, eos, options)

    @torch.no_grad()
    def generate_text(
        self,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        options: GenerationOptions | None = None,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """`generate` for prompts without audio: B prompts → B lists of new token ids (EOS excluded)."""
        out: list[list[int]] = [[] for _ in input_ids]
        for step in self.stream_text(input_ids, options, eos_token_id):
            for row, tok in zip(out, step, strict=True):
                if tok is not None:
                    row.append(tok)
        return out

    @torch.no_grad()
    def next_token_logits(
        self, features: torch.Tensor, input_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> torch.Tensor:
        """`[B, vocab]` float32 logits of the first answer token: one prefill of `[audio][prompt]`, no decoding
        (what a yes/no alert rule reads, see `yes_probability`)."""
        embeds, mask, positions = self.assemble(self.audio_embeddings(features), input_ids)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def answer_log_likelihoods(
        self, audio: torch.Tensor, rows: Sequence[tuple[Sequence[int], int]], chunk: int = 16
    ) -> torch.Tensor:
        """`[K]` float32 log P(answer | audio, prompt), teacher-forced, for one clip's audio tokens `audio`
        `[1, T, d_llm]` (`audio_embeddings`) and K `rows` of (prompt + answer ids, answer length)
        (`LtuAsProcessor.answer_rows`): the sum of the answer tokens' log-probabilities. `chunk` rows go through
        the LLM at once; only the answer positions' logits are kept (`logits_to_keep`), so K answers cost K short
        prefills and no decoding."""
        out: list[torch.Tensor] = []
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            keep = max(n for _, n in part) + 1
            embeds, mask, positions = self.assemble(audio.expand(len(part), -1, -1), [ids for ids, _ in part])
            logits = self.llm(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=keep
            ).logits.float()  # [k, keep, vocab]: the last `keep` positions of each (right-aligned) row
            logp = logits.log_softmax(-1)
            for i, (ids, n) in enumerate(part):
                target = torch.as_tensor(list(ids)[-n:], dtype=torch.long, device=logp.device)
                # position j predicts token j + 1: the answer's n tokens come from the n positions before the last
                picked = logp[i, keep - n - 1 : keep - 1].gather(-1, target[:, None])
                out.append(picked.sum())
        return torch.stack(out)

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        options: GenerationOptions | None = None,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """Generate for a batch: `features` `[B, L, T, D]`, B prompts → B lists of new token ids (EOS excluded)."""
        out: list[list[int]] = [[] for _ in input_ids]
        for step in self.stream(features, input_ids, options, eos_token_id):
            for row, tok in zip(out, step, strict=True):
                if tok is not None:
                    row.append(tok)
        return out

    # --- LoRA ----------------------------------------------------------------------------------------------------
    def merge_lora(self) -> None:
        """Fold the LoRA deltas into the frozen weights (faster decoding; `unmerge_lora` undoes it). Idempotent."""
        if not any(m.merged for m in self.language_model.modules() if isinstance(m, BaseTunerLayer)):
            self.language_model.merge_adapter()

    def unmerge_lora(self) -> None:
        if self.quantization != "none":
            raise RuntimeError("the LoRA deltas are inside the quantized weights; load the model unquantized to train")
        self.language_model.unmerge_adapter()

    # --- our own format ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `ltu_as_config.json` (dims + where the frozen parts come from) and `trainable.safetensors`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "ltu_as": "trainable"})
        return directory
