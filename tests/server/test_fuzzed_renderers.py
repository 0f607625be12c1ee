"""
The front renderers, fuzzed (sans-IO): any sequence of session items the pipeline can hand
them renders without an exception, and what they write parses back in their protocol, by the
official SDKs' own stream accumulators (`ChatCompletionStreamState`, Anthropic's
`accumulate_event`, `ResponseStreamState`), with the same text, reasoning and tool-call
arguments, and ends as the protocol ends: completed, or with its error event.

The items: text, reasoning, tool-call fragments (each call's in a run, as every parser emits
them), the role, a thinking signature, usage, hosted-tool items (`raw_item`), heartbeats and a
retry notice before the first token, then a finish reason, then the end (done, or an error).
A second property starts from an upstream's own events (`Delta.raw`, the pass-through), cut
anywhere, and goes on with rendered text, as a continuation does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import given
from hypothesis import strategies as st
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent

from tests.fuzzing import fuzzed
from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import TrioproxyError, UpstreamProtocolError, UpstreamStatusError
from trioproxy._sse import SSEDecoder
from trioproxy.pipeline import HEARTBEAT, RetryNotice, SessionItem
from trioproxy.providers.anthropic import AnthropicStreamParser
from trioproxy.providers.openai import OpenAIStreamParser
from trioproxy.providers.responses import ResponsesStreamParser
from trioproxy.server._anthropic_front import AnthropicEventRenderer
from trioproxy.server._generic import Renderer, render
from trioproxy.server._openai_front import OpenAIChunkRenderer
from trioproxy.server._responses_front import TERMINAL_EVENTS, ResponsesEventRenderer
from trioproxy.testing import Reply, ToolCall
from trioproxy.testing._wire import anthropic_frames, openai_frames, responses_frames

FIXTURES: Final = Path(__file__).parent.parent / "fixtures"
FUZZ: Final = fuzzed(150)

TEXT: Final = st.text(min_size=1, max_size=6)
FINISH_REASONS: Final = st.sampled_from(["stop", "length", "tool_calls", "content_filter", "function_call"])
USAGE: Final = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 10_000),
    completion_tokens=st.integers(0, 10_000),
    cache_read_tokens=st.none() | st.integers(0, 100),
    cache_creation_tokens=st.none() | st.integers(0, 100),
)
ERRORS: Final = st.sampled_from(
    [
        UpstreamProtocolError("the upstream's bytes made no sense"),
        UpstreamStatusError("overloaded", status=529, type="overloaded_error"),
        TrioproxyError("internal error while streaming"),
    ]
)


@dataclass
class Expected:
    """What a client must read back from a stream: its text, reasoning and each call's arguments."""

    text: str = ""
    reasoning: str = ""
    arguments: dict[int, str] = field(default_factory=dict)


@st.composite
def tool_call_run(draw: st.DrawFn, index: int) -> list[Delta]:
    """One tool call's fragments, as a parser emits them: the first with its id and name (either may be missing)."""
    values = st.integers(-(2**53), 2**53) | TEXT
    arguments = orjson.dumps(draw(st.dictionaries(st.text(max_size=3), values, max_size=3))).decode()
    cuts = sorted(draw(st.sets(st.integers(0, len(arguments)), max_size=3)) | {0, len(arguments)})
    pieces = [arguments[a:b] for a, b in itertools.pairwise(cuts)] if draw(st.booleans()) else []
    first = ToolCallDelta(
        index=index,
        id=draw(st.none() | st.just(f"call_{index}")),
        name=draw(st.none() | st.sampled_from(["f", "get_weather"])),
        arguments=pieces[0] if pieces else "",
    )
    return [Delta(tool_calls=(first,))] + [
        Delta(tool_calls=(ToolCallDelta(index=index, arguments=piece),)) for piece in pieces[1:]
    ]


