"""
Tests of the OpenAI-compatible translation: plain dicts and bytes, no sockets.

Chunks are in the shapes of `/work/shared/sse_protocol.md` §4.3.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest

from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import ContextLengthError, RequestError, UpstreamProtocolError, UpstreamStatusError
from trioproxy._policy import RetryConfig
from trioproxy._request import (
    ChatRequest,
    NativeRequest,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
)
from trioproxy._sse import ServerSentEvent
from trioproxy.providers._base import MAX_ERROR_MESSAGE
from trioproxy.providers.openai import OpenAIStreamParser, OpenAITranslation, delta_from_text_completion

KEY = "sk-proj-TopSecretKey0123456789"
URL = "http://127.0.0.1:9000/v1"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def chat(**fields: Any) -> ChatRequest:
    body = {"model": "local/gpt-x", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(body).routed("gpt-x")


def translation(**kwargs: Any) -> OpenAITranslation:
    return OpenAITranslation(base_url=URL, **kwargs)


def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
    return orjson.dumps(
        {
            "id": "chatcmpl-123",
            "object": "chat.completion.chunk",
            "created": 1694268190,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_44709d6fcb",
            "choices": choices,
            **extra,
        }
    ).decode()


def feed(parser: OpenAIStreamParser, data: str) -> list[Delta]:
    return parser.feed(ServerSentEvent(data=data))


def event(data: str) -> bytes:
    """The SSE event that carried `data`: what `Delta.raw` holds."""
    return b"data: " + data.encode() + b"\n\n"


def parse_one(data: str) -> Delta:
    [delta] = feed(OpenAIStreamParser(keep_raw=True), data)
    return delta


# --------------------------------------------------------------------------------------------
# requests


def test_stream_request_forwards_unknown_fields() -> None:
    request = translation(api_key=KEY).stream_request(
        chat(
            tools=TOOLS,
            tool_choice="auto",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            vendor_extension={"top_k": 40, "repetition_penalty": 1.1},
            temperature=0.5,
        )
    )
    assert request.url == "http://127.0.0.1:9000/v1/chat/completions"
    assert orjson.loads(request.body) == {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": TOOLS,
        "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "vendor_extension": {"top_k": 40, "repetition_penalty": 1.1},
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert dict(request.headers) == {
        "content-type": "application/json",
        "authorization": f"Bearer {KEY}",
        "accept": "text/event-stream",
    }


def test_stream_request_does_not_touch_the_client_body() -> None:
    c = chat(stream=False, stream_options={"include_usage": False, "x": 1})
    before = orjson.dumps(c.body)
    body = orjson.loads(translation().stream_request(c).body)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "x": 1}
    assert orjson.dumps(c.body) == before


def test_stream_request_without_request_usage_keeps_client_choice() -> None:
    t = translation(request_usage=False)
    assert "stream_options" not in orjson.loads(t.stream_request(chat(stream=True)).body)
    body = orjson.loads(t.stream_request(chat(stream=True, stream_options={"include_usage": True})).body)
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-x"


def test_no_authorization_without_key() -> None:
    for t in (translation(), translation(api_key=None), translation(api_key="")):
        request = t.stream_request(chat())
        assert dict(request.headers) == {"content-type": "application/json", "accept": "text/event-stream"}


def test_base_url_trailing_slash_and_extra_headers() -> None:
    t = OpenAITranslation(base_url=URL + "/", api_key=KEY, extra_headers={"X-Org": "acme"})
    request = t.stream_request(chat())
    assert request.url == "http://127.0.0.1:9000/v1/chat/completions"
    assert request.headers["x-org"] == "acme"


# --------------------------------------------------------------------------------------------
# the stream parser


def test_role_chunk() -> None:
    data = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
    assert parse_one(data) == Delta(text="", role="assistant", raw=event(data))


def test_content_chunks() -> None:
    parser = OpenAIStreamParser(keep_raw=True)
    datas = [
        chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}], usage=None)
        for text in ("Hello", ", wörld", " 👋")
    ]
    deltas = [d for data in datas for d in feed(parser, data)]
    assert deltas == [
        Delta(text="Hello", raw=event(datas[0])),
        Delta(text=", wörld", raw=event(datas[1])),
        Delta(text=" 👋", raw=event(datas[2])),
    ]
    assert not parser.finished


def test_tool_call_fragments() -> None:
    first = chunk(
        [
            {
                "index": 0,
                "delta": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_abc",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ],
                },
                "finish_reason": None,
            }
        ]
    )
    second = chunk(
        [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
                "finish_reason": None,
            }
        ]
    )
    third = chunk(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 0, "function": {"arguments": '"Paris"}'}},
                        {"index": 1, "id": "call_def", "function": {"name": "f"}},
                    ]
                },
                "finish_reason": None,
            }
        ]
    )
    parser = OpenAIStreamParser(keep_raw=True)
    assert feed(parser, first) == [
        Delta(
            role="assistant",
            tool_calls=(ToolCallDelta(index=0, id="call_abc", name="get_weather", arguments=""),),
            raw=event(first),
        )
    ]
    assert feed(parser, second) == [
        Delta(tool_calls=(ToolCallDelta(index=0, arguments='{"city":'),), raw=event(second))
    ]
    assert feed(parser, third) == [
        Delta(
            tool_calls=(ToolCallDelta(index=0, arguments='"Paris"}'), ToolCallDelta(index=1, id="call_def", name="f")),
            raw=event(third),
        )
    ]


def test_finish_chunk() -> None:
    data = chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], usage=None)
    assert parse_one(data) == Delta(finish_reason="stop", raw=event(data))
    data = chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])
    assert parse_one(data) == Delta(finish_reason="tool_calls", raw=event(data))


def test_usage_chunk() -> None:
    data = chunk(
        [],
        usage={
            "prompt_tokens": 9,
            "completion_tokens": 2,
            "total_tokens": 11,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    )
    assert parse_one(data) == Delta(usage=Usage(prompt_tokens=9, completion_tokens=2), raw=event(data))


def test_usage_on_finish_chunk() -> None:
    data = chunk(
        [{"index": 0, "delta": {}, "finish_reason": "length"}],
        usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    )
    assert parse_one(data) == Delta(
        finish_reason="length", usage=Usage(prompt_tokens=3, completion_tokens=4), raw=event(data)
    )


def test_raw_is_the_exact_data_bytes() -> None:
    # spacing, key order and vendor fields as the upstream wrote them
    data = (
        '{"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",'
        '  "choices": [{"index": 0, "delta": {"content": "é", "reasoning_content": "hmm"},'
        ' "logprobs": {"content": []}, "finish_reason": null}], "x_vendor": true}'
    )
    delta = parse_one(data)
    assert delta.raw == b"data: " + data.encode("utf-8") + b"\n\n"
    assert (delta.text, delta.reasoning) == ("é", "hmm")


def test_reasoning_stop_string_and_cached_tokens() -> None:
    assert parse_one(chunk([{"index": 0, "delta": {"reasoning": "so"}}])).reasoning == "so"
    stopped = parse_one(chunk([{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]))
    assert (stopped.finish_reason, stopped.stop_sequence) == ("stop", "END")
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 8}}
    assert parse_one(chunk([], usage=usage)).usage == Usage(10, 2, cache_read_tokens=8)


def test_raw_is_kept_only_for_an_openai_client() -> None:
    data = chunk([{"index": 0, "delta": {"content": "a"}}])
    anthropic_client = replace(chat(), native=NativeRequest("anthropic", {}))
    [kept] = feed(translation().stream_parser(chat()), data)
    [dropped] = feed(translation().stream_parser(anthropic_client), data)
    assert (kept.raw, dropped.raw, dropped.text) == (event(data), None, "a")


def test_a_field_the_common_model_cannot_carry_refuses_the_request() -> None:
    unportable = RequestError("'thinking' cannot go there", param="thinking")
    request = replace(chat(), native=NativeRequest("anthropic", {}, unportable=unportable))
    with pytest.raises(RequestError) as info:
        translation().stream_request(request)
    assert (info.value.message, info.value.param) == ("'thinking' cannot go there", "thinking")


def test_done_finishes() -> None:
    parser = OpenAIStreamParser(keep_raw=True)
    assert parser.finished is False
    assert feed(parser, "[DONE]") == []
    assert parser.finished is True
    # nothing after the end marker counts, not even garbage
    assert feed(parser, "not json") == []
    assert feed(parser, chunk([{"index": 0, "delta": {"content": "late"}}])) == []


def test_other_choices_stay_in_raw() -> None:
    data = chunk([{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}])
    assert parse_one(data) == Delta(text="a", raw=event(data))


def test_in_stream_error_openai_shape() -> None:
    data = orjson.dumps(
        {"error": {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}}
    ).decode()
    with pytest.raises(UpstreamStatusError) as info:
        feed(OpenAIStreamParser(keep_raw=True), data)
    error = info.value
    assert (error.message, error.status, error.type, error.code, RetryConfig().retries(error)) == (
        "The server had an error.",
        502,
        "server_error",
        None,
        True,
    )


def test_in_stream_error_with_status_code_and_string_code() -> None:
    with pytest.raises(UpstreamStatusError) as info:
        feed(OpenAIStreamParser(keep_raw=True), '{"error": {"message": "slow down", "code": 429}}')
    assert (info.value.status, info.value.type, info.value.code, RetryConfig().retries(info.value)) == (
        429,
        "upstream_error",
        None,
        True,
    )
    with pytest.raises(UpstreamStatusError) as info:
        feed(
            OpenAIStreamParser(keep_raw=True),
            '{"error": {"message": "ctx", "type": "invalid_request_error", "code": "too_long"}}',
        )
    assert (info.value.status, info.value.type, info.value.code) == (502, "invalid_request_error", "too_long")


def test_in_stream_error_as_string() -> None:
    with pytest.raises(UpstreamStatusError) as info:
        feed(OpenAIStreamParser(keep_raw=True), '{"error": "model crashed"}')
    assert (info.value.message, info.value.status, info.value.type) == ("model crashed", 502, "upstream_error")


def test_in_stream_error_masks_the_key() -> None:
    parser = translation(api_key="plain-local-key-777").stream_parser(chat())
    with pytest.raises(UpstreamStatusError) as info:
        feed(parser, '{"error": {"message": "key plain-local-key-777 was revoked"}}')
    assert info.value.message == "key *** was revoked"
    with pytest.raises(UpstreamStatusError) as info:
        feed(OpenAIStreamParser(keep_raw=True), '{"error": {"message": "bad key sk-abcdefghijklmnop"}}')
    assert info.value.message == "bad key sk-ab***"


@pytest.mark.parametrize("data", ["hello", "", '{"choices": [', "data: {}"])
def test_non_json_is_a_protocol_error(data: str) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        feed(OpenAIStreamParser(keep_raw=True), data)
    assert info.value.message == f"upstream sent a chunk that is not JSON: {data[:200]!r}"
    assert RetryConfig().retries(info.value) is False


@pytest.mark.parametrize("data", ["[1, 2]", '"text"', "42", "null"])
def test_non_object_is_a_protocol_error(data: str) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        feed(OpenAIStreamParser(keep_raw=True), data)
    assert info.value.message == f"upstream sent a chunk that is not a JSON object: {data!r}"


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ("x", "upstream chunk has a malformed 'choices' array"),
        ([1], "upstream chunk has a malformed 'choices' array"),
        ([{"index": 0, "delta": "hi"}], "upstream chunk has a malformed 'delta'"),
        ([{"index": 0, "delta": {"tool_calls": ["x"]}}], "upstream chunk has a malformed tool call"),
        ([{"index": 0, "delta": {"tool_calls": 5}}], "upstream chunk has a malformed 'tool_calls' array"),
        ([{"index": 0, "delta": {"tool_calls": {"index": 0}}}], "upstream chunk has a malformed 'tool_calls' array"),
        ([{"index": 0, "delta": {"tool_calls": [{"index": "0"}]}}], "upstream chunk has a malformed tool call"),
        (
            [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "f"}]}}],
            "upstream chunk has a malformed tool call",
        ),
    ],
)
def test_malformed_chunk(choices: Any, message: str) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        feed(OpenAIStreamParser(keep_raw=True), chunk(choices))
    assert info.value.message == message


@pytest.mark.parametrize(
    ("choice", "field"),
    [
        ({"index": 0, "delta": {}, "finish_reason": {"type": "stop"}}, "finish_reason"),
        ({"index": 0, "delta": {"role": 1}}, "role"),
        ({"index": 0, "delta": {"content": ["lost"]}}, "content"),
        ({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": 5}]}}, "id"),
        ({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": ["f"]}}]}}, "name"),
        ({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": {"a": 1}}}]}}, "arguments"),
    ],
)
def test_a_field_that_is_not_a_string_is_a_protocol_error(choice: dict[str, Any], field: str) -> None:
    """Passed on, it would crash a renderer (`TypeError`) or its text would be lost without a word."""
    with pytest.raises(UpstreamProtocolError) as info:
        feed(OpenAIStreamParser(keep_raw=True), chunk([choice]))
    assert info.value.message.startswith(f"upstream chunk has a non-string {field!r}")


@pytest.mark.parametrize("choice", [{"index": 0, "text": 5}, {"index": 0, "text": "", "finish_reason": ["stop"]}])
def test_a_text_completion_field_that_is_not_a_string_is_a_protocol_error(choice: dict[str, Any]) -> None:
    parser = OpenAIStreamParser(keep_raw=True, read=delta_from_text_completion)
    with pytest.raises(UpstreamProtocolError):
        feed(parser, chunk([choice]))


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "9", "completion_tokens": 2},
        {"prompt_tokens": -9, "completion_tokens": 2},
        {"prompt_tokens": 9, "completion_tokens": True},
        {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -1}},
    ],
)
def test_malformed_usage(usage: dict[str, Any]) -> None:
    """A negative count would hand tokens back to the client's budget."""
    with pytest.raises(UpstreamProtocolError) as info:
        feed(OpenAIStreamParser(keep_raw=True), chunk([], usage=usage))
    assert info.value.message.startswith("upstream usage has token counts that are not whole and non-negative")


