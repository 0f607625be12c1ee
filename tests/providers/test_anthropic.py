"""
Tests of the Anthropic translation: plain dicts and bytes, no sockets.

Streams are the recorded fixtures of `/work/shared/sse_protocol.md` §5.2, split into events by a
tiny helper (the fixtures only use `event:` and `data:` lines), so a failure here points at the
translation and not at the SSE decoder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import ContextLengthError, RequestError, UpstreamProtocolError, UpstreamStatusError
from trioproxy._policy import RetryConfig
from trioproxy._request import ChatRequest, NativeRequest
from trioproxy._sse import ServerSentEvent, SSEDecoder
from trioproxy.providers.anthropic import (
    ANTHROPIC_VERSION,
    AnthropicStreamParser,
    AnthropicTranslation,
    messages_request_body,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"

# --------------------------------------------------------------------------------------------
# helpers


def chat(messages: list[dict[str, Any]], **fields: Any) -> ChatRequest:
    body = {"model": "anthropic/claude", "messages": messages, **fields}
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    return ChatRequest(
        body=body,
        model="anthropic/claude",
        messages=messages,
        stream=True,
        max_tokens=max_tokens,
        upstream_model="claude-sonnet-4-5",
    )


def translate(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return messages_request_body(chat(messages, **fields), default_max_tokens=1024)


def refused(messages: list[dict[str, Any]], **fields: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        translate(messages, **fields)
    return info.value


def events(text: str) -> list[ServerSentEvent]:
    """Split a recorded stream that uses only `event:` and `data:` lines."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append(ServerSentEvent(data=fields["data"], event=fields.get("event", "message")))
    return out


def feed_all(parser: AnthropicStreamParser, stream: list[ServerSentEvent]) -> list[Delta]:
    deltas: list[Delta] = []
    for event in stream:
        deltas += parser.feed(event)
    return deltas


def ev(kind: str, payload: dict[str, Any] | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps({"type": kind, **(payload or {})}).decode(), event=kind)


USER = {"role": "user", "content": "Hi"}

# --------------------------------------------------------------------------------------------
# the HTTP request


def test_stream_request_url_headers_and_body() -> None:
    translation = AnthropicTranslation(api_key="sk-ant-secret", extra_headers={"Anthropic-Beta": "tools-2024"})
    request = translation.stream_request(chat([USER], temperature=0.5))
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert dict(request.headers) == {
        "content-type": "application/json",
        "accept": "text/event-stream",
        "anthropic-version": ANTHROPIC_VERSION,
        "x-api-key": "sk-ant-secret",
        "anthropic-beta": "tools-2024",
    }
    assert orjson.loads(request.body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.5,
        "stream": True,
    }


@pytest.mark.parametrize(
    "base_url",
    ["http://gw.local:8080", "http://gw.local:8080/", "http://gw.local:8080/v1", "http://gw.local:8080/v1/"],
)
def test_base_url_with_or_without_v1(base_url: str) -> None:
    request = AnthropicTranslation(base_url=base_url, api_key=None).stream_request(chat([USER]))
    assert request.url == "http://gw.local:8080/v1/messages"


def test_no_api_key_no_header_and_custom_version_and_default_max_tokens() -> None:
    translation = AnthropicTranslation(api_key=None, version="2099-01-01", default_max_tokens=77)
    request = translation.stream_request(chat([USER]))
    assert "x-api-key" not in request.headers
    assert request.headers["anthropic-version"] == "2099-01-01"
    assert orjson.loads(request.body)["max_tokens"] == 77


def test_stream_parser_is_fresh_each_time() -> None:
    translation = AnthropicTranslation(api_key=None)
    first, second = translation.stream_parser(chat([USER])), translation.stream_parser(chat([USER]))
    assert isinstance(first, AnthropicStreamParser)
    assert first is not second


# --------------------------------------------------------------------------------------------
# request translation


def test_minimal_body() -> None:
    assert translate([USER]) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hi"}],
    }


def test_model_falls_back_to_client_name_when_not_routed() -> None:
    request = ChatRequest(body={}, model="claude-x", messages=[USER])
    assert messages_request_body(request, default_max_tokens=5)["model"] == "claude-x"


def test_system_and_developer_become_top_level_system() -> None:
    body = translate(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use "}, {"type": "text", "text": "French."}]},
            USER,
            {"role": "system", "content": "Late rule."},
        ]
    )
    assert body["system"] == "You are terse.\n\nUse French.\n\nLate rule."
    assert body["messages"] == [{"role": "user", "content": "Hi"}]


