"""
Tests of the generic event front adapter: `StreamEvent`s framed as SSE or NDJSON.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from trioproxy._accumulator import Accumulator
from trioproxy._events import Delta, StreamEvent, ToolCallDelta, Usage
from trioproxy._exceptions import UpstreamStatusError, UpstreamTimeoutError
from trioproxy._sse import SSEDecoder
from trioproxy.pipeline import RetryNotice
from trioproxy.server._events_front import (
    SSE_KEEP_ALIVE,
    EventRenderer,
    error_event,
    ndjson_frame,
    sse_frame,
)


def renderer(frame: Any = ndjson_frame, prompt_chars: int = 12, *, chunked: bool = False) -> EventRenderer:
    return EventRenderer(
        frame=frame, provider="local", model="gpt-x", request_id="req-1", prompt_chars=prompt_chars, chunked=chunked
    )


NO_WAITS = {"p50": 0.0, "p99": 0.0, "max": 0.0, "chunks": 0}


def session(*deltas: Delta, buffer_waits: tuple[float, ...] = ()) -> Any:
    """A stand-in for the `StreamSession` that `done` reads: its accumulator and buffer waits."""
    accumulator = Accumulator()
    for delta in deltas:
        accumulator.add(delta)
    return SimpleNamespace(accumulator=accumulator, stats=SimpleNamespace(buffer_waits=list(buffer_waits)))


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
    s = session(
        Delta(role="assistant"),
        Delta(text="Hello"),
        Delta(text=" world"),
        Delta(finish_reason="length"),
        Delta(usage=Usage(prompt_tokens=9, completion_tokens=2)),
    )
    assert lines(r.done(s)) == [
        {
            "type": "done",
            "data": None,
            "metadata": {
                "finish_reason": "length",
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11, "estimated": False},
                "characters": 11,
                "buffer_latency_ms": NO_WAITS,
                "provider": "local",
                "model": "gpt-x",
            },
        }
    ]


def test_done_estimates_usage_when_none_came() -> None:
    r = renderer(prompt_chars=12)  # 3 tokens
    s = session(
        Delta(text="abcdefgh"),  # 8 chars: 2 tokens
        Delta(text="i"),  # 9 chars: 3 tokens, 2 deltas
    )
    [done] = lines(r.done(s))
    assert done["metadata"] == {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "estimated": True},
        "characters": 9,
        "buffer_latency_ms": NO_WAITS,
        "provider": "local",
        "model": "gpt-x",
    }


def test_done_with_tool_calls() -> None:
    r = renderer()
    s = session(
        Delta(tool_calls=(ToolCallDelta(index=0, id="call_1", name="f", arguments='{"a":'),)),
        Delta(tool_calls=(ToolCallDelta(index=0, arguments="1}"),)),
        Delta(finish_reason="tool_calls"),
    )
    [done] = lines(r.done(s))
    assert done["metadata"]["finish_reason"] == "tool_calls"
    assert done["metadata"]["characters"] == 0
    assert done["metadata"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]


def test_error_with_characters_delivered() -> None:
    r = renderer()
    error = UpstreamStatusError("upstream went away", status=502)
    error.characters_delivered = len("Hello" + ", wö")  # type: ignore[attr-defined]  # as the session sets it
    assert lines(r.error(error)) == [
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
    s = session(Delta(text="a\nb"), Delta(finish_reason="stop"))
    out = r.opened() + r.delta(Delta(text="a\nb")) + r.delta(Delta(finish_reason="stop")) + r.done(s)
    if frame is sse_frame:
        assert out.count(b"\n\n") == 3
        assert b"id:" not in out
        assert b"event:" not in out
        decoded = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(out)]
    else:
        assert out.count(b"\n") == 3
        decoded = [StreamEvent.from_json(line) for line in out.split(b"\n")[:-1]]
    assert [(e.type, e.data) for e in decoded] == [("metadata", "stream_start"), ("token", "a\nb"), ("done", None)]


def test_done_reads_the_session_not_the_rendered_deltas() -> None:
    r = renderer()
    r.delta(Delta(text="rendered but not in the session"))
    [done] = lines(r.done(session(Delta(text="héllo"), Delta(finish_reason="stop"))))
    assert done["metadata"]["characters"] == 5
    assert done["metadata"]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "estimated": True,
    }
    [empty] = lines(r.done(session()))
    assert empty["metadata"]["characters"] == 0
    assert empty["metadata"]["finish_reason"] == "stop"
    assert "tool_calls" not in empty["metadata"]


def test_error_characters_delivered_set_by_the_session() -> None:
    error = UpstreamTimeoutError("no token for 30 s", kind="silence_timeout")
    error.characters_delivered = 42  # type: ignore[attr-defined]
    out = renderer(sse_frame).error(error)
    [event] = SSEDecoder().feed(out)
    assert StreamEvent.from_json(event.data) == StreamEvent(
        "error",
        {
            "message": "no token for 30 s",
            "type": "timeout_error",
            "code": "silence_timeout",
            "status": 504,
            "characters_delivered": 42,
        },
    )


@pytest.mark.parametrize(
    ("notice", "expected"),
    [
        (
            RetryNotice(kind="retry", attempt=1, provider="local", model="gpt-x", delay=0.25, reason="HTTP 503"),
            {
                "type": "metadata",
                "data": "retry",
                "metadata": {
                    "attempt": 1,
                    "provider": "local",
                    "model": "gpt-x",
                    "delay_ms": 250,
                    "reason": "HTTP 503",
                },
            },
        ),
        (
            RetryNotice(
                kind="failover", attempt=3, provider="backup", model="m-2", delay=0.0, reason="connect timeout"
            ),
            {
                "type": "metadata",
                "data": "failover",
                "metadata": {
                    "attempt": 3,
                    "provider": "backup",
                    "model": "m-2",
                    "delay_ms": 0,
                    "reason": "connect timeout",
                },
            },
        ),
        (
            # delay_ms is a whole number of milliseconds
            RetryNotice(kind="retry", attempt=2, provider="local", model="gpt-x", delay=1.2346, reason="HTTP 429"),
            {
                "type": "metadata",
                "data": "retry",
                "metadata": {
                    "attempt": 2,
                    "provider": "local",
                    "model": "gpt-x",
                    "delay_ms": 1235,
                    "reason": "HTTP 429",
                },
            },
        ),
    ],
)
def test_notice(notice: RetryNotice, expected: dict[str, Any]) -> None:
    assert lines(renderer().notice(notice)) == [expected]
    out = renderer(sse_frame).notice(notice)
    assert out.startswith(b"data: ")
    assert out.endswith(b"\n\n")
    assert b"id:" not in out
    assert b"event:" not in out
    [event] = SSEDecoder().feed(out)
    assert orjson.loads(event.data) == expected


def test_heartbeat_sse_is_a_comment() -> None:
    r = renderer(sse_frame)
    assert r.heartbeat() == b": keep-alive\n\n" == SSE_KEEP_ALIVE
    # a standard decoder sees no event at all
    assert SSEDecoder().feed(r.heartbeat()) == []
    events = SSEDecoder().feed(r.opened() + r.heartbeat() + r.heartbeat())
    assert [StreamEvent.from_json(e.data).data for e in events] == ["stream_start"]


def test_heartbeat_ndjson_is_a_metadata_line() -> None:
    r = renderer(ndjson_frame)
    assert r.heartbeat() == b'{"type":"metadata","data":"heartbeat","metadata":{}}\n'
    assert lines(r.heartbeat() + r.heartbeat()) == [{"type": "metadata", "data": "heartbeat", "metadata": {}}] * 2


def test_heartbeat_with_another_frame_is_a_framed_metadata_event() -> None:
    def frame(event: StreamEvent) -> bytes:
        return b"<" + event.to_json().encode() + b">"

    r = renderer(frame)
    assert r.heartbeat() == b'<{"type":"metadata","data":"heartbeat","metadata":{}}>'


@pytest.mark.parametrize("frame", [sse_frame, ndjson_frame])
def test_chunked_names_text_events_chunk(frame: Any) -> None:
    chunked, plain = renderer(frame, chunked=True), renderer(frame)
    assert chunked.delta(Delta(text="Hello world")) == frame(StreamEvent("chunk", "Hello world"))
    assert plain.delta(Delta(text="Hello world")) == frame(StreamEvent("token", "Hello world"))
    # only text events change name
    tool = Delta(tool_calls=(ToolCallDelta(index=0, id="c", name="f", arguments="{}"),))
    assert chunked.delta(tool) == plain.delta(tool)
    assert chunked.opened() == plain.opened()
    s = session(Delta(text="Hello world"))
    assert chunked.done(s) == plain.done(s)


def test_chunked_whole_stream() -> None:
    r = renderer(chunked=True)
    out = (
        r.opened()
        + r.delta(Delta(text="Hello"))
        + r.delta(Delta(text=" world."))
        + r.done(session(Delta(text="Hello world.")))
    )
    assert [(e["type"], e["data"]) for e in lines(out)] == [
        ("metadata", "stream_start"),
        ("chunk", "Hello"),
        ("chunk", " world."),
        ("done", None),
    ]


def test_done_summarises_the_buffer_latency() -> None:
    renderer = EventRenderer(frame=ndjson_frame, provider="p", model="m", request_id="r", prompt_chars=0)
    waits = tuple(n / 1000 for n in range(1, 101))  # 1 ms .. 100 ms
    done = orjson.loads(renderer.done(session(Delta(text="x"), buffer_waits=waits)))
    assert done["metadata"]["buffer_latency_ms"] == {"p50": 51.0, "p99": 100.0, "max": 100.0, "chunks": 100}
