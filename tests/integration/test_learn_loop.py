"""Teaching the daemon over the protocol, end to end on the tiny models: windows labelled (`label`), a fine-tune
job (`learn`) that reports its phases, scores the new checkpoint against the one in use on the held-out clips and
swaps it in; the next windows of those sounds are then described with their labels. After a restart the daemon
starts on the learned checkpoint; a worse job is refused and changes nothing; `learn.rollback` goes back.

The tiny models are random (no real weights here); the sounds are the synthetic classes of the learning test,
whose names the tiny tokenizer spells in one token each, like real labels."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import Daemon
from speech_audio import write_wav
from web_harness import NEEDS_CHROMIUM, axe_serious, screenshots, wait_for
from websockets.asyncio.client import ClientConnection, connect

from ltu_as.testing import _sound

pytestmark = [pytest.mark.integration, pytest.mark.learning, NEEDS_CHROMIUM]

ORDER = ("tone", "chirp", "clicks")  # the labels, as a user types them
PER_CLASS = 10  # two of each held out (learn.held_out 0.2), eight to train on


def config(tiny: Any, tmp: Path, past: Path, live: Path, extra: str = "") -> str:
    return f"""
[model]
checkpoint = "{tiny.checkpoint}"
whisper = "{tiny.whisper}"
llm = "{tiny.llm}"
device = "cpu"
dtype = "fp32"

[asr]
model = "bundled:tiny.en"
device = "cpu"
compute_type = "int8"
beam_size = 1

[audio]
ring_seconds = 400.0

[windows]
keep = 64
settle_max_s = 5.0

[learn]
enabled = true
dir = "{tmp / "learn"}"
device = "cpu"
dtype = "fp32"
{extra}

[[streams]]
name = "past"
source = "file"
path = "{past}"
realtime = false

