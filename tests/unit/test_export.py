"""`export_llm` / `ltu-as export-llm`: merged/ is the LTU-AS LLM as a plain LlamaForCausalLM, base/ + adapter/
through peft give the same logits, and the output folder is never clobbered without --overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaForCausalLM

from ltu_as.cli import main
from ltu_as.loading.export import ExportError, export_llm, parse_parts


@pytest.fixture(scope="module")
def export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    manifest = export_llm(tiny.checkpoint, out, whisper=tiny.whisper, llm=tiny.llm, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def embeds(tiny) -> torch.Tensor:
    hidden = tiny.config.d_llm
    return torch.randn(1, 10, hidden, generator=torch.Generator().manual_seed(3))


def hf_logits(model: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs_embeds=embeds).logits


def load_llama(folder) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_merged_is_the_ltu_as_llm(export, loaded, embeds) -> None:
    out, _ = export
    merged = load_llama(out / "merged")
    ours = hf_logits(loaded.model.llm, embeds)
    torch.testing.assert_close(hf_logits(merged, embeds), ours, rtol=0, atol=1e-5)
    base = hf_logits(load_llama(out / "base"), embeds)
    assert not torch.allclose(base, ours, atol=1e-3), "base/ carries the LoRA, or merged/ does not"
    with loaded.model.language_model.disable_adapter():
        torch.testing.assert_close(base, hf_logits(loaded.model.llm, embeds), rtol=0, atol=1e-5)
    cfg = json.loads((out / "merged" / "config.json").read_text())
    gen = json.loads((out / "merged" / "generation_config.json").read_text())
    tok = loaded.processor.tokenizer
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (gen["bos_token_id"], gen["eos_token_id"])
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert (out / "merged" / "tokenizer_config.json").is_file() and (out / "base" / "tokenizer.model").is_file()


def test_base_plus_adapter_equals_merged(export, embeds) -> None:
    out, _ = export
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(out / "base")
    peft = PeftModel.from_pretrained(load_llama(adapter_cfg["base_model_name_or_path"]), str(out / "adapter")).eval()
    torch.testing.assert_close(
        hf_logits(peft, embeds), hf_logits(load_llama(out / "merged"), embeds), rtol=0, atol=1e-5
    )


def test_merged_has_only_stock_names(export) -> None:
    out, _ = export
    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    keys = file_keys | set(load_llama(out / "merged").state_dict())
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert "model.layers.0.self_attn.q_proj.weight" in file_keys


def test_manifest(export) -> None:
    out, manifest = export
    assert json.loads((out / "export.json").read_text()) == manifest
    assert manifest["parts"] == {p: str(out / p) for p in ("base", "adapter", "merged")}
    assert manifest["llm"]["head_dim"] == 16 and manifest["llm"]["hidden_size"] == 64
    assert manifest["vllm_command"] == (
        f"python -m vllm.entrypoints.openai.api_server --model {out / 'merged'} --dtype float32 "
        "--enable-prompt-embeds --max-model-len 512"  # the tiny LLaMA's max_position_embeddings (< 1024)
    )
    assert any("head_dim 16 < 32" in w for w in manifest["warnings"])
    assert any("51122" in n for n in manifest["notes"])


def test_non_empty_out_needs_overwrite(export, tiny, capsys) -> None:
    out, _ = export
    with pytest.raises(ExportError, match="--overwrite"):
        export_llm(tiny.checkpoint, out, whisper=tiny.whisper, llm=tiny.llm, progress=False)
    args = ["export-llm", str(tiny.checkpoint), str(out), "--whisper", str(tiny.whisper), "--llm", str(tiny.llm)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["export-llm", str(out / "missing.bin"), str(out.parent / "other")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_cli_overwrite_one_part(tiny, tmp_path, capsys) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("old")
    (tmp_path / "keep.txt").write_text("mine")
    args = ["export-llm", str(tiny.checkpoint), str(tmp_path), "--whisper", str(tiny.whisper), "--llm", str(tiny.llm)]
    assert main([*args, "--parts", "merged", "--overwrite", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "--dtype bfloat16" in printed and str(tmp_path / "merged") in printed
    assert not (tmp_path / "merged" / "stale.txt").exists() and (tmp_path / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "base").exists()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_parse_parts() -> None:
    assert parse_parts("adapter, merged") == ("merged", "adapter")
    with pytest.raises(ExportError, match="unknown"):
        parse_parts("merged,lora")
    with pytest.raises(ExportError, match="no export parts"):
        parse_parts("")
