"""Shared fixtures: one tiny random model suite per test session, built in the real file layouts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

# Before anything imports huggingface_hub: no network, ever (a miss would otherwise retry the hub for ~20 s).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from wire_check import validate_every_received_message  # noqa: F401 (an autouse fixture: every message checked)

from ltu_as import load_model
from ltu_as.testing import TinyModels, build_tiny_models


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def loaded(tiny: TinyModels):
    torch.manual_seed(0)
    return load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", dtype="fp32", progress=False)


@pytest.fixture()
def clip() -> torch.Tensor:
    """6 s of a 440 Hz tone with a noise burst, 16 kHz float32."""
    g = torch.Generator().manual_seed(1)
    t = torch.arange(6 * 16000) / 16000
    x = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.02 * torch.randn(t.shape, generator=g)
    x[32000:40000] += 0.3 * torch.randn(8000, generator=g)
    return x.float()


ASSET = __import__("pathlib").Path(__file__).resolve().parents[1] / "daemon" / "assets" / "demo_speech.ogg"

# Where speech is in the demo asset (s): espeak-ng sentences laid out by sox; a 880 Hz tone at 6.0-7.5 and a
# noise burst at 14.1-15.1 sit between them (see tests/unit/test_vad.py for the energy-based check of these).
ASSET_SPEECH = [(1.5, 4.0), (9.0, 12.14), (16.64, 19.32)]


@pytest.fixture(scope="session")
def speech():
    """The demo asset decoded to [n] float32 at 16 kHz (whole-file decoding, independent of the daemon's
    streaming file source)."""
    from ltu_as.model.audio import load_audio

    return load_audio(str(ASSET))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Real headless Chromium (Debian's `chromium` and `chromium-driver`), driven by Selenium."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or ""), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