# --------------------------------------------------------------------------------------------
# error responses


def error_from(
    body: bytes, status: int = 400, headers: dict[str, str] | None = None, key: str | None = KEY
) -> UpstreamStatusError:
    return translation(api_key=key).error_from_response(status, headers or {}, body)


def test_error_openai_shape() -> None:
    body = orjson.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    )
    error = error_from(body)
    assert (error.message, error.status, error.type, error.code, error.retry_after, RetryConfig().retries(error)) == (
        "This model's maximum context length is 128000 tokens.",
        400,
        "invalid_request_error",
        "context_length_exceeded",
        None,
        False,
    )


def test_error_detail_shape() -> None:  # vLLM / FastAPI
    error = error_from(b'{"detail": "Not Found"}', status=404)
    assert (error.message, error.status, error.type, error.code) == ("Not Found", 404, "not_found_error", None)
    error = error_from(b'{"detail": [{"loc": ["body", "model"], "msg": "field required"}]}', status=422)
    assert error.message == '[{"loc":["body","model"],"msg":"field required"}]'
    assert error.type == "invalid_request_error"


def test_error_vllm_flat_shape() -> None:
    error = error_from(
        b'{"object": "error", "message": "model x does not exist", "type": "NotFoundError", '
        b'"param": null, "code": 404}',
        status=404,
    )
    assert (error.message, error.type, error.code) == ("model x does not exist", "NotFoundError", None)