[[streams]]
name = "live"
source = "file"
path = "{live}"
realtime = true
loop = true
"""


async def request(ws: ClientConnection, msg: dict[str, Any], events: list[dict]) -> dict[str, Any]:
    """Send `msg` and return its reply (matched by id); events meanwhile go to `events`."""
    await ws.send(json.dumps(msg))
    while True:
        e = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if e.get("re") == msg["id"]:
            return e
        events.append(e)


async def label_windows(ws: ClientConnection, events: list[dict], n: int, first: int = 1) -> list[dict]:
    """Label past:w<first>..w<first + n - 1> by the class each holds, retrying while a window is not cut yet."""
    out = []
    for i in range(first, first + n):
        deadline = time.monotonic() + 120
        while True:
            msg = {"type": "label", "id": f"l{i}", "window": f"past:w{i}", "label": ORDER[(i - 1) % 3]}
            reply = await request(ws, msg, events)
            if reply["type"] != "error" or reply["code"] != "unknown_window" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert reply["type"] == "labelled", reply
        out.append(reply)
    return out


async def until(ws: ClientConnection, events: list[dict], done: Any, timeout: float) -> dict[str, Any]:
    """Read events into `events` until `done(event)`; that event."""
    async with asyncio.timeout(timeout):
        while True:
            e = json.loads(await ws.recv())
            events.append(e)
            if done(e):
                return e


HELLO = {"type": "hello", "protocol": 1, "subscribe": {"events": ["scene", "learn.*"]}}


def teach_on_the_page(browser: Any, d: Daemon, out: dict[str, Any]) -> None:
    """As a user: mark three live scenes with what they are, teach the model, watch it learn, see the new labels."""
    browser.get(f"http://127.0.0.1:{d.port}/")
    wait_for(lambda: browser.find_element("id", "learn-view").is_displayed(), 60, "the learning section")
    items = browser.find_elements("css selector", "#labels li")
    assert sorted(i.text.split(":")[0] for i in items) == sorted(ORDER)
    marked: set[str] = set()

    def mark_one() -> bool:  # the newest unmarked live scene card
        for card in browser.find_elements("css selector", "#scenes li.card"):
            form = card.find_elements("css selector", "form.teach")
            window = form[0].get_attribute("data-window") if form else None
            if window and window.startswith("live:") and window not in marked:
                k = int(window.split(":w")[1])
                form[0].find_element("css selector", "input").send_keys(ORDER[(k - 1) % 3])
                form[0].find_element("css selector", "button[type=submit]").click()
                marked.add(window)
                return True
        return False

    for _ in range(3):
        wait_for(mark_one, 60, "a live scene to mark")
    wait_for(lambda: "11 examples" in browser.find_element("id", "labels").text, 30, "the marks counted")
    assert not axe_serious(browser)
    browser.find_element("id", "learn-now").click()
    wait_for(lambda: "train:" in browser.find_element("id", "learn-status").text, 300, "training progress")
    assert browser.find_element("id", "learn-progress").is_displayed()
    out["busy"] = browser.execute_script(
        "return new Promise((done) => { const ws = new WebSocket(`ws://${location.host}/`);"
        " ws.onopen = () => ws.send(JSON.stringify({type: 'hello', protocol: 1, id: 'h'}));"
        " ws.onmessage = (m) => { const e = JSON.parse(m.data);"
        "  if (e.type === 'welcome') ws.send(JSON.stringify({type: 'learn', id: 'x'}));"
        "  if (e.re === 'x') { ws.close(); done(e.code || e.type); } }; })"
    )
    screenshots(browser, "learn-view", "learn-progress")
    status = wait_for(
        lambda: (
            (t := browser.find_element("id", "learn-status").text).startswith(("the new model", "learning failed"))
            and t
        ),
        900,
        "the job's result",
    )
    print("page says:", status)
    assert status.startswith("the new model is in use"), status
    swapped = time.time()
    after: dict[str, str] = {}

    def described() -> bool:
        for card in browser.find_elements("css selector", "#scenes li.card"):
            window = card.get_attribute("id").removeprefix("win-")
            when = float(browser.execute_script("return arguments[0].dataset.time || 0", card))
            if window.startswith("live:") and when > swapped + 0.5:
                after.setdefault(window, card.find_element("css selector", "p").text)
        return len(after) >= 3

    wait_for(described, 120, "three live scenes after the swap")
    out["after"] = after
    assert not axe_serious(browser)
    screenshots(browser, "learn-view", "learn-done")


def test_label_learn_swap_describe_then_refuse_a_worse_job_and_roll_back(
    browser: Any, tiny: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    clips = {k: [_sound(k, rng) for _ in range(PER_CLASS)] for k in ORDER}
    past = write_wav(tmp_path / "past.wav", np.concatenate([clips[k][i] for i in range(PER_CLASS) for k in ORDER]))
    live = write_wav(tmp_path / "live.wav", np.concatenate([clips[k][0] for k in ORDER]))
    out: dict[str, Any] = {}

    async def label_by_protocol(url: str) -> None:
        events: list[dict] = []
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps(HELLO))
            assert json.loads(await ws.recv())["type"] == "welcome"
            out["early"] = await request(ws, {"type": "learn", "id": "early"}, events)
            out["labelled"] = await label_windows(ws, events, 3 * PER_CLASS)
            out["listed"] = await request(ws, {"type": "label.list", "id": "ls"}, events)

    async def watch(url: str, stop: asyncio.Event) -> None:
        """Everything the daemon publishes while the page teaches it (to check the events the page showed)."""
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps(HELLO))
            assert json.loads(await ws.recv())["type"] == "welcome"
            events = out.setdefault("events", [])
            while not stop.is_set():
                try:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 0.5)))
                except TimeoutError:
                    continue

    d = Daemon(tmp_path, config(tiny, tmp_path, past, live), wait_ready=False)
    try:
        d.wait_ready(180)
        asyncio.run(label_by_protocol(d.url))
        stop = asyncio.Event()
        loop = asyncio.new_event_loop()
        watcher = threading.Thread(target=lambda: loop.run_until_complete(watch(d.url, stop)), daemon=True)
        watcher.start()
        try:
            teach_on_the_page(browser, d, out)
        finally:
            loop.call_soon_threadsafe(stop.set)
            watcher.join(10)
    finally:
        assert d.stop() == 0, d.log()
    assert out["early"]["type"] == "error" and out["early"]["code"] == "too_few_clips", out["early"]
    assert [r["clips"] for r in out["labelled"][-3:]] == [PER_CLASS] * 3
    listed = out["listed"]
    assert {c["label"]: len(c["clips"]) for c in listed["classes"]} == dict.fromkeys(ORDER, PER_CLASS)
    assert listed["clips"] == 3 * PER_CLASS and listed["active"] is None and listed["min_clips"] == 5
    events = out["events"]
    started = [e for e in events if e["type"] == "learn.progress"]
    done = next(e for e in events if e["type"] == "learn.done")
    print("first job:", done)
    assert done["outcome"] == "swapped", done
    assert done["accuracy"] >= 0.6 and done["accuracy"] > done["previous_accuracy"]  # 6 held-out clips
    phases = [e["phase"] for e in started]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "dataset", "features", "train", "eval", "swap",
    ], phases  # fmt: skip
    steps = [e for e in started if e["phase"] == "train"]
    assert steps[-1]["done"] == steps[-1]["total"] > 0
    assert out["busy"] == "learn_busy"  # a second click while it ran was refused
    # the next window of each sound on the live stream, after the swap, as the page shows it
    for window, shown in out["after"].items():
        k = int(window.split(":w")[1])
        assert shown == ORDER[(k - 1) % 3], (window, shown)  # the live stream loops tone, chirp, clicks
    active = json.loads((tmp_path / "learn" / "active.json").read_text())
    assert active["checkpoint"] == done["checkpoint"] and active["previous"] == []

    # a restart starts on the learned checkpoint; a job that trains badly (a learning rate of 5) is refused
    worse = 'train_set = ["max_steps=3", "learning_rate=5.0"]'

    async def second_run(url: str) -> None:
        events: list[dict] = []
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps(HELLO))
            assert json.loads(await ws.recv())["type"] == "welcome"
            out["started2"] = await request(ws, {"type": "learn", "id": "go2"}, events)
            out["done2"] = await until(ws, events, lambda e: e["type"] == "learn.done", 600)
            out["back"] = await request(ws, {"type": "learn.rollback", "id": "back"}, events)
            out["none"] = await request(ws, {"type": "learn.rollback", "id": "none"}, events)

    d = Daemon(tmp_path, config(tiny, tmp_path, past, live, worse), wait_ready=False)
    try:
        d.wait_ready(180)
        asyncio.run(second_run(d.url))
    finally:
        assert d.stop() == 0, d.log()
    assert f"starting on the learned checkpoint {done['checkpoint']}" in d.log()
    done2 = out["done2"]
    print("worse job:", done2)
    assert done2["outcome"] == "refused" and done2["accuracy"] < done2["previous_accuracy"], done2
    assert done2["previous_accuracy"] == done["accuracy"]  # the checkpoint in use, on the same held-out clips
    assert done2["checkpoint"] is None
    assert out["back"]["type"] == "learn.rolled_back" and out["back"]["checkpoint"] == str(tiny.checkpoint)
    assert out["none"]["type"] == "error" and out["none"]["code"] == "bad_message"
    active = json.loads((tmp_path / "learn" / "active.json").read_text())
    assert active["checkpoint"] is None and not Path(done["checkpoint"]).exists()
