"""Tiny random LTU-AS components saved in the real file layouts, for tests and the demo profile.

Nothing here downloads anything. `build_tiny_models(root)` writes:

- `whisper/`: a Hugging Face Whisper folder (`config.json`, `model.safetensors`, tokenizer files,
  `preprocessor_config.json`), the layout of `openai/whisper-large`;
- `whisper-ct2/`: the same model converted to CTranslate2, which faster-whisper loads;
- `llm/`: a Hugging Face LLaMA folder with a SentencePiece `tokenizer.model` trained on the spot, the layout of
  the Vicuna base;
- `ltuas_tiny.bin`: random trainable weights in the authors' checkpoint layout.

The random frozen parts are initialised with larger weights than `transformers` uses by default, so that audio
content survives the random encoder and the random LLM's logits are not flat (see
`shared/recipes/learning-test.md`): with the defaults a correct trainer learns nothing.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import WhisperTokenizer

    from .model.modeling import LtuAsForConditionalGeneration

from .model.config import LtuAsConfig

log = logging.getLogger(__name__)

# Tiny dims: the real structure (1000 frames, pool 20 → 25 tokens, 80 mels), small widths.
TINY_WHISPER: dict[str, Any] = {
    "num_mel_bins": 80,
    "d_model": 64,
    "encoder_layers": 4,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "max_source_positions": 1500,
    "activation_function": "gelu",
}
TINY_WHISPER_DECODER: dict[str, Any] = {
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "max_target_positions": 448,
}
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# Text the tiny tokenizers are trained on: the prompt template, typical questions, answers and transcripts.
CORPUS = [
    "### Instruction:\nWhat sound is this?\n\n### Input:\nhello there\n\n### Response:\n",
    "### Instruction:\nWhat can be inferred from the audio?\n\n### Response:\nA dog is barking.",
    "### Instruction:\nDescribe the sound scene.\n\n### Input:\nwe need to check the kitchen\n\n### Response:\n",
    "What did the speaker say? Is the dog barking? What is the emotion of the speaker? How old is the speaker?",
    "Is there a smoke alarm? When did the washing machine finish? What was that noise? Who is talking?",
    "tone chirp noise click silence speech music alarm dog cat bird car engine water rain wind door knock",
    "The quick brown fox jumps over the lazy dog. A man is speaking while music plays in the background.",
    "male female happy sad angry neutral yes no one two three four five six seven eight nine ten",
    "Someone says they will check the router in the kitchen, then a smoke alarm beeps three times.",
    "0123456789 .,;:!?'\"()-_/ ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
]
# the learning test's class names, often enough to become single tokens (as real labels mostly are); a user's
# `make-tiny --labels` answers take their place, as often
TEST_LABELS = ["tone", "chirp", "noise", "clicks", "silence"]


@dataclass(frozen=True)
class TinyModels:
    """Paths of a tiny model suite written by `build_tiny_models`."""

    root: Path
    whisper: Path
    whisper_ct2: Path | None
    llm: Path
    checkpoint: Path
    config: LtuAsConfig


def tiny_config(whisper_source: str = "", llm_source: str = "", vocab_size: int = 400, **llm: object) -> LtuAsConfig:
    """An `LtuAsConfig` with tiny widths and the real 10 s / 25-token structure."""
    return LtuAsConfig(
        whisper=dict(TINY_WHISPER),
        llm={**TINY_LLAMA, "vocab_size": vocab_size, **llm},
        whisper_source=whisper_source,
        llm_source=llm_source,
    )


# --- LLaMA side ------------------------------------------------------------------------------------------------
def save_llama_tokenizer(folder: Path, vocab_size: int = 400, labels: list[str] | None = None) -> None:
    """Train a small SentencePiece BPE model (byte fallback, unk 0, bos 1, eos 2, no pad) in the Vicuna layout."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*CORPUS, "\n".join((labels or TEST_LABELS) * 8)] * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )


def save_tiny_llama(
    folder: Path,
    *,
    seed: int = 0,
    vocab_size: int = 400,
    initializer_range: float = 0.1,
    labels: list[str] | None = None,
    **dims: Any,
) -> Path:
    """A random `LlamaForCausalLM` with a SentencePiece tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    save_llama_tokenizer(folder, vocab_size, labels)
    vocab = len(AutoTokenizer.from_pretrained(str(folder)))
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA, **dims, "vocab_size": vocab, "initializer_range": initializer_range})
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


# --- Whisper side ------------------------------------------------------------------------------------------------
def _whisper_tokenizer(vocab_size: int = 400) -> WhisperTokenizer:
    """An English-only Whisper tokenizer: byte-level BPE trained here plus the special tokens in canonical order."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AddedToken, WhisperTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [*CORPUS, "\n".join(TEST_LABELS * 8)] * 4, vocab_size=vocab_size, min_frequency=1, show_progress=False
    )
    vocab = bpe.get_vocab()
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ] + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    return tok