def test_error_string_shape() -> None:  # llama.cpp, Ollama
    error = error_from(b'{"error": "model \\"llama3\\" not found, try pulling it first"}', status=404)
    assert (error.message, error.status, error.type, error.code) == (
        'model "llama3" not found, try pulling it first',
        404,
        "not_found_error",
        None,
    )


def test_error_plain_text() -> None:
    error = error_from(b"  502 Bad Gateway\n", status=502)
    assert (error.message, error.status, error.type, RetryConfig().retries(error)) == (
        "502 Bad Gateway",
        502,
        "upstream_error",
        True,
    )


def test_error_empty_body() -> None:
    error = error_from(b"", status=503)
    assert error.message == "upstream answered HTTP 503"
    error = error_from(b"[]", status=500)
    assert error.message == "upstream answered HTTP 500"


@pytest.mark.parametrize(
    ("status", "type_"),
    [(401, "authentication_error"), (403, "permission_error"), (429, "rate_limit_error"), (500, "upstream_error")],
)
def test_error_type_from_status(status: int, type_: str) -> None:
    assert error_from(b"nope", status=status).type == type_


def test_error_retry_after() -> None:
    error = error_from(b'{"error": {"message": "Rate limit reached"}}', status=429, headers={"retry-after": "2.5"})
    assert (error.status, error.type, error.retry_after, RetryConfig().retries(error)) == (
        429,
        "rate_limit_error",
        2.5,
        True,
    )
    assert error_from(b"x", status=429, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}).retry_after is None
    assert error_from(b"x", status=429, headers={"retry-after": "-1"}).retry_after is None
    assert error_from(b"x", status=429, headers={"Retry-After": "3"}).retry_after == 3.0  # any case, any mapping


