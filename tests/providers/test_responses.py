"""
Tests of the Responses upstream translation: plain bytes and dicts, no sockets. Streams are
`tests/fixtures/responses/text_stream.sse` and the scripted upstream's own Responses events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from trioproxy._events import Delta, Usage
from trioproxy._exceptions import ContextLengthError, RequestError, UpstreamProtocolError, UpstreamStatusError
from trioproxy._request import ChatRequest, NativeRequest, parse_chat_request
from trioproxy._sse import SSEDecoder
from trioproxy.providers.responses import ResponsesStreamParser, ResponsesTranslation, responses_request_body
from trioproxy.testing import Reply, ToolCall
from trioproxy.testing._wire import responses_frames, responses_stream_error

FIXTURES = Path(__file__).parent.parent / "fixtures" / "responses"
TRANSLATION = ResponsesTranslation(base_url="http://127.0.0.1:9/v1", api_key="sk-test-0123456789")


def parse(wire: bytes, *, keep_raw: bool = False) -> list[Delta]:
    parser = ResponsesStreamParser(keep_raw=keep_raw)
    deltas = [delta for event in SSEDecoder().feed(wire) for delta in parser.feed(event)]
    assert parser.finished
    return deltas


def test_a_recorded_text_stream() -> None:
    deltas = parse((FIXTURES / "text_stream.sse").read_bytes())
    assert deltas[0].role == "assistant"
    assert "".join(d.text for d in deltas) == "OK"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == Usage(prompt_tokens=12, completion_tokens=2, cache_read_tokens=0)


def test_every_event_keeps_its_bytes_for_a_responses_client() -> None:
    wire = (FIXTURES / "text_stream.sse").read_bytes()
    deltas = parse(wire, keep_raw=True)
    assert b"".join(d.raw or b"" for d in deltas) == wire


def test_items_the_common_model_does_not_carry_are_kept_whole_for_a_responses_client() -> None:
    wire = (FIXTURES / "builtin_tools_stream.sse").read_bytes()
    items = [delta.raw_item for delta in parse(wire, keep_raw=True) if delta.raw_item is not None]
    expected = [("reasoning", "rs_builtin"), ("web_search_call", "ws_builtin")]
    assert [(item["type"], item["id"]) for item in items] == expected
    assert items[0]["encrypted_content"] == "gAAAAABpEncryptedReasoning=="
    assert items[1]["action"]["query"] == "weather Paris today"
    chat_client = parse(wire)  # another protocol's renderer could not place them: nothing but text and reasoning
    assert all(delta.raw_item is None for delta in chat_client)
    assert "".join(d.reasoning for d in chat_client).startswith("**Checking the weather**")


def test_function_calls_are_numbered_in_the_order_they_start() -> None:
    calls = (ToolCall(id="call_a", name="f", arguments='{"a": 1}'), ToolCall(id="call_b", name="g", arguments="{}"))
    wire = b"".join(frame.data for frame in responses_frames(Reply(tokens=("x",), tool_calls=calls), "m", 1))
    deltas = parse(wire)
    fragments = [tc for d in deltas for tc in d.tool_calls]
    assert [(tc.index, tc.id, tc.name) for tc in fragments if tc.id] == [(0, "call_a", "f"), (1, "call_b", "g")]
    assert "".join(tc.arguments for tc in fragments if tc.index == 0) == '{"a": 1}'
    assert deltas[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(("finish_reason", "expected"), [("length", "length"), ("content_filter", "content_filter")])
def test_an_incomplete_response_ends_with_its_reason(finish_reason: str, expected: str) -> None:
    wire = b"".join(frame.data for frame in responses_frames(Reply(finish_reason=finish_reason), "m", 1))
    assert parse(wire)[-1].finish_reason == expected


def test_an_in_stream_failure_is_an_upstream_status_error() -> None:
    parser = ResponsesStreamParser(keep_raw=False, secret="sk-test-0123456789")
    failure, _ = SSEDecoder().feed(responses_stream_error("boom with sk-test-0123456789", 3))  # then response.failed
    with pytest.raises(UpstreamStatusError) as info:
        parser.feed(failure)
    assert info.value.message == "boom with ***"
    assert info.value.status == 502


def test_an_in_stream_context_length_failure_is_a_context_length_error() -> None:
    """A `response.failed` with `context_length_exceeded` goes to the route's `context_fallbacks` like a 400."""
    failed = {
        "type": "response.failed",
        "sequence_number": 2,
        "response": {"status": "failed", "error": {"code": "context_length_exceeded", "message": "too long"}},
    }
    event = b"event: response.failed\ndata: " + orjson.dumps(failed) + b"\n\n"
    with pytest.raises(ContextLengthError) as info:
        ResponsesStreamParser(keep_raw=False).feed(SSEDecoder().feed(event)[0])
    assert info.value.status == 400


