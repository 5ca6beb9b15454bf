"""Helpers of the page's tests in real headless Chromium (the `browser` fixture is in tests/conftest.py): waiting,
axe-core's audit and screenshots."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest
from daemon_harness import REPO

AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"  # npm ci (scripts/setup.sh), pinned in package-lock.json
SHOTS = REPO / "artifacts" / "web"
NEEDS_CHROMIUM = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="needs Debian's chromium and chromium-driver (apt; .ci/run installs them)",
)


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except Exception:  # the element is not there yet, or went stale while the page updated it
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def axe_serious(browser: Any) -> list[Any]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing: run `npm ci` (scripts/setup.sh does when npm is installed)")
    browser.execute_script(AXE.read_text())  # through the driver, not the page: the page's CSP allows no inline code
    result = browser.execute_async_script("const done = arguments[0]; axe.run(document).then(done);")
    print("axe violations:", [(v["id"], v["impact"]) for v in result["violations"]])
    return [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def screenshots(browser: Any, element_id: str, name: str) -> None:
    """`artifacts/web/<name>-desktop.png` and `-phone.png` of one section."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    section = browser.find_element("id", element_id)
    for size, (width, height) in {"desktop": (1280, 900), "phone": (390, 844)}.items():
        browser.set_window_size(width, height)
        browser.execute_script("arguments[0].scrollIntoView()", section)
        time.sleep(0.5)
        section.screenshot(str(SHOTS / f"{name}-{size}.png"))
    browser.set_window_size(1280, 900)