@st.composite
def session_items(  # noqa: C901 - one branch per kind of item
    draw: st.DrawFn, *, raw_items: bool
) -> tuple[list[SessionItem], Expected, bool]:
    """A session's items (its end aside), what they say, and whether it ends with an error."""
    items: list[SessionItem] = []
    if draw(st.booleans()):
        items.append(Delta(role="assistant"))
    if draw(st.booleans()):
        items.append(RetryNotice(kind="retry", attempt=1, provider="p", model="m", delay=0.0, reason="503"))
    expected = Expected()
    kinds = ["text", "reasoning", "tool", "signature", "usage", "heartbeat"] + (["raw_item"] if raw_items else [])
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=10)):
        if kind == "text":
            text = draw(TEXT)
            items.append(Delta(text=text))
            expected.text += text
        elif kind == "reasoning":
            reasoning = draw(TEXT)
            items.append(Delta(reasoning=reasoning))
            expected.reasoning += reasoning
        elif kind == "tool":
            index = len(expected.arguments)
            run = draw(tool_call_run(index))
            items += run
            expected.arguments[index] = "".join(call.arguments for delta in run for call in delta.tool_calls)
        elif kind == "signature":
            items.append(Delta(reasoning_signature=draw(TEXT)))
        elif kind == "usage":
            items.append(Delta(usage=draw(USAGE)))
        elif kind == "heartbeat":
            items.append(HEARTBEAT)
        else:
            items.append(Delta(raw_item={"type": "web_search_call", "id": f"ws_{len(items)}", "status": "completed"}))
    if draw(st.booleans()):
        reason = draw(FINISH_REASONS)
        stop_sequence = draw(st.none() | TEXT) if reason == "stop" else None
        items.append(Delta(finish_reason=reason, stop_sequence=stop_sequence, usage=draw(st.none() | USAGE)))
    failed = draw(st.booleans())
    if failed:
        items.append(draw(ERRORS))
    return items, expected, failed


def rendered(renderer: Renderer, items: list[SessionItem], *, failed: bool) -> bytes:
    """The items rendered as the server writes them: each in turn, then `done` unless an error ended the stream."""
    out = b"".join(render(renderer, item) for item in items)
    return out if failed else out + renderer.done(None)  # type: ignore[arg-type]


def payloads(stream: bytes) -> list[tuple[str, Any]]:
    """Each event's name and data (JSON, or `[DONE]`): the stream must be SSE, and every data JSON."""
    return [
        (event.event, event.data if event.data == "[DONE]" else orjson.loads(event.data))
        for event in SSEDecoder().feed(stream)
    ]


# --------------------------------------------------------------------------------------------
# Read back by each protocol's SDK


def read_openai(stream: bytes, *, failed: bool) -> Expected:
    events = payloads(stream)
    assert all(name == "message" for name, _ in events), "Chat Completions events are data-only"
    if failed:
        assert "error" in events[-1][1]
        assert ("message", "[DONE]") not in events
        events = events[:-1]
    else:
        assert events[-1] == ("message", "[DONE]")
        events = events[:-1]
    state = ChatCompletionStreamState()
    for _, payload in events:
        state.handle_chunk(construct_type(type_=ChatCompletionChunk, value=payload))
    if not any(payload["choices"] for _, payload in events):
        return Expected()
    message = state.current_completion_snapshot.choices[0].message
    calls = message.tool_calls or []
    return Expected(
        text=message.content or "",
        reasoning="".join(p["choices"][0]["delta"].get("reasoning_content", "") for _, p in events if p["choices"]),
        # A call whose first fragment had no id, name nor arguments has no `function` yet.
        arguments={call.index: call.function.arguments if call.function else "" for call in calls},  # type: ignore[attr-defined]
    )


def read_anthropic(stream: bytes, *, failed: bool) -> Expected:
    events = payloads(stream)
    for name, payload in events:
        assert name == payload["type"], "every Messages event is named by its type"
    if failed:
        assert events[-1][0] == "error"
        assert all(name != "message_stop" for name, _ in events)
        events = events[:-1]
    else:
        assert events[-1][0] == "message_stop"
        assert [name for name, _ in events].count("message_start") == 1
    _check_blocks([payload for _, payload in events])
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, payload in events:
        if payload["type"] == "ping":
            continue
        snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs=json_bufs)
    if snapshot is None:
        return Expected()
    expected = Expected()
    tools = 0
    for block in snapshot.content:
        if block.type == "text":
            expected.text += block.text
        elif block.type == "thinking":
            expected.reasoning += block.thinking
        elif block.type == "tool_use":
            expected.arguments[tools] = json_bufs.get(snapshot.content.index(block), b"").decode()
            tools += 1
    return expected


def _check_blocks(events: list[dict[str, Any]]) -> None:
    """Blocks start in index order, each delta goes to the open block, each block stops once."""
    open_block: int | None = None
    started = 0
    for payload in events:
        kind = payload["type"]
        if kind == "content_block_start":
            assert open_block is None, payload
            assert payload["index"] == started, payload
            open_block, started = payload["index"], started + 1
        elif kind == "content_block_delta":
            assert payload["index"] == open_block, payload
        elif kind == "content_block_stop":
            assert payload["index"] == open_block, payload
            open_block = None
        elif kind in ("message_delta", "message_stop"):
            assert open_block is None, payload