def test_arguments_for_an_unknown_call_are_a_protocol_error() -> None:
    event = b'event: x\ndata: {"type":"response.function_call_arguments.delta","item_id":"fc_1","delta":"{"}\n\n'
    with pytest.raises(UpstreamProtocolError):
        ResponsesStreamParser(keep_raw=False).feed(SSEDecoder().feed(event)[0])


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "response.completed", "response": "done"},
        {"type": "response.incomplete", "response": {"incomplete_details": "max_output_tokens"}},
        {"type": "response.failed", "response": [1]},
        {"type": "response.failed", "response": {"error": "boom"}},
    ],
)
def test_an_event_whose_object_is_not_one_is_a_protocol_error(payload: dict[str, Any]) -> None:
    event = b"event: x\ndata: " + orjson.dumps(payload) + b"\n\n"
    with pytest.raises(UpstreamProtocolError, match="is not an object"):
        ResponsesStreamParser(keep_raw=False).feed(SSEDecoder().feed(event)[0])


def one_event(payload: dict[str, Any]) -> Any:
    return SSEDecoder().feed(b"event: x\ndata: " + orjson.dumps(payload) + b"\n\n")[0]


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "response.created", "response": "resp_1"},  # the renderer reads its id
        {"type": "response.output_item.added", "item": {"type": "function_call", "id": "fc_1", "call_id": 1}},
        {"type": "response.output_item.added", "item": {"type": "function_call", "id": "fc_1", "name": ["f"]}},
        {"type": "response.output_item.added", "item": {"type": "function_call", "id": "fc_1", "arguments": {}}},
        {"type": "response.output_item.added", "item": "fc_1"},
        {"type": "response.output_item.done", "item": {"type": ["reasoning"], "id": "rs_1"}},
        {"type": "response.completed", "response": {"usage": {"input_tokens": -5, "output_tokens": 1}}},
        {"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": True}}},
    ],
)
@pytest.mark.parametrize("keep_raw", [False, True])
def test_a_field_of_the_wrong_type_is_a_protocol_error(payload: dict[str, Any], keep_raw: bool) -> None:
    """Not a stray `TypeError` here, nor one in a renderer that takes the field as the protocol defines it."""
    with pytest.raises(UpstreamProtocolError):
        ResponsesStreamParser(keep_raw=keep_raw).feed(one_event(payload))


@pytest.mark.parametrize("payload", [{}, {"type": 5, "delta": "x"}, {"type": "response.x\n\ndata: {}", "delta": "x"}])
@pytest.mark.parametrize("keep_raw", [False, True])
def test_an_event_without_a_one_line_string_type_is_a_protocol_error(payload: dict[str, Any], keep_raw: bool) -> None:
    """
    Its type names the event a Responses client is sent (`event:` line): without one, the
    resumable stream's framing raised `KeyError`; with a line break, it would frame events of its own.
    """
    with pytest.raises(UpstreamProtocolError):
        ResponsesStreamParser(keep_raw=keep_raw).feed(one_event(payload))


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "response.completed", "response": "done"},
        {"type": "response.incomplete", "response": {"incomplete_details": "max_output_tokens"}},
    ],
)
def test_a_terminal_event_refused_as_malformed_does_not_end_the_stream(payload: dict[str, Any]) -> None:
    """
    With `skip_malformed_events` it is passed over: the stream is not finished by it (its end
    then says the answer was cut short), as if it never came.
    """
    parser = ResponsesStreamParser(keep_raw=False)
    with pytest.raises(UpstreamProtocolError):
        parser.feed(one_event(payload))
    assert not parser.finished
    with pytest.raises(UpstreamProtocolError, match="before a finish reason"):
        parser.end()


def test_a_responses_client_s_body_goes_up_whole() -> None:
    body = {"model": "resp/gpt", "input": "hi", "tools": [{"type": "web_search"}], "include": ["x"], "vendor": 1}
    chat = ChatRequest(body={}, model="resp/gpt", messages=[], native=NativeRequest("responses", body)).routed("gpt")
    request = TRANSLATION.stream_request(chat)
    assert request.url == "http://127.0.0.1:9/v1/responses"
    assert orjson.loads(request.body) == {**body, "model": "gpt", "stream": True}
    assert request.headers["authorization"] == "Bearer sk-test-0123456789"


