"""
The providers' stream parsers, fuzzed: whatever an upstream sends, a parser hands on deltas
the rest of the proxy can render, or raises one of our typed errors, never a stray
`KeyError`/`TypeError` (sans-IO, no sockets).

Streams are drawn near valid ones: the recorded fixtures (tests/fixtures) and what the fake
upstream sends (`trioproxy.testing._wire`), mutated (a value at any JSON path replaced by
another type, keys deleted or added, events reordered, duplicated, dropped or renamed, data
that is not JSON, the end marker early or missing). The properties:

- `feed` returns well-typed deltas or raises `UpstreamProtocolError` (the bytes are not the
  protocol) or `UpstreamStatusError` (the upstream reported an error); `end` likewise;
- an event a parser refuses with `UpstreamProtocolError` leaves it as it was: with
  `skip_malformed_events` the stream goes on as if the event never came;
- a mutation that keeps the stream valid (unknown keys and events added) changes no text:
  the deltas carry the events' text, in order, nothing lost or doubled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import fuzzed, json_paths, replaced, value_at
from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import UpstreamProtocolError, UpstreamStatusError
from trioproxy._sse import ServerSentEvent, SSEDecoder
from trioproxy.providers._base import StreamParser
from trioproxy.providers.anthropic import AnthropicStreamParser
from trioproxy.providers.openai import OpenAIStreamParser, delta_from_text_completion
from trioproxy.providers.responses import ResponsesStreamParser
from trioproxy.testing import Reply, ToolCall
from trioproxy.testing._wire import (
    anthropic_frames,
    openai_frames,
    responses_frames,
    text_completion_frames,
)

FIXTURES: Final = Path(__file__).parent.parent / "fixtures"
FUZZ: Final = fuzzed(200)

REPLIES: Final = (
    Reply(tokens=("Hello", ",", " world", "!")),
    Reply(
        tokens=("Let me", " look."),
        tool_calls=(
            ToolCall("call_1", "lookup", '{"city": "Paris", "days": 3}'),
            ToolCall("call_2", "weather", '{"q": "x"}'),
        ),
        usage=(20, 9),
        cached_tokens=4,
    ),
    Reply(tokens=("cut", " short"), finish_reason="length"),
)


def events_of(stream: bytes) -> list[ServerSentEvent]:
    return SSEDecoder().feed(stream)


def _frames(frames: list[Any]) -> list[ServerSentEvent]:
    return events_of(b"".join(frame.data for frame in frames))


def _fixtures(kind: str) -> list[list[ServerSentEvent]]:
    return [events_of(path.read_bytes()) for path in sorted((FIXTURES / kind).glob("*.sse"))]


Parser = Callable[[bool], StreamParser]

PROTOCOLS: Final[dict[str, tuple[Parser, list[list[ServerSentEvent]]]]] = {
    "openai": (
        lambda keep_raw: OpenAIStreamParser(keep_raw=keep_raw),
        [_frames(openai_frames(reply, "m", 1, include_usage=usage)) for reply in REPLIES for usage in (False, True)],
    ),
    "completions": (
        lambda keep_raw: OpenAIStreamParser(keep_raw=keep_raw, read=delta_from_text_completion),
        [_frames(text_completion_frames(reply, "m", 1, include_usage=True)) for reply in REPLIES],
    ),
    "anthropic": (
        lambda keep_raw: AnthropicStreamParser(keep_raw=keep_raw),
        [_frames(anthropic_frames(reply, "m", 1)) for reply in REPLIES] + _fixtures("anthropic"),
    ),
    "responses": (
        lambda keep_raw: ResponsesStreamParser(keep_raw=keep_raw),
        [_frames(responses_frames(reply, "m", 1)) for reply in REPLIES] + _fixtures("responses"),
    ),
}


# --------------------------------------------------------------------------------------------
# What a parser may hand on: the fields every renderer relies on, of their types.


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_delta(delta: Delta) -> None:
    """`delta` is what the renderers take: every field of its declared type, counts whole and non-negative."""
    assert isinstance(delta, Delta)
    assert isinstance(delta.text, str)
    assert isinstance(delta.reasoning, str)
    for name in ("role", "finish_reason", "reasoning_signature", "stop_sequence"):
        assert isinstance(getattr(delta, name), str | None), (name, delta)
    assert isinstance(delta.raw, bytes | None)
    assert isinstance(delta.raw_item, dict | None)
    assert isinstance(delta.tool_calls, tuple)
    for call in delta.tool_calls:
        assert isinstance(call, ToolCallDelta)
        assert _count(call.index), call
        assert isinstance(call.id, str | None), call
        assert isinstance(call.name, str | None), call
        assert isinstance(call.arguments, str), call
    if delta.usage is not None:
        usage = delta.usage
        assert isinstance(usage, Usage)
        assert _count(usage.prompt_tokens), usage
        assert _count(usage.completion_tokens), usage
        for cached in (usage.cache_read_tokens, usage.cache_creation_tokens):
            assert cached is None or _count(cached), usage


@dataclasses.dataclass
class Outcome:
    deltas: list[Delta]
    error: Exception | None
    """What ended the stream: a typed error (an in-stream error, or bytes the parser refused)."""
    refused: list[int]
    """The indexes of the events refused with `UpstreamProtocolError` and passed over."""


def parse(events: list[ServerSentEvent], parser: StreamParser, *, skip_malformed: bool) -> Outcome:
    """
    `events` through `parser` as `HttpUpstream.stream` feeds them (a refused event ends the
    stream, or is passed over with `skip_malformed`), then `end()` if no end marker came.
    """
    deltas: list[Delta] = []
    refused: list[int] = []
    for i, event in enumerate(events):
        try:
            got = parser.feed(event)
        except UpstreamProtocolError as exc:
            if not skip_malformed:
                return Outcome(deltas, exc, refused)
            refused.append(i)
            continue
        except UpstreamStatusError as exc:
            return Outcome(deltas, exc, refused)
        assert isinstance(got, list)
        for delta in got:
            check_delta(delta)
        deltas += got
        if parser.finished:
            return Outcome(deltas, None, refused)
    try:
        got = parser.end()
    except UpstreamProtocolError as exc:
        return Outcome(deltas, exc, refused)
    for delta in got:
        check_delta(delta)
    return Outcome(deltas + got, None, refused)


# --------------------------------------------------------------------------------------------
# Mutations

_SCALARS: Final = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", "[DONE]", "text", "tool_use", "function_call", "message", "stop", "end_turn", "0"])
)
JSON: Final = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
"""Any JSON value, bounded (a huge one is the SSE decoder's to refuse, not the parser's)."""

_NESTED: Final = orjson.loads("[" * 100 + "]" * 100)

_KEYS: Final = st.sampled_from(
    ["type", "index", "id", "call_id", "item_id", "name", "delta", "text", "usage", "choices", "content_block",
     "message", "response", "item", "output_index", "sequence_number", "finish_reason", "error", "tool_calls",
     "arguments", "partial_json", "stop_reason", "role", "content", "x_vendor"]
)  # fmt: skip


def _containers(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return [path for path in json_paths(value, at) if isinstance(value_at(value, path), dict)]


def _json_data(event: ServerSentEvent) -> Any:
    try:
        return orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return None


def _with_data(event: ServerSentEvent, payload: Any) -> ServerSentEvent:
    return dataclasses.replace(event, data=orjson.dumps(payload).decode())


@st.composite
def mutated_event(draw: st.DrawFn, event: ServerSentEvent) -> ServerSentEvent:
    """`event` with one thing changed that may make it invalid."""
    payload = _json_data(event)
    kind = draw(st.sampled_from(["replace", "delete", "add", "rename", "not_json", "done", "huge"]))
    if kind == "rename":
        return dataclasses.replace(event, event=draw(st.sampled_from(_EVENT_NAMES)))
    if kind == "not_json":
        junk = st.sampled_from([event.data[: len(event.data) // 2], "", "null", "[]", "1", '"s"', "{", "nan"])
        return dataclasses.replace(event, data=draw(junk | st.text(max_size=20)))
    if kind == "done":
        return dataclasses.replace(event, data="[DONE]")
    if not isinstance(payload, dict | list):
        return dataclasses.replace(event, data=orjson.dumps(draw(JSON)).decode())
    if kind == "huge":  # within the SSE decoder's bounds, which a larger one would hit first
        if draw(st.booleans()):
            return dataclasses.replace(event, data="[" * 2000 + "]" * 2000)  # deeper than orjson reads (1024)
        value = draw(st.sampled_from(["x" * 200_000, 2**64 - 1, -(2**63), _NESTED]))
        return _with_data(event, replaced(payload, draw(st.sampled_from(json_paths(payload))), value))
    if kind == "replace":
        paths = json_paths(payload)
        depth = draw(st.integers(0, max(len(path) for path in paths)))  # as likely shallow as deep
        path = draw(st.sampled_from([path for path in paths if len(path) <= depth]))
        return _with_data(event, replaced(payload, path, draw(JSON)))
    containers = _containers(payload)
    if not containers:
        return event
    container = value_at(payload, draw(st.sampled_from(containers)))
    if kind == "delete" and container:
        del container[draw(st.sampled_from(sorted(container)))]
    else:
        container[draw(_KEYS)] = draw(JSON)
    return _with_data(event, payload)


_EVENT_NAMES: Final = [
    "message", "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "ping", "error", "response.created", "response.completed",
    "response.output_text.delta", "response.failed", "x-unknown",
]  # fmt: skip


@st.composite
def mutated_stream(draw: st.DrawFn, events: list[ServerSentEvent]) -> list[ServerSentEvent]:
    """`events` with one to three mutations: an event changed, dropped, duplicated, moved, or the stream cut."""
    events = list(events)
    for _ in range(draw(st.integers(1, 3))):
        if not events:
            break
        at = draw(st.integers(0, len(events) - 1))
        kind = draw(st.sampled_from(["event", "event", "event", "drop", "duplicate", "move", "cut", "insert"]))
        if kind == "event":
            events[at] = draw(mutated_event(events[at]))
        elif kind == "drop":
            del events[at]
        elif kind == "duplicate":
            events.insert(at, events[at])
        elif kind == "move":
            events.insert(draw(st.integers(0, len(events) - 1)), events.pop(at))
        elif kind == "cut":
            events = events[:at]
        else:
            events.insert(at, draw(mutated_event(draw(st.sampled_from(events)))))
    return events


# --------------------------------------------------------------------------------------------
# Properties


Events = list[ServerSentEvent]


def _stream_of(protocol: str, mutate: Callable[[Events], st.SearchStrategy[Events]]) -> st.SearchStrategy[Events]:
    return st.sampled_from(PROTOCOLS[protocol][1]).flatmap(mutate)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@FUZZ
@given(data=st.data(), keep_raw=st.booleans(), skip_malformed=st.booleans())
def test_any_stream_near_a_valid_one_gives_typed_deltas_or_a_typed_error(
    protocol: str, data: st.DataObject, keep_raw: bool, skip_malformed: bool
) -> None:
    events = data.draw(_stream_of(protocol, mutated_stream))
    new_parser = PROTOCOLS[protocol][0]
    outcome = parse(events, new_parser(keep_raw), skip_malformed=skip_malformed)
    assert outcome.error is None or isinstance(outcome.error, UpstreamProtocolError | UpstreamStatusError)


def _without_raw(deltas: list[Delta]) -> list[Delta]:
    return [dataclasses.replace(delta, raw=None) for delta in deltas]


@st.composite
def one_event_mutated(draw: st.DrawFn, events: list[ServerSentEvent]) -> list[ServerSentEvent]:
    events = list(events)
    at = draw(st.integers(0, len(events) - 1))
    events[at] = draw(mutated_event(events[at]))
    return events


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@FUZZ
@given(data=st.data(), keep_raw=st.booleans())
def test_an_event_passed_over_as_malformed_leaves_the_parser_as_it_was(
    protocol: str, data: st.DataObject, keep_raw: bool
) -> None:
    """With `skip_malformed_events`, the stream goes on as if the refused event never came."""
    events = data.draw(_stream_of(protocol, one_event_mutated))
    new_parser = PROTOCOLS[protocol][0]
    outcome = parse(events, new_parser(keep_raw), skip_malformed=True)
    kept = [event for i, event in enumerate(events) if i not in outcome.refused]
    without = parse(kept, new_parser(keep_raw), skip_malformed=True)
    assert without.refused == []
    assert _without_raw(outcome.deltas) == _without_raw(without.deltas)
    assert type(outcome.error) is type(without.error)


# The text a valid stream carries, read from its events independently of the parsers.


def _openai_text(payload: dict[str, Any]) -> str:
    choices = payload.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def _completions_text(payload: dict[str, Any]) -> str:
    return next((c.get("text") or "" for c in payload.get("choices") or [] if c.get("index", 0) == 0), "")


def _anthropic_text(payload: dict[str, Any]) -> str:
    if payload.get("type") == "content_block_start":
        return payload["content_block"].get("text") or "" if payload["content_block"]["type"] == "text" else ""
    delta = payload.get("delta") or {}
    return delta.get("text", "") if delta.get("type") == "text_delta" else ""


def _responses_text(payload: dict[str, Any]) -> str:
    return payload["delta"] if payload.get("type") == "response.output_text.delta" else ""


TEXT_OF: Final[dict[str, Callable[[dict[str, Any]], str]]] = {
    "openai": _openai_text,
    "completions": _completions_text,
    "anthropic": _anthropic_text,
    "responses": _responses_text,
}


def stream_text(protocol: str, events: list[ServerSentEvent]) -> str:
    payloads = (_json_data(event) for event in events)
    return "".join(TEXT_OF[protocol](payload) for payload in payloads if isinstance(payload, dict))


_UNKNOWN_EVENTS: Final[dict[str, list[ServerSentEvent]]] = {
    "openai": [ServerSentEvent('{"id": "x", "object": "chat.completion.chunk", "choices": []}')],
    "completions": [ServerSentEvent('{"id": "x", "object": "text_completion", "choices": []}')],
    "anthropic": [
        ServerSentEvent('{"type": "ping"}', event="ping"),
        ServerSentEvent('{"type": "x_vendor_event", "index": 0}', event="x_vendor_event"),
    ],
    "responses": [
        ServerSentEvent('{"type": "response.in_progress", "sequence_number": 99}', event="response.in_progress"),
        ServerSentEvent('{"type": "response.x_vendor.delta", "delta": "not text"}', event="response.x_vendor.delta"),
    ],
}


@st.composite
def still_valid(draw: st.DrawFn, protocol_events: tuple[str, list[ServerSentEvent]]) -> list[ServerSentEvent]:
    """Changes that keep a stream valid: vendor keys added to any object, unknown events added anywhere."""
    protocol, events = protocol_events
    events = list(events)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(events) - 1))
        payload = _json_data(events[at])
        if draw(st.booleans()) and isinstance(payload, dict):
            container = value_at(payload, draw(st.sampled_from(_containers(payload))))
            container["x_vendor_" + draw(st.text("abc", max_size=3))] = draw(JSON)
            events[at] = _with_data(events[at], payload)
        else:
            events.insert(at, draw(st.sampled_from(_UNKNOWN_EVENTS[protocol])))
    return events


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@FUZZ
@given(data=st.data(), keep_raw=st.booleans())
def test_a_valid_stream_loses_and_doubles_no_text(protocol: str, data: st.DataObject, keep_raw: bool) -> None:
    events = data.draw(st.sampled_from(PROTOCOLS[protocol][1]).flatmap(lambda events: still_valid((protocol, events))))
    outcome = parse(events, PROTOCOLS[protocol][0](keep_raw), skip_malformed=False)
    assert outcome.error is None
    assert "".join(delta.text for delta in outcome.deltas) == stream_text(protocol, events)
    assert sum(delta.finish_reason is not None for delta in outcome.deltas) == 1
