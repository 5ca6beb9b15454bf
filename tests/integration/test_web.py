"""The web page in real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) against the
demo daemon: it connects with the token typed in, shows levels, live transcript (the real tiny.en) and scenes, asks
a question and renders the streamed answer with the window it cites, shows an alert fired by a rule, survives a
daemon restart, refuses a wrong token, and shows hostile stored text as text. Screenshots at a desktop and a phone
width are saved under the folder the tests print."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ASSET
from daemon_harness import Daemon
from web_harness import SHOTS, axe_serious, screenshots, wait_for

from daemon.config import StoreConfig
from daemon.delivery.events import WindowEvent
from daemon.memory.store import Store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("chromium") is None or shutil.which("chromedriver") is None,
        reason="needs Debian's chromium and chromium-driver (apt; .ci/run installs them)",
    ),
]

TOKEN = "web-test-token"
HOSTILE = '<img src=x onerror="window.__pwned=1">kettle <b>bold</b>'


def daemon_config(tmp: Path) -> str:
    return f"""
[server]
token = "{TOKEN}"

[demo]
enabled = true
models_dir = "{tmp / "demo"}"

[store]
path = "{tmp / "history.db"}"
embeddings = false
clips = true
commit_interval_s = 0.2

[alerts]
[[alerts.rules]]
name = "kettle"
kind = "phrase"
match = "kettle"
clip = true

[[streams]]
name = "demo"
source = "file"
path = "{ASSET}"
realtime = true
loop = true
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("web")
    # a stored window whose transcript is hostile HTML: the page must show it as text (history search)
    store = Store(StoreConfig(path=tmp / "history.db", embeddings=False), None)
    store.open()
    store.start()
    now = time.time()
    store.record(WindowEvent(stream="old", id="old:w1", start=0, end=10, wall_start=now - 90, wall_end=now - 80,
                             transcript=HOSTILE))  # fmt: skip
    store.stop(10)
    d = Daemon(tmp, daemon_config(tmp), wait_ready=False)
    d.wait_ready(180)
    yield d
    d.stop()


def text(browser: Any, element_id: str) -> str:
    return str(browser.find_element("id", element_id).text)


def log_in(browser: Any, daemon: Daemon, token: str) -> None:
    """Open the page with no token remembered: the daemon refuses the hello, the page asks; type `token`."""
    browser.get(f"http://127.0.0.1:{daemon.port}/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"http://127.0.0.1:{daemon.port}/")
    form = wait_for(lambda: browser.find_element("id", "token-form").is_displayed(), 30, "the token form")
    assert form
    field = browser.find_element("id", "token")
    field.clear()
    field.send_keys(token)
    browser.find_element("css selector", "#token-form button").click()


def test_wrong_token_is_refused_and_said(browser: Any, daemon: Daemon) -> None:
    log_in(browser, daemon, "not-the-token")
    assert wait_for(lambda: "refused this token" in text(browser, "connection"), 30, "the refusal")
    assert browser.find_element("id", "token-form").is_displayed()  # asks again


def test_live_views_ask_alert_and_hostile_text(browser: Any, daemon: Daemon) -> None:
    log_in(browser, daemon, TOKEN)
    assert wait_for(lambda: text(browser, "connection") == "connected", 30, "connected")
    assert browser.find_element("id", "demo").is_displayed()  # the demo badge
    assert not browser.find_element("id", "token-form").is_displayed()  # asked for once, then out of the way
    # level: the stream's meter moves off its floor
    assert wait_for(
        lambda: float(browser.find_element("css selector", "#streams meter").get_attribute("value")) > -80,
        30,
        "a level",
    )
    # the real tiny.en transcribes the clip: a final with its words
    assert wait_for(lambda: "kitchen" in text(browser, "transcript").lower(), 90, "a final transcript")
    # the rule on "kettle" fires on that transcript
    assert wait_for(lambda: "kettle" in text(browser, "alerts"), 60, "the alert")
    # a scene card per window
    assert wait_for(lambda: browser.find_elements("css selector", "#scenes li.card"), 90, "a scene")
    # ask about now: the answer streams in and cites the window
    browser.find_element("id", "question").send_keys("What do you hear?")
    browser.find_element("css selector", "#ask-form button").click()
    link = wait_for(lambda: browser.find_element("css selector", "#citations a"), 90, "a cited window")
    assert link.text.startswith("demo:w") and text(browser, "answer") not in ("", "…")
    # hostile stored text comes back from history search as text, and runs nothing
    browser.find_element("id", "query").send_keys("kettle")
    browser.find_element("css selector", "#search-form button").click()
    assert wait_for(lambda: "<img src=x" in text(browser, "results"), 30, "the stored hostile text")
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements("css selector", "#results img, #results b")
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1280, 900)
    browser.save_screenshot(str(SHOTS / "desktop.png"))
    browser.set_window_size(390, 844)
    time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / "phone.png"))
    browser.set_window_size(1280, 900)
    print(f"screenshots: {SHOTS}")


