"""
Tests of request parsing: every 400 names its field, and the body is kept whole.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trioproxy._exceptions import RequestError
from trioproxy._request import (
    MAX_JSON_DEPTH,
    ChatRequest,
    content_text,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
    parse_json_object,
)

USER = {"role": "user", "content": "hi"}


def refused(body: dict[str, Any], **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body, **kwargs)
    error = info.value
    assert type(error) is RequestError
    assert error.status == 400
    assert error.type == "invalid_request_error"
    return error


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "sim/echo", "messages": [USER], **fields}


# --------------------------------------------------------------------------------------------
# parse_json_object


def test_json_object() -> None:
    assert parse_json_object(b'{"model": "m", "x": [1, 2]}') == {"model": "m", "x": [1, 2]}


@pytest.mark.parametrize("raw", [b"", b"{", b"model=m", b'{"a": 1} trailing'])
def test_not_json(raw: bytes) -> None:
    with pytest.raises(RequestError) as info:
        parse_json_object(raw)
    assert info.value.status == 400
    assert info.value.message.startswith("request body is not valid JSON: ")
    assert info.value.param is None


@pytest.mark.parametrize(
    ("raw", "offset"),
    [(b"\xff\xfe", 0), (b'{"content": "caf\xe9"}', 16), ('{"a": "\ud800"}'.encode("utf-8", "surrogatepass"), 7)],
)
def test_not_utf_8_names_the_first_bad_byte(raw: bytes, offset: int) -> None:
    """Not orjson's 'str is not valid UTF-8: surrogates not allowed', whatever the bad bytes."""
    with pytest.raises(RequestError) as info:
        parse_json_object(raw)
    assert info.value.message == f"request body is not valid UTF-8 (at byte {offset})"


def nested(depth: int) -> bytes:
    """An object whose `x` holds arrays inside arrays: `depth` levels, the object included."""
    return b'{"x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_a_body_nested_up_to_max_json_depth_is_accepted() -> None:
    body = parse_json_object(nested(MAX_JSON_DEPTH))
    assert orjson.loads(orjson.dumps(body)) == body  # and it can be serialised again, for the upstream


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1_000, 100_000])
def test_a_body_nested_deeper_than_max_json_depth_is_a_400_naming_the_limit(depth: int) -> None:
    with pytest.raises(RequestError) as info:
        parse_json_object(nested(depth))
    assert info.value.status == 400
    assert info.value.message == f"request body is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"


@pytest.mark.parametrize(("raw", "kind"), [(b"[1]", "list"), (b'"text"', "str"), (b"null", "NoneType"), (b"42", "int")])
def test_not_an_object(raw: bytes, kind: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_json_object(raw)
    assert info.value.status == 400
    assert info.value.message == f"request body must be a JSON object, not {kind}"


# --------------------------------------------------------------------------------------------
# parse_chat_request: what is accepted


def test_minimal_request() -> None:
    chat = parse_chat_request(body())
    assert chat == ChatRequest(
        body=body(), model="sim/echo", messages=[USER], stream=False, include_usage=False, max_tokens=None
    )
    assert chat.upstream_model == ""


def test_unknown_fields_kept_intact() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    raw = body(
        tools=tools,
        response_format={"type": "json_object"},
        vendor_knob={"nested": [1, None, True]},
        temperature=0.2,
    )
    chat = parse_chat_request(raw)
    assert chat.body is raw
    assert chat.body == {
        "model": "sim/echo",
        "messages": [USER],
        "tools": tools,
        "response_format": {"type": "json_object"},
        "vendor_knob": {"nested": [1, None, True]},
        "temperature": 0.2,
    }


def test_stream_and_usage() -> None:
    chat = parse_chat_request(body(stream=True, stream_options={"include_usage": True}))
    assert (chat.stream, chat.include_usage) == (True, True)
    chat = parse_chat_request(body(stream=True, stream_options={}))
    assert (chat.stream, chat.include_usage) == (True, False)
    chat = parse_chat_request(body(stream=None, stream_options=None))
    assert (chat.stream, chat.include_usage) == (False, False)


def test_max_tokens() -> None:
    assert parse_chat_request(body(max_tokens=7)).max_tokens == 7
    assert parse_chat_request(body(max_completion_tokens=9)).max_tokens == 9
    assert parse_chat_request(body(max_completion_tokens=9, max_tokens=7)).max_tokens == 9
    assert parse_chat_request(body(max_completion_tokens=None, max_tokens=7)).max_tokens == 7


def test_model_override() -> None:
    chat = parse_chat_request({"messages": [USER]}, model="local/gpt-x")
    assert chat.model == "local/gpt-x"
    chat = parse_chat_request(body(), model="local/gpt-x")
    assert chat.model == "local/gpt-x"


def test_routed() -> None:
    chat = parse_chat_request(body())
    routed = chat.routed("echo")
    assert routed.upstream_model == "echo"
    assert routed.model == "sim/echo"
    assert routed.body is chat.body
    assert chat.upstream_model == ""


def test_assistant_tool_call_message_needs_no_content() -> None:
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]
    assert parse_chat_request({"model": "m", "messages": messages}).messages == messages


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_role(role: str) -> None:
    assert parse_chat_request({"model": "m", "messages": [{"role": role, "content": "x"}]}).messages[0]["role"] == role


# --------------------------------------------------------------------------------------------
# parse_chat_request: every 400 names its field


