"""Precomputed audio features for training: one `[L, T, D]` tensor per audio file (`[32, 25, 1280]` for the real
encoder), in a folder with a manifest.

    out/manifest.json   {"meta": {dtype, device_type, encoder, feature_shape}, "files": {audio_id: file},
                         "failed": {audio_id: reason}}
    out/features/<n>.safetensors

The meta matters: the authors found features differ by GPU type, so training and inference should use features
made the same way. An audio file that cannot be decoded is recorded under "failed" and never saved as zeros.
Extraction is resumable: files already in the manifest are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import resolve_audio

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _file_name(audio_id: str) -> str:
    return hashlib.sha1(audio_id.encode()).hexdigest()[:20] + ".safetensors"


class FeatureStore:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        self.manifest = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "files": {}, "failed": {}}

    def __contains__(self, audio_id: str) -> bool:
        return audio_id in self.manifest["files"]

    @property
    def failed(self) -> dict[str, str]:
        return self.manifest["failed"]

    def load(self, audio_id: str) -> torch.Tensor:
        """`[L, T, D]` features of `audio_id`. Raises KeyError for an id that was not extracted (or failed)."""
        if audio_id not in self.manifest["files"]:
            why = self.failed.get(audio_id)
            raise KeyError(f"no features for {audio_id!r}" + (f": extraction failed ({why})" if why else ""))
        return load_file(str(self.folder / "features" / self.manifest["files"][audio_id]))["features"]

    def save_manifest(self) -> None:
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.folder / MANIFEST)  # atomic: an interrupted run never leaves a broken manifest


def _decode(path: Path) -> np.ndarray:
    from ..model.audio import load_audio

    audio = load_audio(str(path))
    if audio.size == 0:
        raise ValueError("no audio samples")
    return audio


class FeatureEncoder:
    """Only the frozen Whisper encoder (no LLM): what feature extraction needs."""

    def __init__(self, whisper: str | Path, device: str = "auto", dtype: str = "auto") -> None:
        from ..loading.precision import resolve_device, resolve_dtype
        from ..loading.sources import resolve
        from ..model.config import LtuAsConfig
        from ..model.encoder import load_whisper_encoder, read_whisper_config
        from ..model.processor import LtuAsProcessor

        folder = resolve(str(whisper), "Whisper encoder")
        base = LtuAsConfig()
        self.config = base.replace(whisper={**base.whisper, **read_whisper_config(folder)}, whisper_source=str(whisper))
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        encoder = load_whisper_encoder(folder, self.config.n_positions)
        # transformers' `@wraps(nn.Module.to)` on its override hides the bound signature from type checkers
        self.encoder = encoder.to(device=self.device, dtype=self.dtype).eval()  # type: ignore[call-arg]
        self.processor = LtuAsProcessor(None, self.config)  # for its log-mel only

    @torch.no_grad()
    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """`[B, n_mels, 1000]` → `[B, L, T, D]` (as `LtuAsForConditionalGeneration.audio_features` computes it)."""
        from ..model.encoder import pooled_layer_states

        return pooled_layer_states(self.encoder, mel.to(self.device, self.dtype), self.config.pool)


def extract_features(
    encoder: FeatureEncoder,
    audio_ids: Iterable[str],
    audio_root: str | Path,
    out: str | Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    retry_failed: bool = False,
) -> FeatureStore:
    """Compute features for every audio id not yet in `out`, batched. Ids whose extraction failed before are
    skipped, or tried again with `retry_failed` (after the files were fixed)."""
    store = FeatureStore(out)
    (store.folder / "features").mkdir(parents=True, exist_ok=True)
    meta = {
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "device_type": encoder.device.type,
        "device_name": torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else "cpu",
        "encoder": encoder.config.whisper_source,
        "feature_shape": list(encoder.config.feature_shape),
    }
    if store.manifest["meta"] and {k: store.manifest["meta"].get(k) for k in ("dtype", "device_type", "encoder")} != {
        k: meta[k] for k in ("dtype", "device_type", "encoder")
    }:
        raise ValueError(
            f"{out} holds features made with {store.manifest['meta']}; these would be {meta}. "
            "Use another --out (features differ by encoder, dtype and device type)"
        )
    store.manifest["meta"] = meta
    if retry_failed:
        for audio_id in list(store.failed):
            del store.failed[audio_id]
    todo = sorted({a for a in audio_ids if a not in store and a not in store.failed})
    bar = tqdm(total=len(todo), desc="features", unit="file", disable=not progress)
    for i in range(0, len(todo), batch_size):
        batch, mels = [], []
        for audio_id in todo[i : i + batch_size]:
            try:
                mels.append(encoder.processor.mel(_decode(resolve_audio(audio_root, audio_id))))
                batch.append(audio_id)
            except Exception as e:  # PyAV raises many types; the file is recorded as failed, never zero-filled
                store.failed[audio_id] = f"{type(e).__name__}: {e}"
                log.warning("cannot decode %s: %s", audio_id, e)
        if batch:
            feats = encoder(torch.stack(mels)).float().cpu()
            for audio_id, f in zip(batch, feats, strict=True):
                name = _file_name(audio_id)
                save_file({"features": f.contiguous()}, str(store.folder / "features" / name))
                store.manifest["files"][audio_id] = name
        store.save_manifest()  # after every batch: an interrupted run resumes here
        bar.update(len(todo[i : i + batch_size]))
    bar.close()
    return store


def same_encoder(a: str, b: str) -> bool:
    """Whether two Whisper sources name the same encoder (local paths compared resolved)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b