def translate(**fields: Any) -> dict[str, Any]:
    return responses_request_body(parse_chat_request({"model": "m", **fields}))


def test_a_chat_request_translates_to_responses() -> None:
    out = translate(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:,x"}}],
            },
            {
                "role": "assistant",
                "content": "ok",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
        max_completion_tokens=9,
        reasoning_effort="low",
        stream_options={"include_usage": True},
    )
    assert out["input"] == [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "data:,x"}],
        },
        {"type": "message", "role": "assistant", "content": "ok"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
    ]
    assert out["tools"] == [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "function", "name": "f"}
    assert out["text"] == {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}
    assert (out["max_output_tokens"], out["reasoning"]) == (9, {"effort": "low"})
    assert "stream_options" not in out


@pytest.mark.parametrize(
    ("call", "param"),
    [("c1", "messages[0].tool_calls[0]"), ({"id": "c1", "function": "f"}, "messages[0].tool_calls[0].function")],
)
def test_a_malformed_tool_call_is_refused_by_name(call: object, param: str) -> None:
    with pytest.raises(RequestError) as info:
        translate(messages=[{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert info.value.param == param
    assert f"'{param}' must be an object" in info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": False}, "tools"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": True}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": {"id": "c1"}}]}, "messages[0].tool_calls"),
    ],
)
def test_tools_or_tool_calls_that_are_not_arrays_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        translate(**{"messages": [{"role": "user", "content": "hi"}], **fields})
    assert info.value.param == param
    assert f"'{param}' must be an array" in info.value.message


@pytest.mark.parametrize("function", ["f", ["f"], 1])
def test_a_tool_choice_whose_function_is_not_an_object_is_refused_by_name(function: object) -> None:
    with pytest.raises(RequestError) as info:
        translate(messages=[{"role": "user", "content": "hi"}], tool_choice={"type": "function", "function": function})
    assert info.value.param == "tool_choice.function"


@pytest.mark.parametrize("json_schema", ["s", ["s"], 1])
def test_a_json_schema_response_format_that_is_not_an_object_is_refused_by_name(json_schema: object) -> None:
    with pytest.raises(RequestError) as info:
        translate(
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": json_schema},
        )
    assert info.value.param == "response_format.json_schema"


def test_a_tool_result_s_text_parts_that_are_not_strings_are_refused_by_name() -> None:
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": 42}]},
    ]
    with pytest.raises(RequestError) as info:
        translate(messages=messages)
    assert info.value.param == "messages[1].content[0].text"


ANSWER_CHANGING = [
    ("stop", "END"),
    ("logprobs", True),
    ("top_logprobs", 2),
    ("seed", 7),
    ("frequency_penalty", 0.5),
    ("presence_penalty", -0.5),
    ("logit_bias", {"1": 2}),
    ("n", 2),
    ("vendor_field", 1),
]


@pytest.mark.parametrize(("field", "value"), ANSWER_CHANGING)
def test_a_field_responses_has_not_is_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(RequestError) as info:
        translate(messages=[{"role": "user", "content": "hi"}], **{field: value})
    assert info.value.param == field
    assert f"'{field}' has no equivalent in the OpenAI Responses API" in info.value.message


@pytest.mark.parametrize(("field", "value"), ANSWER_CHANGING)
def test_drop_params_drops_a_field_responses_has_not(field: str, value: object) -> None:
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value})
    for drop_params in (True, frozenset({field})):
        assert field not in responses_request_body(chat, drop_params=drop_params)
    with pytest.raises(RequestError):
        responses_request_body(chat, drop_params=frozenset({"other"}))


def test_neutral_values_and_hints_are_dropped_and_verbosity_is_carried() -> None:
    out = translate(
        messages=[{"role": "user", "content": "hi"}],
        n=1,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        seed=None,
        stream_options={"include_usage": True},
        verbosity="low",
        response_format={"type": "json_object"},
    )
    assert out == {
        "input": [{"type": "message", "role": "user", "content": "hi"}],
        "model": "m",
        "text": {"format": {"type": "json_object"}, "verbosity": "low"},
    }


def test_a_refusal_names_the_field_as_an_anthropic_client_sent_it() -> None:
    common = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["END"]}
    native = NativeRequest("anthropic", {}, names={"stop": "stop_sequences"})
    chat = ChatRequest(body=common, model="m", messages=common["messages"], native=native)
    with pytest.raises(RequestError) as info:
        responses_request_body(chat)
    assert info.value.param == "stop_sequences"
