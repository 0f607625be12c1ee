"""
Tests of the Anthropic front's renderer: session items in, Messages events out, no sockets.

Streams with the upstream's own events come from `tests/fixtures/anthropic/*.sse` through
the real `AnthropicStreamParser`, as they do in the proxy: `stream_thinking_tools.sse` (see
that folder's README) and `thinking_citations_server_tool.sse`, written the same way with a
web search's server-tool blocks and a `citations_delta`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event

from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import (
    OverloadedError,
    RateLimitedError,
    RequestError,
    TrioproxyError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from trioproxy._sse import SSEDecoder
from trioproxy.providers.anthropic import AnthropicStreamParser
from trioproxy.server._anthropic_front import (
    PING,
    AnthropicEventRenderer,
    error_body,
    message_from_events,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
MODEL = "claude-haiku-4-5"


def events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    """`(event name, data)` of every event, checking that each names its own `type`."""
    out = []
    for event in SSEDecoder().feed(stream):
        data = orjson.loads(event.data)
        assert data["type"] == event.event
        out.append((event.event, data))
    return out


def upstream_deltas(stream: bytes) -> list[Delta]:
    parser = AnthropicStreamParser(keep_raw=True)
    return [delta for event in SSEDecoder().feed(stream) for delta in parser.feed(event)]


def render(renderer: AnthropicEventRenderer, deltas: list[Delta]) -> bytes:
    return b"".join(renderer.delta(delta) for delta in deltas)


# sse_protocol.md §5.2 (anthropic-sdk-python tests/lib/streaming/fixtures/basic_response.txt).
BASIC = (FIXTURES / "basic_response.sse").read_bytes()
BASIC_ID = "msg_4QpJur2dWWDjF6C758FbBw5vm12BaVipnK"


# --------------------------------------------------------------------------------------------
# the upstream's own events


@pytest.mark.parametrize(
    "stream",
    [
        BASIC,
        *(
            (FIXTURES / name).read_bytes()
            for name in ("stream_thinking_tools.sse", "thinking_citations_server_tool.sse")
        ),
    ],
)
def test_an_anthropic_upstream_s_stream_is_forwarded_byte_for_byte(stream: bytes) -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    assert render(renderer, upstream_deltas(stream)) + renderer.done() == stream


def test_message_stop_waits_for_done() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, upstream_deltas(BASIC))
    assert b"message_stop" not in out
    assert renderer.done() == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def test_nothing_is_sent_before_the_first_token() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    deltas = upstream_deltas(BASIC)
    assert render(renderer, deltas[:3]) == b""  # message_start, content_block_start, ping
    assert [name for name, _ in events(render(renderer, deltas[3:4]))] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
    ]


def test_a_failover_before_the_first_token_shows_one_message_start_and_one_set_of_blocks() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    first = upstream_deltas(BASIC)[:3]  # the first attempt failed after its first block started
    second = upstream_deltas(BASIC.replace(BASIC_ID.encode(), b"msg_up2"))
    out = render(renderer, first) + renderer.notice(object()) + render(renderer, second) + renderer.done()
    names = [name for name, _ in events(out)]
    assert names == [name for name, _ in events(BASIC)]
    assert events(out)[0][1]["message"]["id"] == BASIC_ID


def test_a_failover_to_another_protocol_keeps_the_first_message_start() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, upstream_deltas(BASIC)[:3]) + renderer.notice(object())
    out += render(renderer, [Delta(role="assistant"), Delta(text="Hi"), Delta(finish_reason="stop")])
    out += renderer.done()
    parsed = events(out)
    assert [name for name, _ in parsed] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert parsed[0][1]["message"]["id"] == BASIC_ID


def test_a_failover_to_another_protocol_numbers_its_blocks_from_zero() -> None:
    """The failed attempt's block start was never sent: the SDK indexes blocks by the number they carry."""
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, upstream_deltas(BASIC)[:3]) + renderer.notice(object())
    out += render(renderer, [Delta(text="Hi"), Delta(finish_reason="stop")]) + renderer.done()
    blocks = [data for name, data in events(out) if name.startswith("content_block")]
    assert [data["index"] for data in blocks] == [0, 0, 0]
    snapshot = None
    for _, data in events(out):
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs={})
    assert snapshot is not None
    assert snapshot.content[0].text == "Hi"  # type: ignore[union-attr]


