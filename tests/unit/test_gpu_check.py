"""The GPU check's runner (`bench/gpu_check.py`) without a GPU: every section is guarded (one that raises, or runs
past its budget, is recorded as failed and the others still run), results are written after every section, a
section whose budget no longer fits is skipped, and the table has a row for every section whatever happened.
The sections here are stand-ins; `tests/integration/test_gpu_check_dry_run.py` runs the real ones (the CPU dry run)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_check


def stand_ins(calls: list[str]) -> dict[str, Any]:
    def make(name: str) -> Any:
        def section() -> dict[str, Any]:
            calls.append(name)
            return {"value": len(name)}

        return section

    return {name: make(name) for name in gpu_check.SECTIONS}


@pytest.mark.parametrize("failing", list(gpu_check.SECTIONS))
def test_a_failed_section_leaves_every_other_sections_figures(failing: str) -> None:
    calls: list[str] = []
    written: list[dict[str, Any]] = []
    results = gpu_check.run_sections(
        stand_ins(calls), {}, lambda r: written.append(json.loads(json.dumps(r))), total_s=600, fail=failing
    )
    assert list(results) == list(gpu_check.SECTIONS)  # every section present, in order
    assert "forced failure" in results[failing]["failed"]
    for name, r in results.items():
        if name != failing:
            assert r["value"] == len(name), name
    assert failing not in calls and len(calls) == len(gpu_check.SECTIONS) - 1
    # written after every section: the n-th write holds the first n sections
    assert [list(w) for w in written] == [list(gpu_check.SECTIONS)[: i + 1] for i in range(len(gpu_check.SECTIONS))]


def test_an_exception_and_an_overrun_are_recorded_and_the_rest_runs() -> None:
    def boom() -> dict[str, Any]:
        raise ImportError("No module named 'torchao'")

    def slow() -> dict[str, Any]:
        time.sleep(5)
        return {"never": True}

    sections = {"a": boom, "b": slow, "c": lambda: {"value": 1}}
    results = gpu_check.run_sections(sections, {"b": 1.0}, lambda r: None, total_s=600)
    assert results["a"]["failed"] == "ImportError: No module named 'torchao'"
    assert results["b"]["failed"].startswith("SectionTimeout") and results["b"]["seconds"] < 3
    assert results["c"]["value"] == 1


def test_a_section_that_no_longer_fits_is_skipped() -> None:
    def slow() -> dict[str, Any]:
        time.sleep(0.5)
        return {"value": 1}

    sections = {"a": slow, "b": lambda: {"value": 2}, "c": lambda: {"value": 3}}
    results = gpu_check.run_sections(sections, {"a": 1.0, "b": 60.0, "c": 1.0}, lambda r: None, total_s=2.0)
    assert results["a"]["value"] == 1
    assert results["b"]["skipped"].startswith("out of time")
    assert results["c"]["value"] == 3  # a short section still fits in what is left


def test_the_table_has_a_row_for_every_section_failed_or_not() -> None:
    results = {name: {"failed": f"RuntimeError: {name} broke"} for name in gpu_check.SECTIONS}
    results["streams"] = {"skipped": "out of time (3 s left of 520)"}
    text = gpu_check.table(results)
    for name in gpu_check.SECTIONS:
        assert f"| {name} |" in text
    assert "| streams | skipped | out of time" in text


def test_a_section_failing_midway_keeps_what_it_measured() -> None:
    partial: dict[str, Any] = {}

    def sweep() -> dict[str, Any]:
        partial["8"] = {"tokens_per_s": 1000}
        raise RuntimeError("CUDA out of memory at 128 rows")

    def after() -> dict[str, Any]:
        partial["x"] = 1
        return partial

    results = gpu_check.run_sections({"rows": sweep, "next": after}, {}, lambda r: None, total_s=60, partial=partial)
    assert results["rows"]["8"] == {"tokens_per_s": 1000} and "out of memory" in results["rows"]["failed"]
    assert results["next"]["x"] == 1 and "8" not in results["next"]  # emptied between sections
    assert results["rows"]["8"] == {"tokens_per_s": 1000}  # and the earlier section's copy is its own


def test_the_static_cache_baseline_compiles_once_not_inside_its_timed_call() -> None:
    """`hf_rate(static=True)` warms `generate` at the length it times: one compile in all. The earlier bench warmed
    at 2 new tokens and timed another length, so the static cache changed size and dynamo compiled again inside
    the timed call (the guard `cache.layers[0].keys size mismatch`). Compile is forced on CPU here (transformers
    auto-compiles a static cache on CUDA only), with inductor's C++ backend."""
    import engine as eb
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    def compiled_llm() -> Any:
        llm = eb.build_llm(torch.device("cpu"), torch.float32, 1, "tiny")
        llm.generation_config.compile_config = CompileConfig()
        llm.generation_config.compile_config._compile_all_devices = True  # as on CUDA
        return llm

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        assert eb.hf_rate(compiled_llm(), 1, 6, torch.device("cpu"), static=True) > 0
        assert counters["frames"]["ok"] == 1  # compiled in the warm-up, reused by the timed call
        # the old order: warm-up at 2 tokens, then the timed call at 8: a second compile
        torch._dynamo.reset()
        counters.clear()
        llm = compiled_llm()
        emb = torch.cat([eb.prefix(llm, "w0"), llm.get_input_embeddings()(torch.tensor(eb.prompt(0)))])[None]
        kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "cache_implementation": "static"}
        llm.generate(inputs_embeds=emb, max_new_tokens=2, min_new_tokens=2, **kw)
        llm.generate(inputs_embeds=emb, max_new_tokens=8, min_new_tokens=8, **kw)
        assert counters["frames"]["ok"] == 2