def read_responses(stream: bytes, *, failed: bool) -> Expected:
    events = payloads(stream)
    for name, payload in events:
        assert name == payload["type"], "every Responses event is named by its type"
    numbers = [payload["sequence_number"] for _, payload in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True
    terminal = [name for name, _ in events if name in TERMINAL_EVENTS]
    assert terminal == [events[-1][0]], "one terminal event, last"
    assert (events[-1][0] == "response.failed") == failed
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    expected = Expected()
    for name, payload in events:
        if name == "error":
            continue
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=payload))  # type: ignore[arg-type]
        if name == "response.reasoning_summary_text.delta":
            expected.reasoning += payload["delta"]
    response = events[-1][1]["response"]
    calls = [item for item in response["output"] if item["type"] == "function_call"]
    expected.arguments = {i: call["arguments"] for i, call in enumerate(calls)}
    expected.text = "".join(
        part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]
    )
    return expected


@dataclass(frozen=True)
class Front:
    new: Callable[[], Renderer]
    read: Callable[..., Expected]
    raw_items: bool = False
    reasoning: bool = True


FRONTS: Final[dict[str, Front]] = {
    "openai": Front(lambda: OpenAIChunkRenderer(model="m", include_usage=True), read_openai),
    "anthropic": Front(lambda: AnthropicEventRenderer(model="m", prompt_chars=10), read_anthropic),
    "responses": Front(
        lambda: ResponsesEventRenderer(request={"model": "m"}, model="m", prompt_chars=10), read_responses, True
    ),
}


@pytest.mark.parametrize("front", sorted(FRONTS))
@FUZZ
@given(data=st.data())
def test_any_items_render_into_a_stream_the_sdk_reads_back(front: str, data: st.DataObject) -> None:
    spec = FRONTS[front]
    items, expected, failed = data.draw(session_items(raw_items=spec.raw_items))
    stream = rendered(spec.new(), items, failed=failed)
    got = spec.read(stream, failed=failed)
    assert got.text == expected.text
    assert got.reasoning == expected.reasoning
    if front == "responses" and failed:
        return  # a failed Response lists only the items it closed
    assert got.arguments == expected.arguments


# --------------------------------------------------------------------------------------------
# The pass-through: an upstream's own events, then a continuation's rendered text

REPLY: Final = Reply(tokens=("Hel", "lo", " there"), tool_calls=(ToolCall("call_1", "f", '{"a": 1}'),))


def _upstream_deltas(parser: Any, wire: bytes) -> list[Delta]:
    return [delta for event in SSEDecoder().feed(wire) for delta in parser.feed(event)]


UPSTREAM: Final[dict[str, list[list[Delta]]]] = {
    "openai": [
        _upstream_deltas(
            OpenAIStreamParser(keep_raw=True),
            b"".join(f.data for f in openai_frames(REPLY, "m", 1, include_usage=True)),
        )
    ],
    "anthropic": [
        _upstream_deltas(AnthropicStreamParser(keep_raw=True), wire)
        for wire in [
            b"".join(f.data for f in anthropic_frames(REPLY, "m", 1)),
            *(path.read_bytes() for path in sorted((FIXTURES / "anthropic").glob("*.sse"))),
        ]
    ],
    "responses": [
        _upstream_deltas(ResponsesStreamParser(keep_raw=True), wire)
        for wire in [
            b"".join(f.data for f in responses_frames(REPLY, "m", 1)),
            *(path.read_bytes() for path in sorted((FIXTURES / "responses").glob("*.sse"))),
        ]
    ],
}


@pytest.mark.parametrize("front", sorted(FRONTS))
@FUZZ
@given(data=st.data())
def test_an_upstream_s_own_events_then_a_continuation_read_back_whole(front: str, data: st.DataObject) -> None:
    spec = FRONTS[front]
    upstream = data.draw(st.sampled_from(UPSTREAM[front]))
    cut = data.draw(st.integers(0, len(upstream)))
    items: list[SessionItem] = list(upstream[:cut])
    expected_text = "".join(delta.text for delta in upstream[:cut])
    failed = data.draw(st.booleans())
    if not any(delta.finish_reason for delta in upstream[:cut]):
        # The upstream broke. Before its first token the next attempt (a failover) starts afresh;
        # after it, an answer of text alone is continued (`pipeline._reader`); any other fails.
        delivered = [delta for delta in upstream[:cut] if delta.has_content]
        if not delivered:
            items.append(RetryNotice(kind="failover", attempt=1, provider="p", model="m", delay=0.0, reason="503"))
        if all(delta.text and not (delta.tool_calls or delta.reasoning or delta.raw_item) for delta in delivered):
            continuation = data.draw(st.lists(TEXT, max_size=3))
            items += [Delta(text=text) for text in continuation] + [Delta(finish_reason="stop")]
            expected_text += "".join(continuation)
        else:
            failed = True
    if failed:
        items.append(data.draw(ERRORS))
    stream = rendered(spec.new(), items, failed=failed)
    assert spec.read(stream, failed=failed).text == expected_text
