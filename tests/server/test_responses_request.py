"""
Tests of reading an OpenAI Responses request into the common model: plain dicts, no sockets.

`tests/fixtures/responses/` holds whole requests shaped as Codex and the openai SDK send them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from trioproxy._exceptions import RequestError
from trioproxy._request import parse_chat_request
from trioproxy.providers.anthropic import messages_request_body
from trioproxy.server._responses_request import listed_input_items, parse_responses_request, to_chat_completions

FIXTURES = Path(__file__).parent.parent / "fixtures" / "responses"


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": "Hi", **fields}


def translate(**fields: Any) -> dict[str, Any]:
    return to_chat_completions(body(**fields))


def unportable(**fields: Any) -> RequestError:
    chat = parse_responses_request(body(**fields))
    with pytest.raises(RequestError) as info:
        chat.common_body()
    return info.value


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((FIXTURES / name).read_bytes())
    return loaded


# --------------------------------------------------------------------------------------------
# what every upstream needs


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"input": None}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": {"role": "user"}}, "input"),
        ({"stream": "yes"}, "stream"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": True}, "max_output_tokens"),
    ],
)
def test_what_every_upstream_needs_is_checked_up_front(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_responses_request({k: v for k, v in body(**fields).items() if v is not None})
    assert (info.value.param, info.value.status) == (param, 400)


def test_the_native_body_is_kept_whole_and_the_request_speaks_responses() -> None:
    sent = fixture("codex_request.json")
    chat = parse_responses_request(sent)
    assert chat.protocol == "responses"
    assert chat.native is not None
    assert chat.native.body is sent
    assert (chat.model, chat.stream, chat.max_tokens) == ("gpt-5-codex", True, None)


def test_a_translated_field_keeps_its_responses_name_for_a_refusal() -> None:
    chat = parse_responses_request({"model": "m", "input": "hi"})
    names = ("response_format", "reasoning_effort", "max_tokens", "temperature")
    assert [chat.client_name(name) for name in names] == [
        "text.format",
        "reasoning.effort",
        "max_output_tokens",
        "temperature",
    ]


# --------------------------------------------------------------------------------------------
# the translation


def test_a_string_input_and_instructions() -> None:
    out = translate(instructions="Be brief.", max_output_tokens=50, temperature=0.5, top_p=0.9)
    assert out["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (out["max_tokens"], out["temperature"], out["top_p"]) == (50, 0.5, 0.9)


def test_the_sdk_s_request_translates_field_by_field() -> None:
    out = to_chat_completions(fixture("sdk_create_request.json"))
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image, and the weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}},
            ],
        },
    ]
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "strict": True,
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    }
    assert (out["max_tokens"], out["reasoning_effort"], out["parallel_tool_calls"]) == (200, "low", True)
    for dropped in ("metadata", "store", "reasoning", "text", "input", "instructions"):
        assert dropped not in out
    assert parse_chat_request(out).stream is True  # a valid Chat Completions body


def test_codex_s_tool_turn_becomes_a_tool_call_and_its_result() -> None:
    out = to_chat_completions(fixture("codex_request.json"))
    assert out["messages"] == [
        {"role": "system", "content": "You are Codex, a coding agent."},
        {"role": "user", "content": "fix the test"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a1",
                    "type": "function",
                    "function": {"name": "shell", "arguments": '{"command":["pytest"]}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a1", "content": "1 failed"},
    ]
    assert out["tool_choice"] == "auto"
    assert out["prompt_cache_key"] == "5f1c2a7e-0000-4000-8000-000000000001"
    assert "include" not in out
    assert "store" not in out
    parse_chat_request(out)


def test_consecutive_function_calls_join_the_assistant_message_before_them() -> None:
    out = translate(
        input=[
            {"role": "user", "content": "weather?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"A"}'},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city":"B"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        ]
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "tool"]
    assistant = out["messages"][1]
    assert assistant["content"] == "Looking."
    assert [call["id"] for call in assistant["tool_calls"]] == ["c1", "c2"]


def test_images_a_tool_returned_follow_the_tool_messages() -> None:
    image = {"type": "input_image", "image_url": "https://example.test/a.png"}
    out = translate(
        input=[
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "shot", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "one"}, image]},
            {"type": "function_call_output", "call_id": "c2", "output": "two"},
            {"role": "user", "content": "and?"},
        ]
    )
    assert [m["role"] for m in out["messages"]] == ["assistant", "tool", "tool", "user", "user"]
    assert out["messages"][1]["content"] == "one"
    assert out["messages"][3]["content"] == [{"type": "image_url", "image_url": {"url": "https://example.test/a.png"}}]


def test_reasoning_items_and_output_only_fields_are_dropped() -> None:
    out = translate(
        input=[{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}, {"role": "user", "content": "Hi"}],
        include=["reasoning.encrypted_content"],
        store=False,
        metadata={"a": "b"},
        truncation="auto",
        stream_options={"include_obfuscation": False},
        background=True,
        reasoning={"summary": "auto"},
    )
    assert out == {"model": "gpt-test", "stream": False, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("format_", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
    ],
)
def test_text_formats(format_: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert translate(text={"format": format_, "verbosity": "low"}).get("response_format") == expected
    assert translate(text={"verbosity": "low"})["verbosity"] == "low"


def test_hosted_tools_are_dropped_and_a_namespace_s_functions_flattened() -> None:
    function = {"type": "function", "name": "close_agent", "parameters": {"type": "object"}}
    out = translate(
        tools=[
            {"type": "web_search", "external_web_access": False},
            {"type": "web_search_preview_2025_03_11"},
            {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [function]},
        ]
    )
    assert out["tools"] == [{"type": "function", "function": {"name": "close_agent", "parameters": {"type": "object"}}}]
    assert "tools" not in translate(tools=[{"type": "web_search"}])


# --------------------------------------------------------------------------------------------
# what the common model cannot carry


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "f", "defer": True}]}, "tools[0].defer"),
        ({"tools": [{"type": "local_shell"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "namespace", "name": "n", "tools": [{"type": "custom", "name": "x"}]}]},
            "tools[0].tools[0].type",
        ),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice.type"),
        ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input[0].type"),
        ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "local_shell_call", "call_id": "c"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
            "input[0].content[0].image_url",
        ),
        ({"reasoning": {"effort": "low", "budget": 3}}, "reasoning.budget"),
    ],
)
def test_what_cannot_be_carried_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    error = unportable(**fields)
    assert (error.param, error.status) == (param, 400)
    assert "Responses upstreams only" in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),  # unhashable: no set lookup
        ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),
        ({"text": {"format": [{"type": "text"}]}}, "text.format"),
        ({"text": {"format": "json_object"}}, "text.format"),
        ({"instructions": ["a"]}, "instructions"),
    ],
)
def test_a_malformed_request_is_a_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    assert unportable(**fields).param == param


def test_a_provider_s_drop_params_drops_a_top_level_field_another_upstream_has_no_equivalent_for() -> None:
    chat = parse_responses_request(body(top_logprobs=3, max_tool_calls=5, temperature=0.5))
    with pytest.raises(RequestError) as info:
        chat.common_body()
    assert info.value.param == "top_logprobs"
    with pytest.raises(RequestError) as info:
        chat.common_body(frozenset({"top_logprobs"}))
    assert info.value.param == "max_tool_calls"
    for drop_params in (True, frozenset({"top_logprobs", "max_tool_calls"})):
        common = chat.common_body(drop_params)
        assert common["temperature"] == 0.5
        assert not {"top_logprobs", "max_tool_calls"} & set(common)
    with pytest.raises(RequestError) as info:  # a tool the client runs in another shape is no field to drop
        parse_responses_request(body(tools=[{"type": "local_shell"}])).common_body(True)
    assert info.value.param == "tools[0].type"


def test_the_recorded_codex_request_reaches_a_chat_completions_upstream() -> None:
    sent = fixture("codex_0.171.0_request.json")
    out = parse_responses_request(sent).common_body()
    assert [m["role"] for m in out["messages"]] == ["developer", "developer", "user", "user"]
    names = [tool["function"]["name"] for tool in out["tools"]]
    assert "exec_command" in names
    assert "close_agent" in names  # a namespace's functions, flattened
    assert len(names) == len(set(names))
    assert "client_metadata" not in out
    assert "include" not in out
    parse_chat_request(out)


@pytest.mark.parametrize("name", ["codex_request.json", "codex_0.171.0_request.json"])
def test_what_codex_always_sends_is_never_refused_by_an_anthropic_upstream(name: str) -> None:
    """`prompt_cache_key`, `parallel_tool_calls`, `tool_choice`, `store`, `include`: translated or hints."""
    chat = parse_responses_request(fixture(name)).routed("claude")
    body = messages_request_body(chat, default_max_tokens=32000)
    assert body["tools"]
    assert "prompt_cache_key" not in body


def test_input_items_are_listed_with_ids_whatever_their_type() -> None:
    """An item a Responses upstream took as it was sent may have any `type`: its listing never fails."""
    items = listed_input_items("resp_1", ["Hi", {"type": ["x"]}, {"type": {}}, {"role": "user", "content": "Hi"}])
    assert [item["id"] for item in items] == ["msg_1_0", "item_1_1", "item_1_2", "msg_1_3"]