def test_accessibility_has_no_serious_violations(browser: Any, daemon: Daemon) -> None:
    """axe-core (the engine behind Lighthouse's accessibility audit) on the connected page, with live content."""
    log_in(browser, daemon, TOKEN)
    assert wait_for(lambda: "kitchen" in text(browser, "transcript").lower(), 90, "live content")
    serious = axe_serious(browser)
    assert not serious, serious


def test_timeline_shows_levels_and_events_filters_by_stream_and_plays_an_alert_clip(
    browser: Any, daemon: Daemon
) -> None:
    log_in(browser, daemon, TOKEN)
    assert wait_for(lambda: text(browser, "connection") == "connected", 30, "connected")
    assert wait_for(lambda: "kettle" in text(browser, "alerts"), 90, "the alert")

    def shown() -> Any:  # ask again until the store has a level bucket and the alert with its clip
        browser.find_element("css selector", "#timeline-form button").click()
        time.sleep(1.0)
        lane = browser.find_element("css selector", '#timeline figure[data-stream="demo"]')
        ready = lane.find_elements("css selector", "rect.level") and lane.find_elements("css selector", "li button")
        return lane if ready else None

    lane = wait_for(shown, 90, "a timeline lane with levels and an alert clip")
    assert lane.find_element("css selector", "figcaption").text == "demo"
    label = lane.find_element("css selector", "svg").get_attribute("aria-label")
    assert label.startswith("demo: level up to ") and "events" in label
    kinds = {li.find_element("css selector", ".kind").text for li in lane.find_elements("css selector", "li.mark")}
    assert {"speech", "alert"} <= kinds
    # stored before this daemon started: the "old" stream's window has its own lane under "all"
    assert browser.find_elements("css selector", '#timeline figure[data-stream="old"]')
    # the clip: fetched with the token, playable
    mark = lane.find_element("css selector", "li.kind-alert")
    assert "kettle:" in mark.text
    mark.find_element("css selector", "button").click()
    audio = wait_for(lambda: mark.find_element("css selector", "audio"), 30, "the clip's player")
    assert audio.get_attribute("src").startswith("blob:")
    wait_for(lambda: browser.execute_script("return arguments[0].readyState >= 1", audio), 30, "the clip's length")
    assert 1.0 < browser.execute_script("return arguments[0].duration", audio) <= 12.0
    # a filter: one stream only
    Select = __import__("selenium.webdriver.support.select", fromlist=["Select"]).Select
    Select(browser.find_element("id", "tl-stream")).select_by_value("demo")
    browser.find_element("css selector", "#timeline-form button").click()
    wait_for(lambda: not browser.find_elements("css selector", '#timeline figure[data-stream="old"]'), 30, "filtered")
    assert [f.get_attribute("data-stream") for f in browser.find_elements("css selector", "#timeline figure")] == [
        "demo"
    ]
    serious = axe_serious(browser)
    assert not serious, serious
    screenshots(browser, "timeline-view", "timeline")


def test_survives_a_daemon_restart(browser: Any, daemon: Daemon, tmp_path: Path) -> None:
    log_in(browser, daemon, TOKEN)
    assert wait_for(lambda: text(browser, "connection") == "connected", 30, "connected")
    port = daemon.port
    assert daemon.stop() == 0
    assert wait_for(lambda: "reconnecting" in text(browser, "connection"), 30, "the page noticing")
    again = Daemon(tmp_path, daemon_config(tmp_path), port=port, wait_ready=False)
    try:
        again.wait_ready(180)
        # the token is kept for the session: the page reconnects by itself
        assert wait_for(lambda: text(browser, "connection") == "connected", 60, "reconnected")
    finally:
        again.stop()