def test_only_system_messages_is_refused() -> None:
    error = refused([{"role": "system", "content": "x"}])
    assert error.param == "messages"


def test_content_parts_text_and_images() -> None:
    body = translate(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
                ],
            }
        ]
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        }
    ]


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.png", "data:image/png,rawbytes", "data:;base64,AAAA", "data:image/png;base64,"],
)
def test_untranslatable_image_urls_name_the_field(url: str) -> None:
    error = refused(
        [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]
    )
    assert error.param == "messages[0].content[1].image_url.url"


def test_unsupported_content_part_names_the_field() -> None:
    error = refused([USER, {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert error.param == "messages[1].content[0].type"
    assert "input_audio" in error.message


def test_assistant_image_is_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    error = refused([USER, {"role": "assistant", "content": [image]}])
    assert error.param == "messages[1].content[0].type"


def test_text_part_without_string_text_is_refused() -> None:
    assert refused([{"role": "user", "content": [{"type": "text", "text": 5}]}]).param == "messages[0].content[0].text"


def test_assistant_refusal_part_becomes_text_and_empty_texts_dropped() -> None:
    body = translate(
        [
            USER,
            {"role": "assistant", "content": [{"type": "text", "text": ""}, {"type": "refusal", "refusal": "No."}]},
            {"role": "user", "content": "Why?"},
        ]
    )
    assert body["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "No."}]}


def test_tool_round_trip() -> None:
    body = translate(
        [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
            {"role": "user", "content": "Thanks. Which is warmer?"},
        ]
    )
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
                {"type": "text", "text": "Thanks. Which is warmer?"},
            ],
        },
    ]


def test_assistant_tool_calls_without_content_and_empty_arguments() -> None:
    body = translate(
        [
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}],
            },
            {"role": "tool", "tool_call_id": "c", "content": ""},
        ]
    )
    assert body["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "now", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c"}]},
    ]


def test_assistant_empty_string_content_with_tool_calls_has_no_empty_text_block() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = translate([USER, {"role": "assistant", "content": "", "tool_calls": [call]}])
    assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]


@pytest.mark.parametrize("arguments", ['{"city": "Par', "[1, 2]", "null"])
def test_tool_call_arguments_that_are_not_a_json_object_are_refused(arguments: str) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    error = refused(
        [
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "ok", "function": {"name": "g", "arguments": "{}"}}, call],
            },
        ]
    )
    assert error.param == "messages[1].tool_calls[1].function.arguments"


def test_tool_call_without_id_or_name_is_refused() -> None:
    no_id = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert refused([USER, {"role": "assistant", "tool_calls": [no_id]}]).param == "messages[1].tool_calls[0].id"
    no_name = {"id": "c", "type": "function", "function": {"arguments": "{}"}}
    assert (
        refused([USER, {"role": "assistant", "tool_calls": [no_name]}]).param
        == "messages[1].tool_calls[0].function.name"
    )


def test_tool_message_without_tool_call_id_is_refused() -> None:
    assert refused([USER, {"role": "tool", "content": "x"}]).param == "messages[1].tool_call_id"


def test_deprecated_function_role_and_function_call_are_refused() -> None:
    assert refused([USER, {"role": "function", "name": "f", "content": "x"}]).param == "messages[1].role"
    fc = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    assert refused([USER, fc]).param == "messages[1].function_call"


def test_consecutive_same_role_messages_merge() -> None:
    body = translate(
        [
            {"role": "user", "content": "one"},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "three"},
        ]
    )
    assert body["system"] == "sys"
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "three"},
    ]


def test_tool_results_are_put_first_in_a_merged_user_message() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = translate(
        [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "user", "content": "hurry"},
            {"role": "tool", "tool_call_id": "c", "content": "done"},
        ]
    )
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c", "content": "done"},
            {"type": "text", "text": "hurry"},
        ],
    }


def test_tools_translate() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = translate(
        [USER],
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather now", "parameters": params, "strict": True},
            },
            {"type": "function", "function": {"name": "now"}},
        ],
    )
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather now", "input_schema": params},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body


def test_bad_tools_name_the_field() -> None:
    assert refused([USER], tools=[{"type": "retrieval"}]).param == "tools[0].type"
    assert refused([USER], tools=[{"type": "function", "function": {}}]).param == "tools[0].function.name"
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": "x"}}]
    assert refused([USER], tools=bad_params).param == "tools[0].function.parameters"
    assert refused([USER], tools={"f": 1}).param == "tools"


