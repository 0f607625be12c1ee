"""
Tests of reading an Anthropic Messages request into the common model: plain dicts, no sockets.

`tests/fixtures/anthropic/` holds whole requests shaped as Claude Code and the anthropic SDK
send them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from trioproxy._exceptions import RequestError
from trioproxy.providers.responses import responses_request_body
from trioproxy.server._anthropic_request import parse_messages_request, to_chat_completions

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
USER = {"role": "user", "content": "Hi"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [USER], **fields}


def translate(**fields: Any) -> dict[str, Any]:
    return to_chat_completions(body(**fields))


def unportable(**fields: Any) -> RequestError:
    chat = parse_messages_request(body(**fields), {})
    with pytest.raises(RequestError) as info:
        chat.common_body()
    return info.value


# --------------------------------------------------------------------------------------------
# what every upstream needs


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_what_anthropic_requires_is_checked_for_every_upstream(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_messages_request({k: v for k, v in body(**fields).items() if v is not None}, {})
    assert info.value.param == param
    assert info.value.status == 400
    assert f"'{param}'" in info.value.message


def test_the_request_keeps_its_native_form_and_the_protocol_headers() -> None:
    sent = body(stream=True, thinking={"type": "enabled", "budget_tokens": 1024})
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "a,b", "x-api-key": "client-key"}
    chat = parse_messages_request(sent, headers)
    assert chat.native is not None
    assert (chat.protocol, chat.native.body, chat.client_body) == ("anthropic", sent, sent)
    assert chat.native.headers == {"anthropic-version": "2023-06-01", "anthropic-beta": "a,b"}
    assert (chat.model, chat.stream, chat.max_tokens) == ("claude-haiku-4-5", True, 100)
    assert chat.common_body()["messages"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("name", ["anthropic-version", "anthropic-beta"])
def test_a_protocol_header_that_is_not_ascii_is_a_400_naming_it(name: str) -> None:
    """HTTP hands its value over as Latin-1: it could never reach an upstream, whose headers are ASCII."""
    with pytest.raises(RequestError, match=f"'{name}' header") as info:
        parse_messages_request(body(), {name: "2023-06-01\x80"})
    assert info.value.status == 400


def test_an_unportable_field_does_not_refuse_the_request_itself() -> None:
    chat = parse_messages_request(body(container="container_01"), {})
    assert chat.native is not None
    assert chat.native.body["container"] == "container_01"
    with pytest.raises(RequestError) as info:
        chat.common_body()
    assert info.value.param == "container"
    assert "Anthropic upstreams only" in info.value.message


def test_a_provider_s_drop_params_drops_a_top_level_field_another_upstream_has_no_equivalent_for() -> None:
    chat = parse_messages_request(body(container="c", mcp_servers=[], temperature=0.5), {})
    with pytest.raises(RequestError) as info:
        chat.common_body(frozenset({"container"}))
    assert info.value.param == "mcp_servers"
    for drop_params in (True, frozenset({"container", "mcp_servers"})):
        common = chat.common_body(drop_params)
        assert (common["temperature"], common["messages"]) == (0.5, [{"role": "user", "content": "Hi"}])
        assert not {"container", "mcp_servers"} & set(common)


def test_drop_params_drops_no_block_and_no_field_within_another() -> None:
    """Only a top-level field can be dropped: what is inside the conversation or a setting is its meaning."""
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    for fields in ({"messages": [{"role": "user", "content": [document]}]}, {"metadata": {"tier": "gold"}}):
        with pytest.raises(RequestError):
            parse_messages_request(body(**fields), {}).common_body(True)


# --------------------------------------------------------------------------------------------
# the translation


def recorded(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A recorded request's body and headers (see `tests/fixtures/anthropic/README.md`)."""
    request = orjson.loads((FIXTURES / name).read_bytes())
    return request["body"], {k.lower(): v for k, v in request["headers"].items()}