def test_error_retry_after_with_httpx_headers() -> None:
    httpx = pytest.importorskip("httpx")
    error = error_from(b"x", status=503, headers=httpx.Headers({"Retry-After": "7"}))
    assert error.retry_after == 7.0


def test_error_never_shows_the_key() -> None:
    body = orjson.dumps(
        {
            "error": {
                "message": f"Incorrect API key provided: {KEY}. Find yours at ...",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
    )
    error = error_from(body, status=401)
    assert KEY not in error.message
    assert error.message == "Incorrect API key provided: ***. Find yours at ..."
    assert error.type == "invalid_request_error"


def test_error_masks_key_shaped_strings() -> None:
    error = error_from(b"Incorrect API key provided: sk-proj-abc*********************xyz1", status=401, key=None)
    assert error.message == "Incorrect API key provided: sk-pr***"
    error = error_from(b'{"error": "key sk-otherKEY_0123456789 is invalid"}', status=401)
    assert error.message == "key sk-ot*** is invalid"


def test_error_message_is_bounded() -> None:
    error = error_from(b"x" * 5000, status=500)
    assert len(error.message) == MAX_ERROR_MESSAGE
    assert error.message == "x" * (MAX_ERROR_MESSAGE - 1) + "…"


def test_a_body_that_ends_after_the_finish_reason_is_complete_without_done() -> None:
    parser = OpenAIStreamParser(keep_raw=False)
    feed(parser, chunk([{"index": 0, "delta": {"content": "hi"}}]))
    feed(parser, chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    assert parser.end() == []
    assert parser.finished is True


def test_a_body_that_ends_before_any_finish_reason_is_broken() -> None:
    parser = OpenAIStreamParser(keep_raw=False)
    feed(parser, chunk([{"index": 0, "delta": {"content": "hi"}}]))
    with pytest.raises(UpstreamProtocolError, match="before a finish reason"):
        parser.end()
    assert parser.finished is False


@pytest.mark.parametrize(
    "body",
    [
        # OpenAI
        b'{"error": {"message": "This model\'s maximum context length is 128000 tokens. However, your messages '
        b'resulted in 130000 tokens.", "type": "invalid_request_error", "param": "messages", '
        b'"code": "context_length_exceeded"}}',
        # vLLM
        b'{"object": "error", "message": "This model\'s maximum context length is 4096 tokens. However, you '
        b'requested 5000 tokens.", "type": "BadRequestError", "param": null, "code": 400}',
        # llama.cpp
        b'{"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",'
        b' "type": "exceed_context_size_error"}}',
    ],
)
def test_a_prompt_longer_than_the_context_is_a_context_length_error(body: bytes) -> None:
    error = translation().error_from_response(400, {}, body)
    assert isinstance(error, ContextLengthError)
    assert error.status == 400


def test_other_refusals_are_not_context_length_errors() -> None:
    body = b'{"error": {"message": "Your request was rejected by the content filter", "code": "content_filter"}}'
    assert type(translation().error_from_response(400, {}, body)) is UpstreamStatusError
    # a 5xx that mentions the context is the server's failure, not a refusal of this prompt
    body = b'{"error": {"message": "maximum context length computation crashed"}}'
    assert type(translation().error_from_response(500, {}, body)) is UpstreamStatusError


# -- OpenAI's other endpoints ------------------------------------------------------------------


def test_an_embeddings_request_goes_whole_to_embeddings_and_its_answer_is_one_delta() -> None:
    body = {"model": "local/embed", "input": ["a", "b"], "dimensions": 8, "vendor": {"x": 1}}
    request = OpenAITranslation(base_url=URL, api_key=KEY).stream_request(parse_embedding_request(body).routed("embed"))

    assert request.url == URL + "/embeddings"
    assert orjson.loads(request.body) == {**body, "model": "embed"}
    assert request.headers["accept"] == "application/json"
    assert request.answer is not None
    answer = b'{"object":"list","data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}'
    assert request.answer(answer) == Delta(raw=answer, usage=Usage(prompt_tokens=4, completion_tokens=0))
    with pytest.raises(UpstreamProtocolError):
        request.answer(b"<html>")


def test_a_legacy_completion_goes_whole_to_completions_streamed_with_usage() -> None:
    body = {"model": "local/coder", "prompt": "def f(", "suffix": "\n    return x", "echo": False, "stream": False}
    translation = OpenAITranslation(base_url=URL, api_key=KEY)
    request = translation.stream_request(parse_completion_request(body).routed("coder"))

    assert request.url == URL + "/completions"
    assert request.answer is None
    assert orjson.loads(request.body) == {
        **body,
        "model": "coder",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_text_completion_chunks_are_parsed_and_kept_byte_for_byte() -> None:
    parser = OpenAITranslation(base_url=URL).stream_parser(parse_completion_request({"model": "m", "prompt": "p"}))
    data = '{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" x","finish_reason":null}]}'
    usage = '{"id":"cmpl-1","object":"text_completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'

    [delta] = parser.feed(ServerSentEvent(data=data))
    assert (delta.text, delta.raw) == (" x", b"data: " + data.encode() + b"\n\n")
    [last] = parser.feed(ServerSentEvent(data=usage))
    assert last.usage == Usage(prompt_tokens=3, completion_tokens=1)
    assert parser.feed(ServerSentEvent(data="[DONE]")) == []
    assert parser.finished


def test_only_choice_0_of_a_legacy_completion_is_read_the_others_pass_as_bytes() -> None:
    parser = OpenAITranslation(base_url=URL).stream_parser(parse_completion_request({"model": "m", "prompt": "p"}))
    other = '{"object":"text_completion","choices":[{"index":1,"text":"B","finish_reason":null}]}'
    first = '{"object":"text_completion","choices":[{"index":0,"text":"A","finish_reason":null}]}'

    [delta_1] = parser.feed(ServerSentEvent(data=other))
    [delta_0] = parser.feed(ServerSentEvent(data=first))
    assert (delta_1.text, delta_1.raw) == ("", b"data: " + other.encode() + b"\n\n")
    assert delta_0.text == "A"


def test_a_forwarded_request_goes_under_base_url_with_the_providers_key() -> None:
    translation = OpenAITranslation(base_url=URL + "/", api_key=KEY, extra_headers={"OpenAI-Organization": "org-1"})

    assert translation.forward_url("/v1/files/f-1/content?x=1") == URL + "/files/f-1/content?x=1"
    assert translation.forward_headers({"accept": "*/*", "authorization": "Bearer client"}) == {
        "accept": "*/*",
        "authorization": f"Bearer {KEY}",
        "openai-organization": "org-1",
    }
