"""Protocol v1: parsing client messages (every bad one is a documented error with its `re`), the server models,
and the three sources of truth agreeing: the models, the published schema and docs/protocol.md."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import jsonschema
import pytest

from daemon.delivery.events import (
    EVENT_TYPES,
    AlertEvent,
    AlertRules,
    AnswerDone,
    AnswerTimings,
    ErrorEvent,
    Evidence,
    RuleInfo,
    ServerMessage,
    StreamEvent,
    Welcome,
    WindowRef,
    encode,
)
from daemon.delivery.protocol import Ask, AudioStart, Hello, ProtocolError, json_schema, parse_client_message
from daemon.delivery.wire import MAX_JSON_DEPTH, MAX_QUESTION_CHARS, CloseCode, ErrorCode
from daemon.rules import AlertRule

DOCS = Path(__file__).resolve().parents[2] / "docs"


def error(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse_client_message(text)
    return e.value


@pytest.mark.parametrize(
    ("text", "code", "re"),
    [
        ("{not json", ErrorCode.BAD_JSON, None),
        ("[1, 2]", ErrorCode.BAD_MESSAGE, None),
        ('{"id": 3}', ErrorCode.BAD_MESSAGE, 3),  # no type
        ('{"type": "dance", "id": "d"}', ErrorCode.UNKNOWN_TYPE, "d"),
        ('{"type": 5}', ErrorCode.UNKNOWN_TYPE, None),
        ('{"type": "hello"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "hello", "protocol": "1", "id": 1}', ErrorCode.BAD_MESSAGE, 1),
        ('{"type": "audio.start", "stream": "x", "rate": 1000}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "audio.start", "stream": "x", "rate": 16000, "format": "mp3"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "subscribe", "events": ["level"], "extra": 1}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "ping", "id": true}', ErrorCode.BAD_MESSAGE, None),  # a bool is not an id, and is not echoed
        ('{"type": "ping", "id": 9007199254740993}', ErrorCode.BAD_MESSAGE, None),  # beyond what JS can echo
        ('{"type": "ping", "id": 1, "id": 2}', ErrorCode.BAD_JSON, None),  # duplicate keys are ambiguous
        ('{"type": "ask", "id": 1, "question": "x", "at": NaN}', ErrorCode.BAD_JSON, None),
        ('{"type": "ask", "id": 1, "question": "x", "at": 1e999}', ErrorCode.BAD_JSON, None),
        ('{"type": "ping", "id": ' + "9" * 5000 + "}", ErrorCode.BAD_JSON, None),  # over Python's int digits limit
        ("[" * 1000 + "]" * 1000, ErrorCode.BAD_MESSAGE, None),  # deeper than json's own recursion limit
        (
            '{"type": "ping", "id": 1, "x": ' + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}",
            ErrorCode.BAD_MESSAGE,
            1,
        ),
        ('{"type": "ask", "id": "q", "question": ""}', ErrorCode.BAD_MESSAGE, "q"),
        ('{"type": "ask", "question": "no id"}', ErrorCode.BAD_MESSAGE, None),
        (
            '{"type": "ask", "id": "q", "question": "' + "x" * (MAX_QUESTION_CHARS + 1) + '"}',
            ErrorCode.BAD_MESSAGE,
            "q",
        ),
        ('{"type": "ask", "id": "q", "question": "x", "window": "k:w1", "at": 3}', ErrorCode.BAD_MESSAGE, "q"),
        ('{"type": "ask", "id": "q", "question": "x", "window": "k:w1", "stream": "p"}', ErrorCode.BAD_MESSAGE, "q"),
        ('{"type": "ask", "id": "q", "question": "x", "window": "nonsense"}', ErrorCode.BAD_MESSAGE, "q"),
        ('{"type": "cancel", "id": 4}', ErrorCode.BAD_MESSAGE, 4),
    ],
)
def test_bad_client_messages(text: str, code: ErrorCode, re: object) -> None:
    e = error(text)
    assert (e.code, e.re) == (code, re), e.message
    event = json.loads(encode(e.event()))
    assert event["type"] == "error" and event["code"] == code.value and event["re"] == re


def test_good_client_messages() -> None:
    hello = parse_client_message('{"type": "hello", "protocol": 1, "id": 7, "subscribe": {"events": ["level"]}}')
    assert isinstance(hello, Hello) and hello.id == 7 and list(hello.subscribe.events) == ["level"]
    assert list(hello.subscribe.streams) == ["*"]
    start = parse_client_message('{"type": "audio.start", "stream": "porch", "rate": 48000, "channels": 2}')
    assert isinstance(start, AudioStart) and start.format == "s16le"
    ask = parse_client_message(
        '{"type": "ask", "id": "q", "question": "?", "window": "k:w12", "stream": "k", "temperature": 1}'
    )
    assert isinstance(ask, Ask) and ask.window == "k:w12" and ask.temperature == 1.0
    deep = '{"type": "ping", "x": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    with pytest.raises(ProtocolError) as e:  # the depth limit is not what refuses it: the unknown field is
        parse_client_message(deep)
    assert "x" in e.value.message and "nested" not in e.value.message


def test_every_server_message_validates_against_the_published_schema() -> None:
    schema = json_schema()
    server = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/ServerMessage"})
    ref = WindowRef(id="k:w1", stream="k", start=0.0, end=10.0, transcript="hi")
    samples: list[ServerMessage] = [
        Welcome(
            re=1,
            protocol=1,
            server="ltu-daemon 0",
            streams=[],
            events=list(EVENT_TYPES),
            subscribe=Hello(type="hello", protocol=1).subscribe,
            demo=False,
            model=True,
        ),
        AnswerDone(
            re="q",
            text="a",
            tokens=1,
            token_ids=[5],
            reason="eos",
            scope="live",
            window=ref,
            evidence=[Evidence(id="k:w1", stream="k", start=0, end=10, wall_start=None, wall_end=None)],
            timings=AnswerTimings(queue_ms=1, ttft_ms=None, tokens_per_s=None, total_ms=2),
        ),
        ErrorEvent(code=ErrorCode.INTERNAL, message="x", re="q"),
        AlertRules(
            re=2,
            rules=[
                RuleInfo(
                    rule=AlertRule(name="smoke", kind="question", question="Smoke?"), source="config", active=["k"]
                )
            ],
        ),
        AlertEvent(
            stream="k",
            seq=1,
            id="smoke/k/1",
            rule="smoke",
            kind="question",
            window=None,
            at=3.0,
            wall=None,
            evidence="Smoke?",
            score=0.9,
            clip=None,
        ),
    ]
    for m in samples:
        server.validate(json.loads(encode(m)))
    bad = json.loads(encode(samples[0]))
    del bad["model"]
    with pytest.raises(jsonschema.ValidationError):
        server.validate(bad)


def _names(union: object) -> set[str]:
    return {typing.get_args(c.model_fields["type"].annotation)[0] for c in typing.get_args(union)}


def test_docs_schema_and_models_agree() -> None:
    doc = (DOCS / "protocol.md").read_text()
    assert set(EVENT_TYPES) == _names(StreamEvent) and len(EVENT_TYPES) == 13
    for name in _names(ServerMessage) | set(EVENT_TYPES):
        assert f"`{name}`" in doc, f"docs/protocol.md does not describe {name}"
    documented_codes = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert {c.value for c in ErrorCode} <= documented_codes, "an error code is missing from docs/protocol.md"
    for code in CloseCode:
        assert re.search(rf"^\| {int(code)} \|", doc, re.M), f"close code {int(code)} is not documented"
    assert f"{MAX_QUESTION_CHARS}" in doc and f"{MAX_JSON_DEPTH}" in doc
    # the event table is one table: no blank line inside it
    table = doc[doc.index("| `level` |") - 200 : doc.index("| `scene` |")]
    assert "\n\n|" not in table[table.index("| type |") :]