@pytest.mark.parametrize(
    "name",
    [
        "claude_code_request.json",
        "claude_code_tool_result_request.json",
        "claude_code_nonstream_retry_request.json",
        "sdk_messages_create_request.json",
        "sdk_messages_stream_request.json",
    ],
)
def test_every_recorded_client_request_can_go_to_any_upstream(name: str) -> None:
    sent, headers = recorded(name)
    chat = parse_messages_request(sent, headers)
    assert chat.native is not None
    assert chat.native.body == sent
    assert chat.native.headers["anthropic-version"] == headers["anthropic-version"]
    body = chat.common_body()  # nothing refused
    assert body["max_tokens"] == sent["max_tokens"]
    assert body["messages"][0]["role"] == "system"
    assert not {"thinking", "context_management", "output_config"} & set(body)


def test_claude_code_s_first_turn() -> None:
    sent, headers = recorded("claude_code_request.json")
    assert "claude-code-20250219" in parse_messages_request(sent, headers).native.headers["anthropic-beta"]  # type: ignore[union-attr]
    out = to_chat_completions(sent)
    system, user, inner_system = out["messages"]
    assert system == {"role": "system", "content": "\n\n".join(block["text"] for block in sent["system"])}
    assert user["role"] == "user"
    assert [part["text"] for part in user["content"]] == [block["text"] for block in sent["messages"][0]["content"]]
    assert inner_system["role"] == "system"  # Claude Code's system message inside `messages`, in place
    assert [tool["function"]["name"] for tool in out["tools"]] == [tool["name"] for tool in sent["tools"]]
    deferred = next(tool for tool in sent["tools"] if tool.get("defer_loading"))
    assert {
        "type": "function",
        "function": {
            k if k != "input_schema" else "parameters": v for k, v in deferred.items() if k != "defer_loading"
        },
    } in out["tools"]
    assert out["user"] == sent["metadata"]["user_id"]


def test_claude_code_s_tool_result_turn() -> None:
    sent, _ = recorded("claude_code_tool_result_request.json")
    out = to_chat_completions(sent)
    assistant, tool = out["messages"][-2:]
    [text, tool_use] = [block for block in sent["messages"][-2]["content"] if block["type"] != "thinking"]
    assert assistant == {
        "role": "assistant",
        "content": text["text"],
        "tool_calls": [
            {
                "id": tool_use["id"],
                "type": "function",
                "function": {"name": tool_use["name"], "arguments": orjson.dumps(tool_use["input"]).decode()},
            }
        ],
    }
    [result] = sent["messages"][-1]["content"]
    assert result["is_error"] is True
    assert tool == {"role": "tool", "tool_call_id": result["tool_use_id"], "content": "Error: " + result["content"]}


def test_the_sdk_s_request() -> None:
    sent, _ = recorded("sdk_messages_create_request.json")
    out = to_chat_completions(sent)
    image, text = sent["messages"][0]["content"]
    assert out["messages"] == [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image['source']['data']}"}},
                {"type": "text", "text": text["text"]},
            ],
        },
    ]
    assert (out["stop"], out["user"], out["tool_choice"]) == (["\n\nHuman:"], "user-123", "auto")
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "parameters": sent["tools"][0]["input_schema"],
            },
        }
    ]


def test_a_system_message_inside_messages_stays_in_place() -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        USER,
        {"role": "system", "content": "Now be kind."},
    ]
    out = translate(system="Top.", messages=messages)
    assert out["messages"] == [
        {"role": "system", "content": "Top."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Now be kind."},
    ]


def test_images() -> None:
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What are these?"},
    ]
    [message] = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert message["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What are these?"},
    ]


def test_tool_results_with_errors_and_images() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}}
    content = [
        {"type": "tool_result", "tool_use_id": "t1", "content": "no such file", "is_error": True},
        {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "shot:"}, image]},
        {"type": "tool_result", "tool_use_id": "t3"},
    ]
    assert translate(messages=[{"role": "user", "content": content}])["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": "Error: no such file"},
        {"role": "tool", "tool_call_id": "t2", "content": "shot:"},
        {"role": "tool", "tool_call_id": "t3", "content": ""},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]},
    ]