TOOL = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    assert translate([USER], tools=TOOL, tool_choice=choice)["tool_choice"] == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "f"}},
            {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        ),
        ("none", {"type": "none"}),
    ],
)
def test_parallel_tool_calls_false(choice: Any, expected: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"tools": TOOL, "parallel_tool_calls": False}
    if choice is not None:
        fields["tool_choice"] = choice
    assert translate([USER], **fields)["tool_choice"] == expected


def test_parallel_tool_calls_true_or_without_tools_changes_nothing() -> None:
    assert "tool_choice" not in translate([USER], tools=TOOL, parallel_tool_calls=True)
    assert "tool_choice" not in translate([USER], parallel_tool_calls=False)


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        ("sometimes", "tool_choice"),
        ({"type": "function", "function": {}}, "tool_choice.function.name"),
        (3, "tool_choice"),
    ],
)
def test_bad_tool_choice_names_the_field(choice: Any, param: str) -> None:
    assert refused([USER], tools=TOOL, tool_choice=choice).param == param


def test_sampling_fields_stop_user_hints_and_neutral_values() -> None:
    body = translate(
        [USER],
        max_completion_tokens=300,
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        stop="END",
        user="u-42",
        n=1,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        logprobs=False,
        modalities=["text"],
        seed=None,
        response_format={"type": "text"},
        stream_options={"include_usage": True},
        store=True,
        metadata={"ticket": "42"},
        prompt_cache_key="k",
        safety_identifier="s",
        service_tier="auto",
    )
    assert body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-42"},
    }
    assert translate([USER], stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert "stop_sequences" not in translate([USER], stop=[])


ANSWER_CHANGING = [
    ("presence_penalty", 0.5),
    ("frequency_penalty", -0.1),
    ("logit_bias", {"1": 2}),
    ("seed", 7),
    ("logprobs", True),
    ("top_logprobs", 2),
    ("n", 2),
    ("verbosity", "low"),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("functions", [{"name": "f"}]),
    ("vendor_field", 1),
]


@pytest.mark.parametrize(("name", "value"), ANSWER_CHANGING)
def test_a_field_anthropic_has_no_equivalent_for_is_refused_by_name(name: str, value: object) -> None:
    error = refused([USER], **{name: value})
    assert error.param == name
    assert f"'{name}' has no equivalent in the Anthropic Messages API" in error.message
    assert "drop_params" in error.message


@pytest.mark.parametrize(("name", "value"), ANSWER_CHANGING)
def test_drop_params_drops_a_field_instead(name: str, value: object) -> None:
    request = chat([USER], **{name: value}, temperature=0.5)
    for drop_params in (True, frozenset({name})):
        body = messages_request_body(request, default_max_tokens=64, drop_params=drop_params)
        assert name not in body
        assert body["temperature"] == 0.5
    with pytest.raises(RequestError):
        messages_request_body(request, default_max_tokens=64, drop_params=frozenset({"other"}))


def test_a_refusal_names_the_field_as_a_responses_client_sent_it() -> None:
    names = {"verbosity": "text.verbosity"}
    request = replace(chat([USER], verbosity="low"), native=NativeRequest("responses", {}, names=names))
    with pytest.raises(RequestError) as info:
        messages_request_body(request, default_max_tokens=64)
    assert info.value.param == "text.verbosity"
    assert "'text.verbosity'" in info.value.message
    body = messages_request_body(request, default_max_tokens=64, drop_params=frozenset({"text.verbosity"}))
    assert "verbosity" not in body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": 3}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"user": 5}, "user"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"top_k": "many"}, "top_k"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ],
)
def test_bad_fields_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert refused([USER], **fields).param == param


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_a_json_schema_response_format_is_an_output_format() -> None:
    json_schema = {"name": "weather", "description": "A city", "schema": WEATHER_SCHEMA, "strict": True}
    body = translate([USER], response_format={"type": "json_schema", "json_schema": json_schema})
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}}
    assert "output_config" not in translate([USER], response_format={"type": "text"})
    assert "output_config" not in translate([USER], response_format=None)


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "json_object"}, "response_format", "no JSON mode without a schema"),
        ({"type": "json_schema", "json_schema": {"name": "w"}}, "response_format.json_schema.schema", "object"),
        ({"type": "json_schema"}, "response_format.json_schema.schema", "object"),
        ({"type": "yaml"}, "response_format.type", "json_schema"),
        ("json", "response_format", "object"),
    ],
)
def test_a_response_format_anthropic_cannot_hold_an_answer_to_is_refused(
    response_format: Any, param: str, words: str
) -> None:
    error = refused([USER], response_format=response_format)
    assert (error.param, words in error.message) == (param, True)


