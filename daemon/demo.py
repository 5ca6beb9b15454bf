"""The demo profile: tiny random models built locally in place of the real ones, so the whole daemon runs on a
machine with no weights and no microphone. Everything it transcribes is meaningless, and it says so."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import DaemonConfig

log = logging.getLogger(__name__)

BANNER = """
  ================================================================================
   DEMO PROFILE: the models are tiny and RANDOMLY initialised, built on this machine.
   Transcripts are meaningless noise. Everything else (capture, VAD, streaming,
   protocol) is real. For real output, configure real models: config/default.toml.
  ================================================================================
"""


def demo_asr_model(models_dir: Path) -> Path:
    return models_dir / "tiny" / "whisper-ct2"


def prepare_demo(config: DaemonConfig) -> DaemonConfig:
    """Build the tiny models once (~5 s) and point the ASR at them. No-op unless `demo.enabled`."""
    if not config.demo.enabled:
        return config
    target = demo_asr_model(config.demo.models_dir)
    if not (config.demo.models_dir / "tiny" / "ltuas_tiny.bin").is_file():  # written last: the build finished
        from ltu_as.testing import build_tiny_models

        log.info("demo: building tiny random models in %s", config.demo.models_dir / "tiny")
        build_tiny_models(config.demo.models_dir / "tiny", seed=0, ct2=True)
    tiny = config.demo.models_dir / "tiny"
    model = config.model.model_copy(
        update={"checkpoint": str(tiny / "ltuas_tiny.bin"), "whisper": str(tiny / "whisper"), "llm": str(tiny / "llm")}
    )
    return config.model_copy(update={"asr": config.asr.model_copy(update={"model": str(target)}), "model": model})