def test_an_assistant_turn_of_only_tool_calls_has_no_content() -> None:
    content = [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]
    [_, message] = translate(messages=[USER, {"role": "assistant", "content": content}])["messages"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out = translate(tool_choice=choice)
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected


def test_sampling_and_stop_fields() -> None:
    out = translate(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["###"], metadata={"user_id": "u1"})
    assert {k: out[k] for k in ("temperature", "top_p", "top_k", "stop", "user")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["###"],
        "user": "u1",
    }


def test_hints_that_do_not_change_the_answer_are_dropped() -> None:
    out = translate(
        thinking={"type": "enabled", "budget_tokens": 2048},
        context_management={"edits": []},
        service_tier="auto",
        speed="fast",
        diagnostics={"previous_message_id": "msg_1"},
        user_profile_id="up_1",
        workspace_id="wrkspc_1",
        cache_control={"type": "ephemeral"},
        output_config={"effort": "high"},
        system=[{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
        tools=[
            {
                "name": "f",
                "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"},
                "eager_input_streaming": True,
            }
        ],
        messages=[
            USER,
            {
                "role": "assistant",
                "content": [
                    {"type": "redacted_thinking", "data": "EmwKAhgB"},
                    {"type": "text", "text": "Yes.", "citations": [{"type": "char_location", "cited_text": "x"}]},
                ],
            },
        ],
    )
    assert out["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yes."},
    ]
    assert out["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert set(out) == {"model", "max_tokens", "stream", "messages", "tools"}


def test_an_output_schema_is_a_response_format() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    out = translate(output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}})
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def test_trioproxy_s_own_simulate_field_is_carried() -> None:
    assert translate(simulate={"ttft_ms": 5})["simulate"] == {"ttft_ms": 5}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"container": "c"}, "container"),
        ({"mcp_servers": []}, "mcp_servers"),
        ({"a_field_from_next_year": 1}, "a_field_from_next_year"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "f", "input_schema": {}, "input_examples": [{}]}]}, "tools[0].input_examples"),
        ({"metadata": {"user_id": "u", "x": 1}}, "metadata.x"),
        ({"output_config": {"task_budget": 1}}, "output_config.task_budget"),
        ({"inference_geo": "eu"}, "inference_geo"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "toolset_name": "t"}]}]},
            "messages[0].content[0].toolset_name",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "t", "name": "f", "input": {}, "caller": {"type": "direct"}}
                        ],
                    },
                ]
            },
            "messages[1].content[0].caller",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "d"}}]}
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}
                ]
            },
            "messages[0].content[0].source.type",
        ),
        (
            {"messages": [USER, {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]}]},
            "messages[1].content[0].type",
        ),
    ],
)
def test_what_the_common_model_cannot_carry_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    error = unportable(**fields)
    assert error.param == param
    assert error.status == 400


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": ["x"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
        ({"system": [{"type": "image"}]}, "system[0]"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"stop_sequences": "###"}, "stop_sequences"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
    ],
)
def test_malformed_parts_are_named_too(fields: dict[str, Any], param: str) -> None:
    assert unportable(**fields).param == param


def test_a_count_tokens_request_has_no_max_tokens() -> None:
    sent = {"model": "claude-haiku-4-5", "messages": [USER]}
    chat = parse_messages_request(sent, {}, counting=True)
    assert chat.native is not None
    assert chat.native.body == sent
    assert "max_tokens" not in chat.common_body()


@pytest.mark.parametrize(
    "name",
    ["claude_code_request.json", "claude_code_tool_result_request.json", "claude_code_nonstream_retry_request.json"],
)
def test_what_claude_code_always_sends_is_never_refused_by_a_responses_upstream(name: str) -> None:
    sent, headers = recorded(name)
    body = responses_request_body(parse_messages_request(sent, headers).routed("gpt"))
    assert body["input"]
    assert body["tools"]