@pytest.mark.parametrize("deltas", [[], [Delta(finish_reason="stop")], [Delta(usage=Usage(3, 0))]])
def test_an_answer_with_no_content_still_starts_with_message_start(deltas: list[Delta]) -> None:
    """An upstream may send no token at all (`data: [DONE]` alone): the message is empty, not headless."""
    renderer = AnthropicEventRenderer(model=MODEL)
    names = [name for name, _ in events(render(renderer, deltas) + renderer.done())]
    assert names == ["message_start", "message_delta", "message_stop"]


def test_a_heartbeat_sends_the_waiting_message_start_then_a_ping() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    assert renderer.heartbeat() == PING  # nothing from the upstream yet
    deltas = upstream_deltas(BASIC)
    assert render(renderer, deltas[:2]) == b""
    assert renderer.heartbeat() == BASIC[: BASIC.index(b"event: content_block_start")] + PING
    rest = render(renderer, deltas[2:]) + renderer.done()
    assert rest == BASIC[BASIC.index(b"event: content_block_start") :]


def test_too_many_waiting_events_are_sent() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    deltas = upstream_deltas(BASIC)
    ping = deltas[2]
    out = render(renderer, deltas[:2] + [ping] * 63)  # 64 wait: content_block_start and the pings
    assert out == b""
    out = render(renderer, [ping])
    assert [name for name, _ in events(out)] == ["message_start", "content_block_start"] + ["ping"] * 64
    assert render(renderer, [ping]) == ping.raw


# --------------------------------------------------------------------------------------------
# events rendered from the common model


def test_text_and_tool_calls() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(
        renderer,
        [
            Delta(role="assistant"),
            Delta(text="Let me"),
            Delta(text=" check."),
            Delta(tool_calls=(ToolCallDelta(index=0, id="call_1", name="get_weather"),)),
            Delta(tool_calls=(ToolCallDelta(index=0, arguments='{"city":'),)),
            Delta(tool_calls=(ToolCallDelta(index=0, arguments='"Paris"}'),)),
            Delta(finish_reason="tool_calls"),
            Delta(usage=Usage(prompt_tokens=20, completion_tokens=9, cache_read_tokens=15)),
        ],
    )
    out += renderer.done()
    parsed = events(out)
    start = parsed[0][1]["message"]
    assert (start["id"], start["model"], start["role"], start["content"]) == (renderer.id, MODEL, "assistant", [])
    assert start["id"].startswith("msg_")
    assert [data for _, data in parsed[1:]] == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " check."}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
        },
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city":'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 15},
        },
        {"type": "message_stop"},
    ]


def test_reasoning_is_a_thinking_block_before_the_text() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, [Delta(role="assistant"), Delta(reasoning="Hm."), Delta(text="Yes.")]) + renderer.done()
    message = message_from_events(out)
    assert message["content"] == [
        {"type": "thinking", "thinking": "Hm.", "signature": ""},
        {"type": "text", "text": "Yes."},
    ]


def test_a_signature_is_rendered_also_without_reasoning_text() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    deltas = [Delta(role="assistant"), Delta(reasoning_signature="EqQB"), Delta(text="Hi")]  # thinking omitted
    message = message_from_events(render(renderer, deltas) + renderer.done())
    assert message["content"] == [
        {"type": "thinking", "thinking": "", "signature": "EqQB"},
        {"type": "text", "text": "Hi"},
    ]


@pytest.mark.parametrize(
    ("delta", "stop_reason", "stop_sequence"),
    [
        (Delta(finish_reason="stop"), "end_turn", None),
        (Delta(finish_reason="length"), "max_tokens", None),
        (Delta(finish_reason="content_filter"), "refusal", None),
        (Delta(finish_reason="stop", stop_sequence="###"), "stop_sequence", "###"),
    ],
)
def test_stop_reasons(delta: Delta, stop_reason: str, stop_sequence: str | None) -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, [Delta(role="assistant"), Delta(text="x"), delta]) + renderer.done()
    [message_delta] = [data for name, data in events(out) if name == "message_delta"]
    assert message_delta["delta"] == {"stop_reason": stop_reason, "stop_sequence": stop_sequence}


def test_usage_is_estimated_when_the_upstream_reports_none() -> None:
    renderer = AnthropicEventRenderer(model=MODEL, prompt_chars=40)
    out = render(renderer, [Delta(text="12345678")]) + renderer.done()
    [message_delta] = [data for name, data in events(out) if name == "message_delta"]
    assert message_delta["usage"] == {"input_tokens": 10, "output_tokens": 2}


def test_an_empty_answer_still_is_a_whole_message() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, [Delta(role="assistant"), Delta(finish_reason="stop")]) + renderer.done()
    assert [name for name, _ in events(out)] == ["message_start", "message_delta", "message_stop"]