@pytest.mark.parametrize(
    ("effort", "max_tokens", "budget"),
    [
        ("minimal", 4096, 1024),
        ("low", 4096, 1024),
        ("low", 8000, 2000),
        ("medium", 4096, 2048),
        ("high", 4096, 3072),
        ("xhigh", 10000, 9000),
        ("minimal", 1025, 1024),
    ],
)
def test_reasoning_effort_is_a_thinking_budget_within_max_tokens(effort: str, max_tokens: int, budget: int) -> None:
    body = translate([USER], reasoning_effort=effort, max_tokens=max_tokens)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert body["max_tokens"] == max_tokens


def test_the_default_max_tokens_holds_the_budget_too() -> None:
    body = messages_request_body(chat([USER], reasoning_effort="medium"), default_max_tokens=4096)
    assert (body["max_tokens"], body["thinking"]) == (4096, {"type": "enabled", "budget_tokens": 2048})


def test_reasoning_effort_none_asks_for_no_thinking() -> None:
    assert "thinking" not in translate([USER], reasoning_effort="none")
    assert "thinking" not in translate([USER], reasoning_effort=None)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"reasoning_effort": "low", "max_tokens": 1024}, "above 1024"),
        ({"reasoning_effort": "extreme"}, "one of"),
        ({"reasoning_effort": 3}, "one of"),
    ],
)
def test_a_reasoning_effort_anthropic_cannot_think_within_is_refused(fields: dict[str, Any], words: str) -> None:
    error = refused([USER], **fields)
    assert (error.param, words in error.message) == ("reasoning_effort", True)


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    "messages",
    [
        [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
        [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        [USER, {"role": "assistant", "content": "The answer so far"}],
    ],
)
def test_no_thinking_for_a_turn_that_answers_tool_calls_or_continues_a_prefill(messages: list[dict[str, Any]]) -> None:
    body = translate(messages, reasoning_effort="high", max_tokens=4096)
    assert "thinking" not in body


def test_thinking_for_a_new_user_turn_after_tool_calls() -> None:
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert translate(messages, reasoning_effort="low", max_tokens=4096)["thinking"]["budget_tokens"] == 1024


def test_a_refusal_names_the_field_as_the_client_sent_it() -> None:
    request = replace(
        chat([USER], response_format={"type": "json_object"}, reasoning_effort="low", max_tokens=100),
        native=NativeRequest(
            "responses",
            {},
            names={"response_format": "text.format", "reasoning_effort": "reasoning.effort"},
        ),
    )
    with pytest.raises(RequestError) as info:
        messages_request_body(request, default_max_tokens=1024)
    assert info.value.param == "text.format"
    assert "'text.format'" in info.value.message
    request = replace(request, body={**request.body, "response_format": None})
    with pytest.raises(RequestError) as info:
        messages_request_body(request, default_max_tokens=1024)
    assert info.value.param == "reasoning.effort"
    assert "'reasoning.effort'" in info.value.message


def test_translation_does_not_mutate_the_client_request() -> None:
    messages = [USER, {"role": "user", "content": "again"}]
    request = chat(messages, tools=TOOL, parallel_tool_calls=False)
    before = orjson.dumps(request.body)
    messages_request_body(request, default_max_tokens=10)
    messages_request_body(request, default_max_tokens=10)
    assert orjson.dumps(request.body) == before


# --------------------------------------------------------------------------------------------
# stream parsing

# sse_protocol.md §5.2 (anthropic-sdk-python tests/lib/streaming/fixtures/basic_response.txt).
BASIC_RESPONSE = (FIXTURES / "basic_response.sse").read_text()

# Built from the bullet list of §5.2 (`tool_use_response.txt`): cache counts and service_tier in
# `message_start`, a text block then a tool_use block at index 1 whose first fragment is "".
TOOL_USE_RESPONSE = """\
event: message_start
data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","content":[],"model":"claude-3-5-sonnet-latest","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":10,"cache_read_input_tokens":3,"output_tokens":2,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me check."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"locati"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"on\\": \\"San Francisco, CA\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""  # noqa: E501 - recorded wire data, kept verbatim


def test_basic_recorded_stream() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    stream = events(BASIC_RESPONSE)
    assert len(stream) == 9
    assert feed_all(parser, stream) == [
        Delta(role="assistant"),
        Delta(text="Hello"),
        Delta(text=" there"),
        Delta(text="!"),
        Delta(finish_reason="stop"),
        Delta(usage=Usage(prompt_tokens=11, completion_tokens=6)),
    ]
    assert parser.finished


def test_tool_use_recorded_stream() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    deltas = feed_all(parser, events(TOOL_USE_RESPONSE))
    tool_id = "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert deltas == [
        Delta(role="assistant"),
        Delta(text="Let me check."),
        Delta(tool_calls=(ToolCallDelta(index=0, id=tool_id, name="get_weather", arguments=""),)),
        Delta(tool_calls=(ToolCallDelta(index=0, arguments='{"locati'),)),
        Delta(tool_calls=(ToolCallDelta(index=0, arguments='on": "San Francisco, CA"}'),)),
        Delta(finish_reason="tool_calls"),
        Delta(
            usage=Usage(prompt_tokens=472 + 10 + 3, completion_tokens=89, cache_read_tokens=3, cache_creation_tokens=10)
        ),
    ]
    arguments = "".join(tc.arguments for d in deltas for tc in d.tool_calls)
    assert orjson.loads(arguments) == {"location": "San Francisco, CA"}


def test_tool_indexes_count_tool_blocks_not_content_blocks() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    stream = [
        ev("message_start", {"message": {"role": "assistant", "usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
        ev("content_block_stop", {"index": 0}),
        ev(
            "content_block_start",
            {"index": 1, "content_block": {"type": "tool_use", "id": "t_a", "name": "a", "input": {}}},
        ),
        ev(
            "content_block_start",
            {"index": 2, "content_block": {"type": "tool_use", "id": "t_b", "name": "b", "input": {}}},
        ),
        ev("content_block_delta", {"index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"x":1}'}}),
    ]
    assert feed_all(parser, stream) == [
        Delta(role="assistant"),
        Delta(reasoning="hmm"),
        Delta(reasoning_signature="sig"),
        Delta(tool_calls=(ToolCallDelta(index=0, id="t_a", name="a"),)),
        Delta(tool_calls=(ToolCallDelta(index=1, id="t_b", name="b"),)),
        Delta(tool_calls=(ToolCallDelta(index=1, arguments="{}"),)),
        Delta(tool_calls=(ToolCallDelta(index=0, arguments='{"x":1}'),)),
    ]
    assert not parser.finished


def test_text_in_content_block_start_is_emitted() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    start = ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": "Pre"}})
    assert parser.feed(start) == [Delta(text="Pre")]


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("something_new", "stop"),
    ],
)
def test_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    event = ev("message_delta", {"delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 3}})
    assert parser.feed(event) == [Delta(finish_reason=finish_reason)]


def test_output_tokens_are_cumulative_latest_wins_and_null_cache_counts_are_zero() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    usage = {"input_tokens": 20, "cache_creation_input_tokens": None, "cache_read_input_tokens": 7, "output_tokens": 1}
    stream = [
        ev("message_start", {"message": {"role": "assistant", "usage": usage}}),
        ev("message_delta", {"delta": {"stop_reason": None}, "usage": {"output_tokens": 4}}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 12}}),
        ev("message_stop"),
    ]
    assert feed_all(parser, stream) == [
        Delta(role="assistant"),
        Delta(finish_reason="stop"),
        Delta(usage=Usage(prompt_tokens=27, completion_tokens=12, cache_read_tokens=7)),
    ]


def test_finished_only_after_message_stop_and_later_events_ignored() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    stream = events(BASIC_RESPONSE)
    for event in stream[:-1]:
        parser.feed(event)
        assert not parser.finished
    parser.feed(stream[-1])
    assert parser.finished
    assert parser.feed(stream[3]) == []
    assert parser.feed(ev("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})) == []
    assert parser.feed(ServerSentEvent(data="not json", event="message_delta")) == []


def test_ping_and_unknown_events_are_ignored() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    assert parser.feed(ServerSentEvent(data='{"type": "ping"}', event="ping")) == []
    assert parser.feed(ServerSentEvent(data="", event="ping")) == []
    assert parser.feed(ServerSentEvent(data='{"type":"future_thing","x":1}', event="future_thing")) == []
    assert parser.feed(ServerSentEvent(data="<not json either>", event="future_thing")) == []
    assert parser.feed(ServerSentEvent(data='{"type":"future_thing"}')) == []
    delta = {"index": 0, "delta": {"type": "citations_delta", "citation": {}}}
    assert parser.feed(ev("content_block_delta", delta)) == []
    assert (
        parser.feed(
            ev(
                "content_block_start",
                {"index": 3, "content_block": {"type": "server_tool_use", "id": "s", "name": "web_search"}},
            )
        )
        == []
    )
    assert not parser.finished


def test_data_only_events_are_dispatched_on_their_json_type() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    data = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}'
    assert parser.feed(ServerSentEvent(data=data)) == [Delta(text="x")]
    parser.feed(ServerSentEvent(data='{"type":"message_stop"}'))
    assert parser.finished


@pytest.mark.parametrize(
    ("error_type", "status"),
    [
        ("overloaded_error", 529),
        ("rate_limit_error", 429),
        ("api_error", 500),
        ("invalid_request_error", 400),
        ("authentication_error", 401),
        ("permission_error", 403),
        ("not_found_error", 404),
        ("request_too_large", 413),
        ("mystery_error", 500),
    ],
)
def test_error_event(error_type: str, status: int) -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    parser.feed(events(BASIC_RESPONSE)[0])
    event = ServerSentEvent(
        data=f'{{"type": "error", "error": {{"type": "{error_type}", "message": "Overloaded"}}}}', event="error"
    )
    with pytest.raises(UpstreamStatusError) as info:
        parser.feed(event)
    assert (info.value.status, info.value.type, info.value.message) == (status, error_type, "Overloaded")
    assert RetryConfig().retries(info.value) is (status == 429 or status >= 500)
    assert not parser.finished


def test_error_event_message_never_shows_the_key() -> None:
    parser = AnthropicTranslation(api_key="sk-ant-api03-SECRETSECRET").stream_parser(chat([USER]))
    event = ev("error", {"error": {"type": "api_error", "message": "bad key sk-ant-api03-SECRETSECRET"}})
    with pytest.raises(UpstreamStatusError) as info:
        parser.feed(event)
    assert "SECRET" not in info.value.message


@pytest.mark.parametrize(
    "event",
    [
        ServerSentEvent(data="{not json", event="content_block_delta"),
        ServerSentEvent(data="[1, 2]", event="message_start"),
        ServerSentEvent(data="", event="message_stop"),
        ev("message_start", {}),
        ev("message_start", {"message": {"usage": {"input_tokens": "11"}}}),
        ev("message_start", {"message": {"usage": [1]}}),
        ev("content_block_start", {"content_block": {"type": "text", "text": ""}}),
        ev("content_block_start", {"index": 0}),
        ev("content_block_start", {"index": True, "content_block": {"type": "text"}}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "name": "f"}}),
        ev("content_block_delta", {"index": 0}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta"}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": 5}}),
        ev("content_block_delta", {"index": 0, "delta": {"text": "x"}}),
        ev("content_block_delta", {"index": 4, "delta": {"type": "input_json_delta", "partial_json": "{"}}),
        ev("message_delta", {"usage": {"output_tokens": 3}}),
        ev("message_delta", {"delta": {"stop_reason": 7}}),
        ev("message_delta", {"delta": {}, "usage": {"output_tokens": -1}}),
        ev("error", {}),
        ev("error", {"error": "overloaded"}),
    ],
)
def test_malformed_data_is_a_protocol_error(event: ServerSentEvent) -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    with pytest.raises(UpstreamProtocolError) as info:
        parser.feed(event)
    assert info.value.message.startswith("upstream")
    assert RetryConfig().retries(info.value) is False


def test_a_tool_use_start_refused_as_malformed_leaves_no_block_behind() -> None:
    """
    With `skip_malformed_events` it is passed over; its block is not taken for a server tool's
    then, whose input is nothing of ours: its arguments are refused as a block never started.
    """
    parser = AnthropicStreamParser(keep_raw=False)
    with pytest.raises(UpstreamProtocolError):
        parser.feed(ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "name": "f"}}))
    with pytest.raises(UpstreamProtocolError, match="never started"):
        parser.feed(ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": "{"}}))


def test_a_message_delta_refused_as_malformed_counts_no_tokens() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    feed_all(parser, [ev("message_start", {"message": {"usage": {"input_tokens": 5, "output_tokens": 1}}})])
    with pytest.raises(UpstreamProtocolError):
        parser.feed(ev("message_delta", {"delta": {"stop_reason": 7}, "usage": {"output_tokens": 900}}))
    feed_all(parser, [ev("message_delta", {"delta": {"stop_reason": "end_turn"}})])
    [stop] = parser.feed(ev("message_stop"))
    assert stop.usage == Usage(prompt_tokens=5, completion_tokens=1)


# --------------------------------------------------------------------------------------------
# error_from_response


def test_error_from_anthropic_error_body() -> None:
    translation = AnthropicTranslation(api_key="sk-ant-api03-abcdefghijkl")
    body = (
        b'{"type":"error","error":{"type":"rate_limit_error",'
        b'"message":"Number of request tokens has exceeded your per-minute rate limit"}}'
    )
    error = translation.error_from_response(429, {"retry-after": "12.5", "x-request-id": "r"}, body)
    assert isinstance(error, UpstreamStatusError)
    assert (error.status, error.type, error.message, error.retry_after, RetryConfig().retries(error)) == (
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
        12.5,
        True,
    )


def test_error_from_response_retry_after_header_in_any_case_or_absent() -> None:
    translation = AnthropicTranslation(api_key=None)
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert translation.error_from_response(529, {"Retry-After": "3"}, body).retry_after == 3.0
    assert translation.error_from_response(529, {}, body).retry_after is None
    assert translation.error_from_response(529, {"retry-after": "soon"}, body).retry_after is None


def test_error_from_non_anthropic_body_is_generic_and_truncated() -> None:
    translation = AnthropicTranslation(api_key="sk-ant-api03-abcdefghijkl")
    html = b"<html>" + b"x" * 2000 + b"</html>"
    error = translation.error_from_response(502, {}, html)
    assert error.status == 502
    assert error.type == "upstream_error"
    assert error.message.startswith("upstream answered HTTP 502: <html>xxx")
    assert len(error.message) <= 500
    assert error.retry_after is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "upstream answered HTTP 401"),
        (b'{"detail": "nope"}', 'upstream answered HTTP 401: {"detail": "nope"}'),
        (
            b'{"type":"error","error":{"type":"authentication_error"}}',
            "upstream answered HTTP 401: " + '{"type":"error","error":{"type":"authentication_error"}}',
        ),
    ],
)
def test_error_from_other_shapes(body: bytes, expected: str) -> None:
    error = AnthropicTranslation(api_key=None).error_from_response(401, {}, body)
    assert (error.status, error.message) == (401, expected)
    assert error.type == "authentication_error"


def test_error_from_response_never_shows_the_key() -> None:
    key = "sk-ant-api03-abcdefghijkl"
    translation = AnthropicTranslation(api_key=key)
    body = orjson.dumps(
        {"type": "error", "error": {"type": "authentication_error", "message": f"invalid x-api-key {key}"}}
    )
    error = translation.error_from_response(401, {"x-api-key": key}, body)
    assert key not in error.message
    assert error.message.startswith("invalid x-api-key ")


# --------------------------------------------------------------------------------------------
# an Anthropic client: pass-through both ways


def native_chat(body: dict[str, Any], headers: dict[str, str] | None = None) -> ChatRequest:
    """An Anthropic client's request, as the Messages front hands it over."""
    native = NativeRequest("anthropic", body, headers or {})
    return replace(chat([USER]), native=native)


def test_an_anthropic_client_s_body_goes_up_whole_with_its_headers() -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}
        ],
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "a_field_from_next_year": {"x": [1, 2]},
        "stream": False,
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }
    translation = AnthropicTranslation(api_key="sk-ant-up", version="2000-01-01", extra_headers={"X-Org": "o"})
    request = translation.stream_request(native_chat(body, headers))
    assert orjson.loads(request.body) == {**body, "model": "claude-sonnet-4-5", "stream": True}
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == headers["anthropic-beta"]
    assert (request.headers["x-api-key"], request.headers["x-org"]) == ("sk-ant-up", "o")


