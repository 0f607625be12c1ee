"""
Tests of the OpenAI front adapter: bytes exactly as `/work/shared/sse_protocol.md` §4 requires
(only `data:` lines, real `chat.completion.chunk` objects, usage only when asked, `[DONE]`).
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from trioproxy._accumulator import Accumulator
from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import (
    ModelNotFoundError,
    RequestError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from trioproxy._sse import SSEDecoder
from trioproxy.pipeline import RetryNotice
from trioproxy.server._openai_front import (
    DONE,
    KEEP_ALIVE,
    OpenAIChunkRenderer,
    TextCompletionRenderer,
    completion_body,
    error_body,
    text_completion_body,
)

MODEL = "local/gpt-x"
FINISH_REASONS = {None, "stop", "length", "tool_calls", "content_filter", "function_call"}


def payload(out: bytes) -> Any:
    """The JSON of one rendered event, after checking its framing."""
    assert out.startswith(b"data: ")
    assert out.endswith(b"\n\n")
    body = out[len(b"data: ") : -2]
    assert b"\n" not in body
    assert b"\r" not in body
    return orjson.loads(body)


def check_chunk(chunk: dict[str, Any], renderer: OpenAIChunkRenderer) -> None:
    """A valid `chat.completion.chunk` (§4.3) from this renderer."""
    assert chunk["id"] == renderer.id
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", chunk["id"])
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["created"] == renderer.created
    assert isinstance(chunk["created"], int)
    assert chunk["model"] == MODEL
    assert isinstance(chunk["choices"], list)
    for choice in chunk["choices"]:
        assert choice["index"] == 0
        assert isinstance(choice["delta"], dict)
        assert choice["finish_reason"] in FINISH_REASONS
    if renderer.include_usage:
        assert "usage" in chunk
    else:
        assert "usage" not in chunk


def render(deltas: list[Delta], *, include_usage: bool) -> tuple[OpenAIChunkRenderer, list[dict[str, Any]]]:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=include_usage)
    chunks = []
    for delta in deltas:
        out = renderer.delta(delta)
        for event in out.split(b"\n\n")[:-1]:  # a delta may give more than one event
            chunk = payload(event + b"\n\n")
            check_chunk(chunk, renderer)
            chunks.append(chunk)
    return renderer, chunks


STREAM = [
    Delta(role="assistant"),
    Delta(text="Hello"),
    Delta(text=" world"),
    Delta(finish_reason="stop"),
    Delta(usage=Usage(prompt_tokens=9, completion_tokens=2)),
]


def test_stream_without_usage() -> None:
    renderer, chunks = render(STREAM, include_usage=False)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " world"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    ]
    assert {c["id"] for c in chunks} == {renderer.id}
    assert {c["created"] for c in chunks} == {renderer.created}
    assert all("usage" not in c for c in chunks)


def test_stream_with_usage() -> None:
    renderer, chunks = render(STREAM, include_usage=True)
    assert len(chunks) == 5
    assert [c["usage"] for c in chunks[:4]] == [None, None, None, None]
    assert chunks[4] == {
        "id": renderer.id,
        "object": "chat.completion.chunk",
        "created": renderer.created,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }


def test_exact_bytes_of_a_content_chunk() -> None:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=False)
    renderer.id, renderer.created = "chatcmpl-abc", 1694268190
    assert renderer.delta(Delta(text="Hi")) == (
        b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1694268190,'
        b'"model":"local/gpt-x","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,'
        b'"finish_reason":null}]}\n\n'
    )


def test_role_with_text() -> None:
    _, [chunk] = render([Delta(role="assistant", text="Hi")], include_usage=False)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}


def test_text_with_newlines_stays_one_line() -> None:
    _, [chunk] = render([Delta(text="a\nb\r\nc")], include_usage=False)
    assert chunk["choices"][0]["delta"] == {"content": "a\nb\r\nc"}


def test_tool_call_chunks() -> None:
    _, chunks = render(
        [
            Delta(role="assistant", tool_calls=(ToolCallDelta(index=0, id="call_1", name="get_weather"),)),
            Delta(tool_calls=(ToolCallDelta(index=0, arguments='{"city":'),)),
            Delta(tool_calls=(ToolCallDelta(index=0, arguments='"Paris"}'), ToolCallDelta(index=1, id="call_2"))),
            Delta(finish_reason="tool_calls"),
        ],
        include_usage=False,
    )
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {
            "tool_calls": [
                {"index": 0, "function": {"arguments": '"Paris"}'}},
                {"index": 1, "id": "call_2", "type": "function", "function": {"arguments": ""}},
            ]
        },
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_call_that_opens_without_a_name_still_reads_in_the_sdk() -> None:
    """
    The SDK's stream accumulator reads a call's `function` once it has an id (`type`
    "function"): a call opened without one raised `AttributeError` in the client at its next
    fragment.
    """
    _, chunks = render(
        [
            Delta(tool_calls=(ToolCallDelta(index=0, id="call_1"),)),
            Delta(tool_calls=(ToolCallDelta(index=0, arguments="{}"),)),
            Delta(finish_reason="tool_calls"),
        ],
        include_usage=False,
    )
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(construct_type(type_=ChatCompletionChunk, value=chunk))
    [call] = state.get_final_completion().choices[0].message.tool_calls or []
    assert (call.id, call.function.arguments) == ("call_1", "{}")


def test_usage_only_delta_dropped_without_include_usage() -> None:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=False)
    assert renderer.delta(Delta(usage=Usage(1, 2))) == b""
    # also when it still carries the upstream's usage chunk
    assert renderer.delta(Delta(usage=Usage(1, 2), raw=b'data: {"choices":[],"usage":{}}\n\n')) == b""


def test_usage_with_content_gets_its_own_chunk() -> None:
    _, chunks = render(
        [Delta(finish_reason="length", usage=Usage(prompt_tokens=3, completion_tokens=4))], include_usage=True
    )
    assert [(c["choices"], c["usage"]) for c in chunks] == [
        ([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}], None),
        ([], {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
    ]
    _, chunks = render([Delta(finish_reason="length", usage=Usage(3, 4))], include_usage=False)
    assert [(c["choices"][0]["finish_reason"], "usage" in c) for c in chunks] == [("length", False)]


def test_raw_passthrough() -> None:
    raw = (
        b'data: {"id":"up-1","object":"chat.completion.chunk","created":1,"model":"gpt-x",'
        b'"choices":[{"index":0,"delta":{"content":"hi","reasoning_content":"x"}}], "x_vendor": 1}\n\n'
    )
    for include_usage in (False, True):
        renderer = OpenAIChunkRenderer(model=MODEL, include_usage=include_usage)
        assert renderer.delta(Delta(text="hi", raw=raw)) == raw
    usage_raw = (
        b'data: {"id":"up-1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    )
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=True)
    assert renderer.delta(Delta(usage=Usage(1, 1), raw=usage_raw)) == usage_raw


def test_reasoning_is_rendered_as_reasoning_content() -> None:
    _, chunks = render([Delta(reasoning="let me see")], include_usage=False)
    assert chunks[0]["choices"][0]["delta"] == {"reasoning_content": "let me see"}
    # an Anthropic thinking signature has no field here
    assert OpenAIChunkRenderer(model=MODEL, include_usage=True).delta(Delta(reasoning_signature="EqQB")) == b""


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            UpstreamStatusError("boom", status=500),
            {"message": "boom", "type": "upstream_error", "param": None, "code": None},
        ),
        (
            UpstreamTimeoutError("no token for 30 s", kind="first_token_timeout"),
            {"message": "no token for 30 s", "type": "timeout_error", "param": None, "code": "first_token_timeout"},
        ),
        (
            RequestError("'stream' must be a boolean", param="stream"),
            {"message": "'stream' must be a boolean", "type": "invalid_request_error", "param": "stream", "code": None},
        ),
        (
            ModelNotFoundError("no such model"),
            {"message": "no such model", "type": "not_found_error", "param": "model", "code": "model_not_found"},
        ),
    ],
)
def test_error(error: Any, expected: dict[str, Any]) -> None:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=True)
    out = renderer.error(error)
    assert payload(out) == {"error": expected}
    assert error_body(error) == {"error": expected}
    assert out == b"data: " + orjson.dumps({"error": expected}) + b"\n\n"


def test_done_and_opened() -> None:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=False)
    assert renderer.done(object()) == b"data: [DONE]\n\n" == DONE
    assert renderer.opened() == b""
    assert KEEP_ALIVE == b": keep-alive\n\n"


def test_never_an_id_or_event_line() -> None:
    for include_usage in (False, True):
        renderer = OpenAIChunkRenderer(model=MODEL, include_usage=include_usage)
        stream = renderer.opened()
        for delta in STREAM:
            stream += renderer.delta(delta)
        stream += renderer.error(UpstreamStatusError("x", status=502)) + renderer.done(None)
        lines = [line for line in stream.split(b"\n") if line]
        assert all(line.startswith(b"data: ") for line in lines), lines
        # what a standard decoder sees: every event a JSON object or [DONE], no id, default type
        events = SSEDecoder().feed(stream)
        assert [e.data for e in events][-1] == "[DONE]"
        for event in events:
            assert (event.event, event.id, event.retry) == ("message", "", None)
            if event.data != "[DONE]":
                assert isinstance(orjson.loads(event.data), dict)


def test_done_ignores_the_session() -> None:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=True)
    acc = Accumulator()
    acc.add(Delta(text="Hello", finish_reason="length", usage=Usage(1, 2)))
    assert renderer.done(SimpleNamespace(accumulator=acc)) == DONE
    assert renderer.done(None) == DONE


def test_heartbeat_is_an_sse_comment() -> None:
    renderer = OpenAIChunkRenderer(model=MODEL, include_usage=False)
    assert renderer.heartbeat() == b": keep-alive\n\n" == KEEP_ALIVE
    # a standard decoder (and so every SDK) sees no event, and the stream around it is unchanged
    assert SSEDecoder().feed(renderer.heartbeat()) == []
    hi = renderer.delta(Delta(text="Hi"))
    events = SSEDecoder().feed(renderer.heartbeat() + hi + renderer.heartbeat() + renderer.done(None))
    assert [e.data for e in events] == [hi[len(b"data: ") : -2].decode(), "[DONE]"]


@pytest.mark.parametrize("kind", ["retry", "failover"])
def test_notice_renders_nothing(kind: str) -> None:
    notice = RetryNotice(kind=kind, attempt=1, provider="local", model="gpt-x", delay=0.5, reason="HTTP 503")
    for include_usage in (False, True):
        assert OpenAIChunkRenderer(model=MODEL, include_usage=include_usage).notice(notice) == b""


def test_each_renderer_has_its_own_id() -> None:
    a = OpenAIChunkRenderer(model=MODEL, include_usage=False)
    b = OpenAIChunkRenderer(model=MODEL, include_usage=False)
    assert a.id != b.id


# --------------------------------------------------------------------------------------------
# non-streaming


def test_completion_body_text() -> None:
    acc = Accumulator()
    for delta in STREAM:
        acc.add(delta)
    body = completion_body(acc, model=MODEL, prompt_chars=40)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", body.pop("id"))
    assert isinstance(body.pop("created"), int)
    assert body == {
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }


def test_completion_body_reasoning() -> None:
    acc = Accumulator()
    for delta in (Delta(reasoning="Let me "), Delta(reasoning="see."), Delta(text="42")):
        acc.add(delta)
    message = completion_body(acc, model=MODEL, prompt_chars=0)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Let me see.", "42")


def test_completion_body_tool_calls_and_estimate() -> None:
    acc = Accumulator()
    acc.add(Delta(role="assistant", tool_calls=(ToolCallDelta(index=0, id="call_1", name="f", arguments='{"a":'),)))
    acc.add(Delta(tool_calls=(ToolCallDelta(index=0, arguments="1}"),)))
    acc.add(Delta(finish_reason="tool_calls"))
    body = completion_body(acc, model=MODEL, prompt_chars=10)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    # estimated: 10 prompt chars -> 3; 7 argument chars -> 2 tokens, 2 content deltas -> 2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_completion_body_without_finish_reason_says_stop() -> None:
    acc = Accumulator()
    acc.add(Delta(text="x"))
    assert completion_body(acc, model=MODEL, prompt_chars=0)["choices"][0]["finish_reason"] == "stop"


def test_a_legacy_completion_renders_text_completion_chunks() -> None:
    renderer = TextCompletionRenderer(model=MODEL, include_usage=True)
    chunk = payload(renderer.delta(Delta(text="def", arrived=0.0)))
    last = renderer.delta(Delta(finish_reason="length", usage=Usage(prompt_tokens=3, completion_tokens=1)))
    finish, usage = (payload(event + b"\n\n") for event in last.split(b"\n\n")[:2])

    assert chunk["id"].startswith("cmpl-")
    assert chunk["object"] == "text_completion"
    assert chunk["choices"] == [{"index": 0, "text": "def", "logprobs": None, "finish_reason": None}]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == 4
    assert renderer.delta(Delta(text="x", raw=b"data: {}\n\n")) == b"data: {}\n\n"


def test_a_whole_legacy_completion_is_folded_from_the_stream() -> None:
    acc = Accumulator()
    acc.add(Delta(text="a, b"))
    acc.add(Delta(text=" = 0, 1", finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=2)))
    body = text_completion_body(acc, model=MODEL, prompt_chars=12)

    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": "a, b = 0, 1", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