@pytest.mark.parametrize("model", [None, "", 5, ["m"]])
def test_bad_model(model: Any) -> None:
    raw = body()
    if model is None:
        del raw["model"]
    else:
        raw["model"] = model
    error = refused(raw)
    assert error.param == "model"
    assert error.message == "'model' is required and must be a non-empty string"


@pytest.mark.parametrize("messages", [None, [], "hi", {"role": "user"}])
def test_bad_messages(messages: Any) -> None:
    raw = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    error = refused(raw)
    assert error.param == "messages"
    assert error.message == "'messages' is required and must be a non-empty array"


def test_message_not_an_object() -> None:
    error = refused({"model": "m", "messages": [USER, "hi"]})
    assert error.param == "messages[1]"
    assert error.message == "'messages[1]' must be an object"


@pytest.mark.parametrize("role", [None, "robot", 1, ["user"], {"user": 1}])
def test_bad_role(role: Any) -> None:
    message = {"content": "x"} if role is None else {"role": role, "content": "x"}
    error = refused({"model": "m", "messages": [USER, message]})
    assert error.param == "messages[1].role"
    assert error.message == (
        f"'messages[1].role' must be one of assistant, developer, function, system, tool, user, not {role!r}"
    )


def test_missing_content() -> None:
    error = refused({"model": "m", "messages": [{"role": "user"}]})
    assert error.param == "messages[0].content"
    assert error.message == "'messages[0].content' is required"


def test_assistant_without_content_or_tool_calls() -> None:
    error = refused({"model": "m", "messages": [USER, {"role": "assistant", "tool_calls": []}]})
    assert error.param == "messages[1].content"
    assert error.message == "'messages[1].content' is required"


@pytest.mark.parametrize("content", [5, {"type": "text", "text": "x"}, True])
def test_bad_content(content: Any) -> None:
    error = refused({"model": "m", "messages": [{"role": "user", "content": content}]})
    assert error.param == "messages[0].content"
    assert error.message == "'messages[0].content' must be a string or an array of content parts"


@pytest.mark.parametrize("stream", ["true", 1, 0, {}])
def test_bad_stream(stream: Any) -> None:
    error = refused(body(stream=stream))
    assert error.param == "stream"
    assert error.message == "'stream' must be a boolean"


@pytest.mark.parametrize("stream_options", [True, "usage", [{"include_usage": True}]])
def test_bad_stream_options(stream_options: Any) -> None:
    error = refused(body(stream=True, stream_options=stream_options))
    assert error.param == "stream_options"
    assert error.message == "'stream_options' must be an object"


@pytest.mark.parametrize("include_usage", ["yes", 1, None])
def test_bad_include_usage(include_usage: Any) -> None:
    error = refused(body(stream=True, stream_options={"include_usage": include_usage}))
    assert error.param == "stream_options.include_usage"
    assert error.message == "'stream_options.include_usage' must be a boolean"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -3, 1.5, "10", True])
def test_bad_max_tokens(name: str, value: Any) -> None:
    error = refused(body(**{name: value}))
    assert error.param == name
    assert error.message == f"'{name}' must be a positive integer"


# --------------------------------------------------------------------------------------------
# text of messages


def test_last_user_text_plain() -> None:
    chat = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "second"},
                {"role": "assistant", "content": "ok again"},
            ],
        }
    )
    assert chat.last_user_text == "second"


def test_last_user_text_content_parts() -> None:
    parts = [
        {"type": "text", "text": "look at "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this"},
        "stray",
        {"type": "text"},
    ]
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert chat.last_user_text == "look at this"


def test_last_user_text_ignores_non_string_text() -> None:
    parts = [{"type": "text", "text": 5}, {"type": "text", "text": ["a"]}, {"type": "text", "text": "ok"}]
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert chat.last_user_text == "ok"


def test_last_user_text_without_user_message() -> None:
    chat = parse_chat_request({"model": "m", "messages": [{"role": "system", "content": "x"}]})
    assert chat.last_user_text == ""


def test_content_text() -> None:
    assert content_text("abc") == "abc"
    assert content_text(None) == ""
    assert content_text(5) == ""
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"


def test_a_legacy_completion_keeps_its_body_whole_for_an_openai_compatible_upstream() -> None:
    body = {"model": "local/coder", "prompt": "def f(", "suffix": "):", "stream": True, "max_tokens": 9, "n": 2}
    chat = parse_completion_request(body)

    assert (chat.model, chat.stream, chat.max_tokens, chat.protocol) == ("local/coder", True, 9, "completions")
    assert chat.client_body is body
    assert chat.last_user_text == "def f("
    with pytest.raises(RequestError, match="OpenAI-compatible upstreams only"):
        chat.common_body()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": "x", "suffix": 3}, "suffix"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": "x", "best_of": 3, "stream": False}, "best_of"),
    ],
)
def test_a_bad_legacy_completion_names_its_field(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_completion_request(body)
    assert info.value.param == param


@pytest.mark.parametrize(("body", "param"), [({"input": "x"}, "model"), ({"model": "m", "input": []}, "input")])
def test_an_embeddings_request_names_a_missing_field(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_embedding_request(body)
    assert info.value.param == param


def test_several_choices_of_a_streamed_legacy_completion_go_up_as_asked() -> None:
    assert parse_completion_request({"model": "m", "prompt": "x", "n": 2, "stream": True}).client_body["n"] == 2


def test_an_embeddings_request_is_native() -> None:
    chat = parse_embedding_request({"model": "m", "input": ["a", "b"]})
    assert (chat.protocol, chat.stream, chat.last_user_text) == ("embeddings", False, "ab")