def test_errors_are_error_events_without_message_stop() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    render(renderer, [Delta(role="assistant"), Delta(text="Hel")])
    out = renderer.error(UpstreamStatusError("Overloaded", status=529, type="overloaded_error"))
    assert events(out) == [("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RequestError("bad"), "invalid_request_error"),
        (UpstreamStatusError("no", status=401), "authentication_error"),
        (UpstreamStatusError("no", status=403), "permission_error"),
        (UpstreamStatusError("no", status=404), "not_found_error"),
        (UpstreamStatusError("big", status=413), "request_too_large"),
        (RateLimitedError("slow", code="x", retry_after=1), "rate_limit_error"),
        (UpstreamStatusError("ko", status=500, type="server_error"), "api_error"),
        (UpstreamProtocolError("junk"), "api_error"),
        (OverloadedError("full"), "overloaded_error"),
        (UpstreamStatusError("busy", status=529), "overloaded_error"),
        (UpstreamTimeoutError("slow", kind="first_token_timeout"), "timeout_error"),
        (TrioproxyError("internal"), "api_error"),
    ],
)
def test_error_types(error: TrioproxyError, expected: str) -> None:
    assert error_body(error) == {"type": "error", "error": {"type": expected, "message": error.message}}


# --------------------------------------------------------------------------------------------
# a whole message


def test_message_from_an_upstream_stream_keeps_every_block() -> None:
    stream = (FIXTURES / "thinking_citations_server_tool.sse").read_bytes()
    message = message_from_events(stream)
    assert message["id"] == "msg_01ThinkCite"
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    assert message["usage"] == {
        "input_tokens": 2048,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1800,
        "output_tokens": 77,
        "service_tier": "standard",
        "server_tool_use": {"web_search_requests": 1},
    }
    thinking, tool, result, text = message["content"]
    assert thinking == {
        "type": "thinking",
        "thinking": "The user asks about the weather.",
        "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds",
    }
    assert tool["input"] == {"query": "weather Paris"}
    assert result["type"] == "web_search_tool_result"
    assert text["text"] == "It is sunny in Paris, 21 °C."
    assert text["citations"][0]["cited_text"] == "Sunny, 21 °C"


def test_message_from_a_thinking_and_tool_use_stream() -> None:
    message = message_from_events((FIXTURES / "stream_thinking_tools.sse").read_bytes())
    assert [block["type"] for block in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][0]["signature"]
    assert message["content"][2]["input"] == {"city": "Paris", "unit": "celsius"}
    assert message["stop_reason"] == "tool_use"


def test_a_tool_input_that_is_not_json_is_the_upstream_s_fault() -> None:
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(renderer, [Delta(tool_calls=(ToolCallDelta(index=0, id="c", name="f", arguments="{oops"),))])
    with pytest.raises(UpstreamProtocolError):
        message_from_events(out + renderer.done())


def test_a_continuation_that_adds_no_text_still_closes_the_forwarded_text_block() -> None:
    """The upstream broke mid-text; the continuation only finished it: the open block stops before the message ends."""
    renderer = AnthropicEventRenderer(model=MODEL)
    deltas = upstream_deltas(BASIC)
    cut = next(i for i, delta in enumerate(deltas) if delta.text) + 1  # after its first text delta
    out = render(renderer, deltas[:cut]) + render(renderer, [Delta(finish_reason="stop")]) + renderer.done()
    names = [name for name, _ in events(out)]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events(out)[-3][1]["index"] == 0


def test_interleaved_tool_calls_are_refused_rather_than_written_to_a_stopped_block() -> None:
    """
    A Chat Completions upstream may go back to a tool call after starting another; a tool_use
    block, once stopped, takes no more deltas. The renderer refuses the delta instead.
    """
    renderer = AnthropicEventRenderer(model=MODEL)
    out = render(
        renderer,
        [
            Delta(role="assistant"),
            Delta(tool_calls=(ToolCallDelta(index=0, id="call_a", name="f"),)),
            Delta(tool_calls=(ToolCallDelta(index=1, id="call_b", name="g"),)),
        ],
    )
    with pytest.raises(UpstreamProtocolError, match=r"^the upstream went back to tool call 0 after starting another$"):
        renderer.delta(Delta(tool_calls=(ToolCallDelta(index=0, arguments="{}"),)))
    assert [data["type"] for _, data in events(out)][-2:] == ["content_block_stop", "content_block_start"]
