"""
Tests of the generic event front adapter: `StreamEvent`s framed as SSE or NDJSON.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trioproxy._events import Delta, StreamEvent, ToolCallDelta, Usage
from trioproxy._exceptions import UpstreamStatusError, UpstreamTimeoutError
from trioproxy._sse import SSEDecoder
from trioproxy.server._events_front import (
    SSE_KEEP_ALIVE,
    EventRenderer,
    error_event,
    ndjson_frame,
    sse_frame,
)


def renderer(frame: Any = ndjson_frame, prompt_chars: int = 12) -> EventRenderer:
    return EventRenderer(frame=frame, provider="local", model="gpt-x", request_id="req-1", prompt_chars=prompt_chars)


def lines(out: bytes) -> list[dict[str, Any]]:
    """The NDJSON objects of `out`, after checking the framing."""
    assert out.endswith(b"\n")
    return [orjson.loads(line) for line in out.split(b"\n")[:-1]]


def test_sse_frame() -> None:
    event = StreamEvent("token", "hi")
    assert sse_frame(event) == b'data: {"type":"token","data":"hi","metadata":{}}\n\n'
    assert sse_frame(StreamEvent("token", "hi", id="5")) == (
        b'id: 5\ndata: {"type":"token","data":"hi","metadata":{}}\n\n'
    )
    assert SSE_KEEP_ALIVE == b": keep-alive\n\n"


def test_ndjson_frame() -> None:
    assert ndjson_frame(StreamEvent("token", "a\nb")) == b'{"type":"token","data":"a\\nb","metadata":{}}\n'
    # no id in NDJSON
    assert ndjson_frame(StreamEvent("token", "x", id="5")) == b'{"type":"token","data":"x","metadata":{}}\n'


def test_opened_metadata() -> None:
    assert lines(renderer().opened()) == [
        {
            "type": "metadata",
            "data": "stream_start",
            "metadata": {"provider": "local", "model": "gpt-x", "request_id": "req-1"},
        }
    ]


def test_tokens() -> None:
    r = renderer()
    assert r.delta(Delta(role="assistant")) == b""
    assert lines(r.delta(Delta(text="Hello"))) == [{"type": "token", "data": "Hello", "metadata": {}}]
    assert lines(r.delta(Delta(text=" wörld"))) == [{"type": "token", "data": " wörld", "metadata": {}}]
    assert r.delta(Delta(finish_reason="stop")) == b""
    assert r.delta(Delta(usage=Usage(1, 2))) == b""


def test_tool_call_metadata() -> None:
    r = renderer()
    out = r.delta(
        Delta(
            text="calling",
            tool_calls=(
                ToolCallDelta(index=0, id="call_1", name="f", arguments=""),
                ToolCallDelta(index=1, arguments="{"),
            ),
        )
    )
    assert lines(out) == [
        {"type": "token", "data": "calling", "metadata": {}},
        {
            "type": "metadata",
            "data": "tool_call",
            "metadata": {"index": 0, "id": "call_1", "name": "f", "arguments": ""},
        },
        {
            "type": "metadata",
            "data": "tool_call",
            "metadata": {"index": 1, "id": None, "name": None, "arguments": "{"},
        },
    ]


def test_done_with_upstream_usage() -> None:
    r = renderer()
    for delta in (
        Delta(role="assistant"),
        Delta(text="Hello"),
        Delta(text=" world"),
        Delta(finish_reason="length"),
        Delta(usage=Usage(prompt_tokens=9, completion_tokens=2)),
    ):
        r.delta(delta)
    assert lines(r.done()) == [
        {
            "type": "done",
            "data": None,
            "metadata": {
                "finish_reason": "length",
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11, "estimated": False},
                "characters": 11,
                "provider": "local",
                "model": "gpt-x",
            },
        }
    ]


def test_done_estimates_usage_when_none_came() -> None:
    r = renderer(prompt_chars=12)  # 3 tokens
    r.delta(Delta(text="abcdefgh"))  # 8 chars: 2 tokens
    r.delta(Delta(text="i"))  # 9 chars: 3 tokens, 2 deltas
    [done] = lines(r.done())
    assert done["metadata"] == {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "estimated": True},
        "characters": 9,
        "provider": "local",
        "model": "gpt-x",
    }


def test_done_with_tool_calls() -> None:
    r = renderer()
    r.delta(Delta(tool_calls=(ToolCallDelta(index=0, id="call_1", name="f", arguments='{"a":'),)))
    r.delta(Delta(tool_calls=(ToolCallDelta(index=0, arguments="1}"),)))
    r.delta(Delta(finish_reason="tool_calls"))
    [done] = lines(r.done())
    assert done["metadata"]["finish_reason"] == "tool_calls"
    assert done["metadata"]["characters"] == 0
    assert done["metadata"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]


def test_error_with_characters_delivered() -> None:
    r = renderer()
    r.delta(Delta(text="Hello"))
    r.delta(Delta(text=", wö"))
    assert lines(r.error(UpstreamStatusError("upstream went away", status=502))) == [
        {
            "type": "error",
            "data": {
                "message": "upstream went away",
                "type": "upstream_error",
                "code": None,
                "status": 502,
                "characters_delivered": 9,
            },
            "metadata": {},
        }
    ]


def test_error_before_any_text() -> None:
    [event] = lines(renderer().error(UpstreamTimeoutError("no first token", kind="first_token_timeout")))
    assert event["data"] == {
        "message": "no first token",
        "type": "timeout_error",
        "code": "first_token_timeout",
        "status": 504,
        "characters_delivered": 0,
    }


def test_error_event() -> None:
    event = error_event(UpstreamStatusError("slow down", status=429, code="rate_limited"))
    assert event == StreamEvent(
        "error", {"message": "slow down", "type": "rate_limit_error", "code": "rate_limited", "status": 429}
    )


@pytest.mark.parametrize("frame", [sse_frame, ndjson_frame])
def test_whole_stream_framing(frame: Any) -> None:
    r = renderer(frame)
    out = r.opened() + r.delta(Delta(text="a\nb")) + r.delta(Delta(finish_reason="stop")) + r.done()
    if frame is sse_frame:
        assert out.count(b"\n\n") == 3
        assert b"id:" not in out and b"event:" not in out
        decoded = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(out)]
    else:
        assert out.count(b"\n") == 3
        decoded = [StreamEvent.from_json(line) for line in out.split(b"\n")[:-1]]
    assert [(e.type, e.data) for e in decoded] == [("metadata", "stream_start"), ("token", "a\nb"), ("done", None)]