def save_tiny_whisper(
    folder: Path, *, seed: int = 0, init_std: float = 0.2, dims: dict[str, Any] | None = None
) -> Path:
    """A random English-only `WhisperForConditionalGeneration` saved as a Hugging Face folder (real layout).
    `dims`: WhisperConfig fields over the tiny ones (e.g. large-v2's `d_model`, layers, heads: what a benchmark
    of ASR cost needs; the vocabulary stays the tiny one)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tok = _whisper_tokenizer()
    vocab = tok.get_vocab()  # with the added special tokens
    ids = {t: vocab[t] for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")}
    torch.manual_seed(seed)
    cfg = WhisperConfig(
        **{**TINY_WHISPER, **TINY_WHISPER_DECODER, **(dims or {})},
        vocab_size=len(tok),
        init_std=init_std,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[ids["<|endoftext|>"]],
    )
    model = WhisperForConditionalGeneration(cfg)
    # Random decoders collapse onto one special (timestamp) token and so transcribe everything as "". With the
    # special tokens' embeddings (tied to the output layer) at zero, text tokens win: the tiny model emits
    # meaningless but non-empty text, which exercises partial and final transcripts for real.
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[ids["<|endoftext|>"] + 1 :] = 0.0
    model.generation_config = GenerationConfig(
        decoder_start_token_id=cfg.decoder_start_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        suppress_tokens=[],
        begin_suppress_tokens=cfg.begin_suppress_tokens,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=False,
        max_length=cfg.max_target_positions,
    )
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    # Saved by itself: WhisperProcessor.save_pretrained writes processor_config.json in transformers 5.
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(folder))
    return folder


def convert_to_ctranslate2(hf_folder: Path, out_folder: Path) -> Path:
    """Convert a Hugging Face Whisper folder to the CTranslate2 layout faster-whisper loads."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_folder), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(out_folder), force=True
    )
    return out_folder


# --- LTU-AS trainable parts -------------------------------------------------------------------------------------
def randomize_trainable_(model: LtuAsForConditionalGeneration, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable tensor (TLTR, projector, LoRA A *and* B) random values, so that LoRA is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.trainable_state_dict().items():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * std + (1.0 if name.endswith("ln.weight") else 0.0))


def build_tiny_models(
    root: str | Path,
    *,
    seed: int = 0,
    ct2: bool = True,
    llm_heads: int | None = None,
    labels: list[str] | None = None,
    **llm_dims: Any,
) -> TinyModels:
    """Write the whole tiny suite under `root` (about 3 s with the CTranslate2 conversion) and return its paths.

    `llm_heads`: attention heads of the tiny LLaMA (default 4, head size 16). vLLM's CPU attention needs a head
    size of at least 32, so the vLLM tests use 2 heads. `labels`: answers the tokenizer should know as words (a
    real vocabulary spells most labels in a token or two). `llm_dims`: other tiny LLaMA dims (hidden_size, ...)."""
    from .loading.checkpoint import save_official_checkpoint
    from .loading.load import load_components

    root = Path(root)
    whisper = save_tiny_whisper(root / "whisper", seed=seed)
    whisper_ct2 = convert_to_ctranslate2(whisper, root / "whisper-ct2") if ct2 else None
    heads = {} if llm_heads is None else {"num_attention_heads": llm_heads, "num_key_value_heads": llm_heads}
    heads |= llm_dims
    llm = save_tiny_llama(root / "llm", seed=seed + 1, labels=labels, **heads)
    config = tiny_config(
        str(whisper), str(llm), vocab_size=int(json.loads((llm / "config.json").read_text())["vocab_size"]), **heads
    )
    model = load_components(config, device="cpu", dtype="fp32", progress=False)
    randomize_trainable_(model, seed=seed + 2)
    checkpoint = save_official_checkpoint(model, root / "ltuas_tiny.bin")
    return TinyModels(root, whisper, whisper_ct2, llm, checkpoint, model.config)


SOUND_CLASSES = ("tone", "chirp", "noise", "clicks", "silence")
SOUND_QUESTION = "What sound is this?"


def _sound(kind: str, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    """10 s of one synthetic class with light background noise; parameters random per clip."""
    n = 10 * sr
    t = np.arange(n) / sr
    x = 0.003 * rng.standard_normal(n)
    if kind == "tone":
        a = rng.uniform(0, 4)
        b = a + rng.uniform(4, 6)
        x += 0.3 * np.sin(2 * np.pi * rng.uniform(300, 3000) * t) * ((t >= a) & (t < b))
    elif kind == "chirp":
        f0 = rng.uniform(200, 3500)
        f1 = f0 + rng.choice([-1, 1]) * rng.uniform(800, 2500)
        f1 = float(np.clip(f1, 100, 7000))
        x += 0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / 20))
    elif kind == "noise":
        for _ in range(rng.integers(2, 9)):
            s, d = rng.uniform(0, 9), rng.uniform(0.1, 1)
            m = (t >= s) & (t < s + d)
            x[m] += 0.3 * rng.standard_normal(int(m.sum()))
    elif kind == "clicks":
        period = int(sr / rng.uniform(2, 20))
        x[rng.integers(0, period) :: period] += 0.8
    elif kind != "silence":
        raise ValueError(kind)
    return np.clip(x, -1, 1).astype(np.float32)


def write_sound_classes(root: str | Path, per_class: int, *, seed: int, split: str) -> Path:
    """A synthetic closed-ended dataset in the Open-ASQA format: `per_class` 10 s WAV clips of each of
    `SOUND_CLASSES` under `root/<split>/`, and `root/<split>.json` asking `SOUND_QUESTION` with the class name
    as the answer. Used by the learning test and the training docs."""
    import wave

    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for kind in SOUND_CLASSES:
        for i in range(per_class):
            audio_id = f"{split}/{kind}_{i:03d}.wav"
            with wave.open(str(root / audio_id), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((_sound(kind, rng) * 32767).astype("<i2").tobytes())
            records.append(
                {
                    "instruction": SOUND_QUESTION,
                    "input": "",
                    "output": kind,
                    "audio_id": audio_id,
                    "dataset": "synthetic_sounds",
                    "task": "cla_label",
                }
            )
    path = root / f"{split}.json"
    path.write_text(json.dumps(records, indent=0))
    return path