def test_the_operator_s_headers_win_over_the_client_s() -> None:
    translation = AnthropicTranslation(api_key=None, extra_headers={"anthropic-beta": "only-this"})
    request = translation.stream_request(native_chat({"model": "m"}, {"anthropic-beta": "client-beta"}))
    assert request.headers["anthropic-beta"] == "only-this"


def test_the_routed_model_replaces_the_client_s() -> None:
    request = AnthropicTranslation(api_key=None).stream_request(native_chat({"model": "claude-haiku-4-5"}))
    assert orjson.loads(request.body)["model"] == "claude-sonnet-4-5"


def split_events(stream: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in stream.split(b"\n\n")[:-1]]


def test_every_event_keeps_its_exact_bytes_for_an_anthropic_client() -> None:
    stream = (FIXTURES / "thinking_citations_server_tool.sse").read_bytes()
    parser = AnthropicTranslation(api_key=None).stream_parser(native_chat({}))
    decoder = SSEDecoder()
    deltas = [delta for event in decoder.feed(stream) for delta in parser.feed(event)]
    assert b"".join(d.raw for d in deltas if d.raw is not None) == stream
    assert [d.raw for d in deltas if d.raw is not None] == split_events(stream)  # one delta per event
    assert parser.finished
    said = [(d.role, d.reasoning, d.text, d.finish_reason, d.usage) for d in deltas if d.says_anything]
    assert said == [
        ("assistant", "", "", None, None),
        (None, "The user asks about the weather.", "", None, None),
        (None, "", "", None, None),  # the signature
        (None, "", "It is sunny in Paris, 21 °C.", None, None),
        (None, "", "", "stop", None),
        (None, "", "", None, Usage(2048 + 1800, 77, cache_read_tokens=1800, cache_creation_tokens=0)),
    ]


