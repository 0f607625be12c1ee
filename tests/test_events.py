"""
Tests of the event model: `Usage`, `Delta`, and `StreamEvent`'s JSON and SSE forms.
"""

from __future__ import annotations

import orjson
import pytest

from trioproxy._events import (
    EVENT_TYPES,
    OPENED,
    Delta,
    Opened,
    StreamEvent,
    ToolCallDelta,
    Usage,
)
from trioproxy._sse import SSEDecoder


def test_usage_totals() -> None:
    usage = Usage(prompt_tokens=9, completion_tokens=2)
    assert usage.total_tokens == 11
    assert usage.estimated is False
    assert usage.to_openai() == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert Usage(0, 0, estimated=True).to_openai() == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_delta_has_content() -> None:
    assert Delta(text="a").has_content is True
    assert Delta(tool_calls=(ToolCallDelta(index=0),)).has_content is True
    assert Delta().has_content is False
    assert Delta(role="assistant", text="").has_content is False
    assert Delta(finish_reason="stop", usage=Usage(1, 1)).has_content is False


def test_opened_is_a_singleton_value() -> None:
    assert Opened() == OPENED


def test_event_types() -> None:
    assert {"token", "chunk", "done", "error", "metadata"} == EVENT_TYPES


def test_to_json_is_compact_and_one_line() -> None:
    event = StreamEvent("token", "Hello\nwörld")
    assert event.to_json() == '{"type":"token","data":"Hello\\nwörld","metadata":{}}'
    assert "\n" not in event.to_json()
    assert StreamEvent("done", None, {"finish_reason": "stop"}).to_json() == (
        '{"type":"done","data":null,"metadata":{"finish_reason":"stop"}}'
    )


def test_to_dict() -> None:
    event = StreamEvent("metadata", "stream_start", {"model": "m"}, id="3")
    assert event.to_dict() == {"type": "metadata", "data": "stream_start", "metadata": {"model": "m"}}


def test_to_sse_without_id() -> None:
    event = StreamEvent("token", "hi")
    assert event.to_sse() == 'data: {"type":"token","data":"hi","metadata":{}}\n\n'


def test_to_sse_with_id() -> None:
    event = StreamEvent("token", "hi", id="42")
    assert event.to_sse() == 'id: 42\ndata: {"type":"token","data":"hi","metadata":{}}\n\n'


@pytest.mark.parametrize(
    "event",
    [
        StreamEvent("token", "a"),
        StreamEvent("chunk", "several words\r\nand lines"),
        StreamEvent("metadata", "tool_call", {"index": 0, "id": None, "name": "f", "arguments": "{"}),
        StreamEvent("done", None, {"usage": {"prompt_tokens": 1}, "finish_reason": "stop"}, id="7"),
        StreamEvent("error", {"message": "boom", "type": "upstream_error", "code": None, "status": 502}),
    ],
)
def test_round_trip(event: StreamEvent) -> None:
    assert StreamEvent.from_json(event.to_json(), id=event.id) == event
    assert StreamEvent.from_json(event.to_json().encode(), id=event.id) == event
    [decoded] = SSEDecoder().feed(event.to_sse().encode())
    assert StreamEvent.from_json(decoded.data, id=decoded.id or None) == event


def test_from_dict_defaults() -> None:
    assert StreamEvent.from_dict({"type": "token"}) == StreamEvent("token", None, {})
    assert StreamEvent.from_dict({"type": "done", "metadata": None}).metadata == {}


def test_from_dict_copies_metadata() -> None:
    metadata = {"a": 1}
    event = StreamEvent.from_dict({"type": "metadata", "metadata": metadata})
    metadata["a"] = 2
    assert event.metadata == {"a": 1}


@pytest.mark.parametrize("type_", ["message", "Token", "", "done "])
def test_invalid_type_rejected(type_: str) -> None:
    with pytest.raises(ValueError, match="unknown StreamEvent type") as info:
        StreamEvent(type_)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"unknown StreamEvent type {type_!r}; expected one of ['chunk', 'done', 'error', 'metadata', 'token']"
    )
    with pytest.raises(ValueError, match="unknown StreamEvent type"):
        StreamEvent.from_json(orjson.dumps({"type": type_, "data": "x"}))