def test_no_raw_bytes_for_an_openai_client() -> None:
    stream = (FIXTURES / "thinking_citations_server_tool.sse").read_bytes()
    parser = AnthropicTranslation(api_key=None).stream_parser(chat([USER]))
    deltas = [delta for event in SSEDecoder().feed(stream) for delta in parser.feed(event)]
    assert all(d.raw is None and d.says_anything for d in deltas)


def test_a_data_only_event_is_framed_without_a_name() -> None:
    parser = AnthropicStreamParser(keep_raw=True)
    [delta] = parser.feed(ServerSentEvent(data='{"type":"ping"}'))
    assert delta.raw == b'data: {"type":"ping"}\n\n'


def test_stop_sequence_is_carried() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    event = ev("message_delta", {"delta": {"stop_reason": "stop_sequence", "stop_sequence": "###"}})
    assert parser.feed(event) == [Delta(finish_reason="stop", stop_sequence="###")]


def test_count_tokens_for_an_anthropic_client_only() -> None:
    translation = AnthropicTranslation(api_key="sk-ant-up", base_url="http://gw.local/v1")
    body = {"model": "claude-haiku-4-5", "messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 1024}}
    request = translation.count_tokens_request(native_chat(body, {"anthropic-beta": "b1"}))
    assert request is not None
    assert request.url == "http://gw.local/v1/messages/count_tokens"
    assert orjson.loads(request.body) == {**body, "model": "claude-sonnet-4-5"}
    assert (request.headers["anthropic-beta"], request.headers["accept"]) == ("b1", "application/json")
    assert translation.count_tokens_request(chat([USER])) is None


def test_a_body_that_ends_after_the_stop_reason_is_complete_and_reports_its_usage() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    stream = [
        ev("message_start", {"message": {"role": "assistant", "usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
    ]
    feed_all(parser, stream)
    assert parser.end() == [Delta(usage=Usage(prompt_tokens=5, completion_tokens=2))]
    assert parser.finished is True


def test_a_body_that_ends_before_the_stop_reason_is_broken() -> None:
    parser = AnthropicStreamParser(keep_raw=False)
    feed_all(parser, [ev("message_start", {"message": {"role": "assistant"}})])
    with pytest.raises(UpstreamProtocolError, match="before a finish reason"):
        parser.end()


def test_a_prompt_too_long_is_a_context_length_error() -> None:
    body = (
        b'{"type":"error","error":{"type":"invalid_request_error",'
        b'"message":"prompt is too long: 210000 tokens > 200000 maximum"}}'
    )
    error = AnthropicTranslation(api_key=None).error_from_response(400, {}, body)
    assert isinstance(error, ContextLengthError)
    assert error.type == "invalid_request_error"


@pytest.mark.parametrize("base_url", ["http://gw.local", "http://gw.local/v1", "http://gw.local/v1/"])
def test_a_forwarded_request_goes_under_the_apis_root_with_the_providers_key(base_url: str) -> None:
    translation = AnthropicTranslation(base_url=base_url, api_key="sk-ant-k", extra_headers={"anthropic-beta": "b1"})

    assert translation.forward_url("/v1/messages/batches?limit=2") == "http://gw.local/v1/messages/batches?limit=2"
    assert translation.forward_headers({"x-custom": "1"}) == {
        "anthropic-version": "2023-06-01",
        "x-custom": "1",
        "x-api-key": "sk-ant-k",
        "anthropic-beta": "b1",
    }
    assert translation.forward_headers({"anthropic-version": "v9"})["anthropic-version"] == "v9"
