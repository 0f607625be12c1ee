"""
`POST /v1/messages` end to end: the official anthropic SDK → trioproxy (hypercorn on
127.0.0.1:0) → a real scripted upstream speaking Anthropic (`claude`, passed through) or
OpenAI (`up`, translated), or the simulated one (`sim`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import trio
from anthropic.lib.streaming import AsyncMessageStreamManager
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    anthropic_sdk,
    collect_into,
    hang_up_mid_stream,
    hang_up_once_asked,
    interleaved_tool_calls,
    proxy_config,
    serve_proxy,
    stream_outcomes,
    wait_until,
)
from trioproxy import parse_config
from trioproxy.testing import FakeUpstream, Reply, ToolCall

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
TOKENS = ("Hel", "lo", ",", " wörld", " 🌍", "!")
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
SYSTEM = "Be brief."
# Behind one proxy: "claude" speaks Anthropic (pass-through), "up" speaks OpenAI (translated).
MODELS = pytest.mark.parametrize("model", ["claude/claude-test", "up/gpt-test"])


@pytest.fixture
async def claude(proxy_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official SDK, unmodified, pointed at the proxy (no retries: we test each answer)."""
    async with anthropic_sdk(proxy_url, "client-key") as sdk:
        yield sdk


def create(**fields: Any) -> dict[str, Any]:
    return {"max_tokens": 100, "system": SYSTEM, "messages": MESSAGES, **fields}


# --- text ---------------------------------------------------------------------------------


@MODELS
async def test_a_streamed_answer_through_the_stream_helper(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(11, 6)))
    async with claude.messages.stream(**create(model=model)) as stream:
        pieces = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert pieces == list(TOKENS)
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(TOKENS)
    assert (message.role, message.stop_reason, message.stop_sequence) == ("assistant", "end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 6)
    assert message.id.startswith("msg_")


@MODELS
async def test_a_streamed_answer_s_events_are_in_the_api_s_order(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS))
    stream = await claude.messages.create(**create(model=model), stream=True)
    kinds = [event.type async for event in stream]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * len(TOKENS),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@MODELS
async def test_a_non_streamed_answer(claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(9, 6)))
    message = await claude.messages.create(**create(model=model))
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "".join(TOKENS)
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("end_turn", 9, 6)


async def test_the_simulated_upstream(claude: anthropic.AsyncAnthropic, upstream: FakeUpstream) -> None:
    async with claude.messages.stream(
        model="sim/echo", max_tokens=50, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        message = await stream.get_final_message()
    assert message.content[0].text == "one two three"

    tools: Any = [{"name": "lookup", "input_schema": {"type": "object"}}]
    called = await claude.messages.create(model="sim/tools", max_tokens=50, messages=MESSAGES, tools=tools)
    assert called.stop_reason == "tool_use"
    assert (called.content[0].type, called.content[0].name, called.content[0].input) == (
        "tool_use",
        "lookup",
        {"input": "Say hello"},
    )

    with pytest.raises(anthropic.ServiceUnavailableError) as info:
        await claude.messages.create(
            **create(model="sim/echo"), extra_body={"simulate": {"fail_before_first_token": True}}
        )
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert list(upstream.requests) == []


async def test_the_sync_client(proxy_url: str, upstream: FakeUpstream) -> None:
    """The sync SDK, in a thread: the proxy runs in this test's trio loop."""
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))

    def use_the_sync_sdk() -> tuple[str, str]:
        with anthropic.Anthropic(base_url=proxy_url, api_key="k", max_retries=0) as sdk:
            created = sdk.messages.create(**create(model="claude/c"))
            with sdk.messages.stream(**create(model="up/m")) as stream:
                streamed = stream.get_final_text()
        assert created.content[0].type == "text"
        return created.content[0].text, streamed

    assert await trio.to_thread.run_sync(use_the_sync_sdk) == ("".join(TOKENS), "".join(TOKENS))


async def test_claude_code_s_query_string_and_bearer_key(proxy_url: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS))
    async with anthropic.AsyncAnthropic(base_url=proxy_url, auth_token="client-key", max_retries=0) as sdk:
        message = await sdk.messages.create(**create(model="claude/c"), extra_query={"beta": "true"})
    assert message.content[0].text == "".join(TOKENS)


# --- an Anthropic upstream: pass-through ------------------------------------------------------


async def test_the_request_goes_up_whole_with_the_protocol_headers(
    proxy_url: str, upstream: FakeUpstream, upstream_keys: dict[str, str]
) -> None:
    recorded = orjson.loads((FIXTURES / "claude_code_request.json").read_bytes())
    request = {**recorded["body"], "model": "claude/claude-opus-5-5"}
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + recorded["path"], json=request, headers=recorded["headers"])
    assert response.status_code == 200
    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.json == {**request, "model": "claude-opus-5-5"}
    for name in ("anthropic-beta", "anthropic-version"):
        assert sent.headers[name] == recorded["headers"][name]
    assert sent.headers["x-api-key"] == upstream_keys["claude"]


@pytest.mark.parametrize(
    "name",
    ["claude_code_request.json", "claude_code_tool_result_request.json", "claude_code_nonstream_retry_request.json"],
)
async def test_claude_code_s_requests_to_an_openai_upstream(proxy_url: str, upstream: FakeUpstream, name: str) -> None:
    recorded = orjson.loads((FIXTURES / name).read_bytes())
    upstream.push(Reply(tokens=TOKENS))
    request = {**recorded["body"], "model": "up/local-model"}
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + recorded["path"], json=request, headers=recorded["headers"])
    assert response.status_code == 200
    sent = upstream.requests[-1]
    assert (sent.path, sent.json["model"], sent.json["max_tokens"]) == (
        "/v1/chat/completions",
        "local-model",
        recorded["body"]["max_tokens"],
    )
    assert "anthropic-beta" not in sent.headers
    if request["stream"]:
        assert response.content.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    else:
        assert response.json()["content"] == [{"type": "text", "text": "".join(TOKENS)}]


@pytest.mark.parametrize("fixture", ["stream_thinking_tools.sse", "thinking_citations_server_tool.sse"])
async def test_the_upstream_s_bytes_reach_the_client_untouched(
    proxy_url: str, upstream: FakeUpstream, fixture: str
) -> None:
    sent = (FIXTURES / fixture).read_bytes()
    upstream.push(Reply(raw_body=sent))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + "/v1/messages", json=create(model="claude/c", stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == sent


async def test_thinking_signatures_and_citations_reach_the_sdk(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(raw_body=(FIXTURES / "thinking_citations_server_tool.sse").read_bytes()))
    async with claude.messages.stream(
        **create(model="claude/c", thinking={"type": "enabled", "budget_tokens": 1024})
    ) as stream:
        message = await stream.get_final_message()
    thinking, _, _, text = message.content
    assert thinking.type == "thinking"
    assert thinking.signature.startswith("EqQB")
    assert text.type == "text"
    assert text.citations
    assert text.citations[0].cited_text == "Sunny, 21 °C"
    assert message.usage.cache_read_input_tokens == 1800


async def test_a_non_streamed_answer_keeps_every_block_too(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(raw_body=(FIXTURES / "thinking_citations_server_tool.sse").read_bytes()))
    message = await claude.messages.create(**create(model="claude/c"))
    assert [block.type for block in message.content] == [
        "thinking",
        "server_tool_use",
        "web_search_tool_result",
        "text",
    ]
    assert message.content[1].input == {"query": "weather Paris"}


# --- another upstream: translated ---------------------------------------------------------------


async def test_an_openai_upstream_gets_the_translated_request(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, upstream_keys: dict[str, str]
) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
    ]
    await claude.messages.create(
        model="up/gpt-test",
        max_tokens=64,
        system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": content}],
        stop_sequences=["###"],
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body={"temperature": 0.5},
    )
    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {upstream_keys['up']}"
    assert "anthropic-version" not in sent.headers
    assert sent.json["model"] == "gpt-test"
    assert sent.json["messages"] == [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": "What is this?"},
            ],
        },
    ]
    assert (sent.json["max_tokens"], sent.json["stop"], sent.json["temperature"]) == (64, ["###"], 0.5)
    assert "thinking" not in sent.json


async def test_an_output_schema_reaches_another_upstream_and_thinking_and_effort_do_not(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    await claude.messages.create(
        **create(
            model="up/gpt-test",
            thinking={"type": "enabled", "budget_tokens": 1024},
            output_config={"effort": "high", "format": {"type": "json_schema", "schema": schema}},
        )
    )
    sent = upstream.requests[-1].json
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert not {"thinking", "output_config", "reasoning_effort"} & sent.keys()


async def test_a_field_another_upstream_cannot_take_is_a_400_naming_it(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude.messages.create(**create(model="up/m", tools=tools))
    assert info.value.status_code == 400
    assert "tools[0]" in info.value.message
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert list(upstream.requests) == []
    # An Anthropic upstream takes it as it is.
    await claude.messages.create(**create(model="claude/c", tools=tools))
    assert upstream.requests[-1].json["tools"] == tools


@MODELS
async def test_tool_calls(claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, model: str) -> None:
    calls = (
        ToolCall(id="toolu_1", name="get_weather", arguments='{"city": "Paris"}'),
        ToolCall(id="toolu_2", name="get_time", arguments='{"tz": "Europe/Paris"}'),
    )
    upstream.push(Reply(tokens=("Let me check.",), tool_calls=calls))
    tools: Any = [
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object"}},
    ]
    async with claude.messages.stream(**create(model=model, tools=tools)) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    text, weather, time = message.content
    assert text.type == "text"
    assert text.text == "Let me check."
    assert (weather.type, weather.id, weather.name, weather.input) == (
        "tool_use",
        "toolu_1",
        "get_weather",
        {"city": "Paris"},
    )
    assert (time.type, time.name, time.input) == ("tool_use", "get_time", {"tz": "Europe/Paris"})

    # the tool results go back up, in the upstream's protocol
    upstream.push(Reply(tokens=("Sunny.",)))
    results: Any = [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 °C"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
    ]
    conversation: Any = [
        *MESSAGES,
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": results},
    ]
    await claude.messages.create(**create(model=model, tools=tools, messages=conversation))
    sent = upstream.requests[-1].json
    if model.startswith("up/"):
        assert sent["messages"][-2:] == [
            {"role": "tool", "tool_call_id": "toolu_1", "content": "21 °C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
        ]
        assert sent["messages"][-3]["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        }
    else:
        assert sent["messages"][-1]["content"] == results


# --- errors ----------------------------------------------------------------------------------


async def test_bad_requests_are_anthropic_400s_naming_the_field(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        url = proxy_url + "/v1/messages"
        not_json = await http.post(url, content=b"{nope", headers={"content-type": "application/json"})
        no_max_tokens = await http.post(url, json={"model": "sim/echo", "messages": MESSAGES})
        no_messages = await http.post(url, json={"model": "sim/echo", "max_tokens": 5})
    for response in (not_json, no_max_tokens, no_messages):
        assert response.status_code == 400
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert "'max_tokens'" in no_max_tokens.json()["error"]["message"]
    assert "'messages'" in no_messages.json()["error"]["message"]


async def test_the_sdk_raises_its_own_typed_errors_with_the_message(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    with pytest.raises(anthropic.NotFoundError) as not_found:
        await claude.messages.create(**create(model="nowhere/m"))
    assert "nowhere" in not_found.value.message

    upstream.push(Reply(status=429, error_message="slow down", headers={"retry-after": "7"}))
    with pytest.raises(anthropic.RateLimitError) as limited:
        await claude.messages.create(**create(model="claude/c"), stream=True)
    assert "slow down" in limited.value.message
    assert limited.value.response.headers["retry-after"] == "7"

    upstream.push(Reply(status=529, error_message="Overloaded"))
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await claude.messages.create(**create(model="claude/c"))
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]

    upstream.push(Reply(status=500, error_message="upstream exploded"))
    with pytest.raises(anthropic.InternalServerError) as failed:
        await claude.messages.create(**create(model="up/m"), stream=True)
    assert "upstream exploded" in failed.value.message
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]


async def stream_text(manager: AsyncMessageStreamManager, into: list[str]) -> None:
    """Open the SDK's message stream and keep its text, piece by piece, in `into`."""
    async with manager as stream:
        await collect_into(stream.text_stream, into)


@MODELS
async def test_an_error_mid_stream_is_an_error_event_and_no_message_stop(
    proxy_url: str, claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2, error_message="overloaded right now"))
    if model.startswith("claude/"):
        # An Anthropic upstream is asked to continue (prefill): this one cannot, and is not asked again.
        upstream.push(Reply(refuse_continuation=True))
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        await stream_text(claude.messages.stream(**create(model=model)), received)
    assert received == list(TOKENS[:2])
    assert "overloaded right now" in info.value.message

    upstream.push(Reply(tokens=TOKENS, reset_after=3))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + "/v1/messages", json=create(model=model, stream=True))
    assert b"message_stop" not in response.content
    last = response.content.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])["error"]
    assert error["type"] == "api_error"
    assert "after 6 characters were delivered" in error["message"]  # "Hel", "lo", ","


async def test_a_non_streaming_message_that_fails_midway_claims_no_delivered_text(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    """A non-streaming message is sent whole or not at all: its client got none of the text."""
    upstream.push(Reply(tokens=TOKENS, error_after=2, error_message="overloaded right now"))
    with pytest.raises(anthropic.APIStatusError) as info:
        await claude.messages.create(**create(model="up/gpt-test"))
    assert info.value.status_code == 502
    assert info.value.body["error"]["message"] == "overloaded right now"


async def test_unknown_paths_under_v1_messages_are_anthropic_404s(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + "/v1/messages/batches", json={})
    assert response.status_code == 404
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "not_found_error"


async def test_a_failover_before_the_first_token_shows_one_message(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    config = proxy_config(upstream, flaky={"type": "anthropic", "base_url": upstream.url, "fallbacks": ["up/gpt-test"]})
    proxy = await serve_proxy(nursery, config)
    upstream.push(Reply(tokens=TOKENS, error_after=0, error_message="Overloaded"), Reply(tokens=TOKENS))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/messages", json=create(model="flaky/c", stream=True))
    kinds = [line.removeprefix(b"event: ") for line in response.content.split(b"\n") if line.startswith(b"event: ")]
    assert kinds.count(b"message_start") == 1
    assert kinds.count(b"content_block_start") == 1
    assert kinds[-1] == b"message_stop"
    assert [request.path for request in upstream.requests] == ["/v1/messages", "/v1/chat/completions"]


# --- the client goes away -------------------------------------------------------------------


@MODELS
async def test_client_disconnect_mid_stream_closes_the_upstream(
    claude: anthropic.AsyncAnthropic, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=("a",) * 1000, interval=0.01))
    stream = await claude.messages.create(**create(model=model), stream=True)
    await hang_up_mid_stream(stream, upstream, counts=lambda event: event.type == "content_block_delta")


@MODELS
@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_before_the_first_token_closes_the_upstream(
    proxy_url: str, upstream: FakeUpstream, model: str, stream: bool
) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=60))
    await hang_up_once_asked(proxy_url + "/v1/messages", create(model=model, stream=stream), upstream)


# --- client keys ---------------------------------------------------------------------------


async def test_client_keys_from_x_api_key_or_bearer(nursery: trio.Nursery) -> None:
    config = parse_config({"auth": {"keys": ["sk-client-1"]}}, environ={})
    proxy = await serve_proxy(nursery, config)
    body = create(model="sim/echo")
    for credentials in ({"api_key": "sk-client-1"}, {"auth_token": "sk-client-1"}):
        async with anthropic.AsyncAnthropic(base_url=proxy, max_retries=0, **credentials) as sdk:
            assert (await sdk.messages.create(**body)).content[0].text == "Say hello"
    async with anthropic_sdk(proxy, "wrong") as sdk:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await sdk.messages.create(**body)
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


# --- count_tokens ---------------------------------------------------------------------------


async def test_count_tokens_is_forwarded_to_an_anthropic_upstream(nursery: trio.Nursery) -> None:
    """The upstream is a second trioproxy: its Messages front counts (an estimate) for its simulated provider."""
    upstream = await serve_proxy(nursery, parse_config({}, environ={}))
    config = parse_config({"providers": {"chain": {"type": "anthropic", "base_url": upstream}}}, environ={})
    proxy = await serve_proxy(nursery, config)
    body = {"model": "chain/sim/echo", "messages": [{"role": "user", "content": "x" * 40}]}
    async with httpx.AsyncClient() as http:
        forwarded = await http.post(proxy + "/v1/messages/count_tokens", json=body)
        unknown_model = await http.post(proxy + "/v1/messages/count_tokens", json={**body, "model": "chain/nope/m"})
    assert forwarded.status_code == 200
    assert forwarded.json() == {"input_tokens": 10, "estimated": True}  # the upstream's own answer, whole
    assert unknown_model.status_code == 404  # the upstream's error, in Anthropic's shape
    assert unknown_model.json()["error"]["type"] == "not_found_error"
    assert "'nope/m'" in unknown_model.json()["error"]["message"]


@pytest.mark.parametrize("model", ["up/m", "sim/echo"])
async def test_count_tokens_is_an_estimate_marked_so_for_another_upstream(
    proxy_url: str, upstream: FakeUpstream, model: str
) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            proxy_url + "/v1/messages/count_tokens",
            json={"model": model, "messages": [{"role": "user", "content": "x" * 40}]},
        )
    assert response.status_code == 200
    assert response.json() == {"input_tokens": 10, "estimated": True}
    assert list(upstream.requests) == []


# --- limits and metrics ------------------------------------------------------------------------


async def test_limits_refuse_in_anthropic_s_shape_and_metrics_count_the_route(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    config = parse_config(
        {
            "limits": {"max_messages": 2, "requests_per_minute": 1},
            "providers": {"claude": {"type": "anthropic", "base_url": upstream.url}},
        },
        environ={},
    )
    proxy = await serve_proxy(nursery, config)
    async with anthropic_sdk(proxy) as sdk:
        with pytest.raises(anthropic.BadRequestError) as too_long:
            await sdk.messages.create(**create(model="claude/c", messages=[*MESSAGES] * 3))
        assert "at most 2" in too_long.value.message
        await sdk.messages.create(**create(model="claude/c"))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await sdk.messages.create(**create(model="claude/c"))
        assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert limited.value.response.headers["retry-after"]

    async def counted() -> bool:
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(proxy + "/metrics")).text
        labels = {"route": "/v1/messages", "provider": "claude", "outcome": "completed"}
        return any(
            sample.name == "trioproxy_streams_total" and sample.labels == labels and sample.value == 1
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
        )

    await wait_until(counted)


# --- what content blocks cannot carry ------------------------------------------------------------


async def test_interleaved_tool_calls_end_the_stream_with_an_error_event(
    claude: anthropic.AsyncAnthropic, proxy_url: str, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """
    A Chat Completions upstream may go back to tool call 0 after starting tool call 1; a
    stopped tool_use block takes no more deltas (the proxy wrote one, which the SDK happened to
    swallow). Streamed, the client gets an `error` event as the stream's last word; refused
    before anything was sent, or not streamed, the error is the answer's status. Each counts
    as an upstream protocol error, with no bug logged.
    """
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    upstream.push(
        interleaved_tool_calls(),
        interleaved_tool_calls(in_one_chunk=True),
        interleaved_tool_calls(),
    )
    stream = await claude.messages.create(**create(model="up/gpt-test"), stream=True)
    events: list[Any] = []
    with pytest.raises(anthropic.APIStatusError) as streamed:
        await collect_into(stream, events)
    with pytest.raises(anthropic.InternalServerError) as held:
        await claude.messages.create(**create(model="up/gpt-test"), stream=True)
    with pytest.raises(anthropic.InternalServerError) as whole:
        await claude.messages.create(**create(model="up/gpt-test"))

    refusal = "the upstream went back to tool call 0 after starting another"
    assert refusal in streamed.value.message
    assert [event.type for event in events][-3:] == ["content_block_start", "content_block_stop", "content_block_start"]
    assert (held.value.status_code, whole.value.status_code) == (502, 502)
    assert held.value.body["error"]["message"].startswith(refusal)  # type: ignore[index]
    assert whole.value.body["error"]["message"].startswith(refusal)  # type: ignore[index]

    def access_lines() -> list[dict[str, Any]]:
        return [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]

    await wait_until(lambda: len(access_lines()) == 3)
    assert [(line["status"], line["outcome"]) for line in access_lines()] == [
        (200, "upstream_error"),
        *[(502, "upstream_error")] * 2,
    ]
    assert await stream_outcomes(proxy_url, "/v1/messages") == {"upstream_error": 3, "upstream_errors:protocol": 3}
    # The upstreams never ended their streams: the proxy cancelled each (or the client would still wait).
    assert all(asked.disconnected.is_set() and not asked.completed for asked in upstream.requests)
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


# --- models ---------------------------------------------------------------------------------


async def test_models_in_anthropic_s_list_shape(nursery: trio.Nursery) -> None:
    config = parse_config({"models": {"claude-haiku-4-5": "sim/echo", "claude-*": "sim"}}, environ={})
    proxy = await serve_proxy(nursery, config)
    async with anthropic_sdk(proxy) as sdk:
        models = [model async for model in sdk.models.list()]
        message = await sdk.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    assert [model.id for model in models] == ["claude-haiku-4-5", "sim/echo", "sim/lorem", "sim/tools"]
    assert all(model.type == "model" for model in models)
    assert message.content[0].text == "Say hello"  # the alias routes to sim's echo
    assert message.model == "claude-haiku-4-5"


# --- stages and guarantees on this front ---------------------------------------------------------


@pytest.fixture
async def staged(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    """A proxy whose Anthropic-format routes have stages, timeouts and retries."""
    config = proxy_config(
        upstream,
        redacted={
            "type": "anthropic",
            "base_url": upstream.url,
            "transforms": [{"type": "regex_redact", "pattern": r"\d{3}-\d{4}", "replacement": "[phone]"}],
            "buffer": {"buffer_by_word": True, "min_chunk_size": 8},
        },
        guarded={
            "type": "anthropic",
            "base_url": upstream.url,
            "validators": [{"type": "banned_phrases", "phrases": ["forbidden"]}],
        },
        patient={"type": "anthropic", "base_url": upstream.url, "heartbeat_interval": 0.05, "first_token_timeout": 5},
        hasty={"type": "anthropic", "base_url": upstream.url, "first_token_timeout": 0.2},
        retrying={"type": "anthropic", "base_url": upstream.url, "retry": {"max_retries": 2, "base_delay_ms": 1}},
    )
    return await serve_proxy(nursery, config)


async def post_stream(proxy: str, model: str) -> bytes:
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/messages", json=create(model=model, stream=True))
    return response.content


async def test_a_stage_that_changes_content_gets_rendered_events(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=("Call ", "555-", "1234", " now, ", "please.")))
    async with (
        anthropic_sdk(staged) as sdk,
        sdk.messages.stream(**create(model="redacted/c")) as stream,
    ):
        message = await stream.get_final_message()
    assert message.content[0].type == "text"
    assert message.content[0].text == "Call [phone] now, please."
    assert message.stop_reason == "end_turn"
    assert message.id != "msg_fake1"  # the upstream's events were not forwarded: they were changed


async def test_a_validator_ends_the_stream_with_an_error_event(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=("This ", "is ", "forbidden", " text")))
    body = await post_stream(staged, "guarded/c")
    assert b"message_stop" not in body
    assert body.split(b"\n\n")[-2].startswith(b"event: error\n")
    assert b"forbidden" not in body.split(b"event: error")[0]


async def test_heartbeats_are_pings(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=0.5))
    body = await post_stream(staged, "patient/c")
    assert body.startswith(b'event: ping\ndata: {"type": "ping"}\n\n')
    parsed = [orjson.loads(event.split(b"data: ", 1)[1]) for event in body.split(b"\n\n")[:-1]]
    assert [data["type"] for data in parsed].count("message_start") == 1
    assert parsed[-1] == {"type": "message_stop"}


async def test_a_first_token_timeout_is_an_anthropic_error(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=5))
    async with anthropic_sdk(staged) as sdk:
        with pytest.raises(anthropic.GatewayTimeoutError) as info:
            await sdk.messages.create(**create(model="hasty/c"), stream=True)
    assert info.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]
    assert "first_token_timeout" in info.value.message


async def test_retries_before_the_first_token_deliver_one_message(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(status=529, error_message="Overloaded"), Reply(tokens=TOKENS))
    async with (
        anthropic_sdk(staged) as sdk,
        sdk.messages.stream(**create(model="retrying/c")) as stream,
    ):
        message = await stream.get_final_message()
    assert message.content[0].text == "".join(TOKENS)  # type: ignore[union-attr]
    assert len(upstream.requests) == 2


async def test_thinking_signatures_survive_a_stage_that_changes_content(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(raw_body=(FIXTURES / "stream_thinking_tools.sse").read_bytes()))
    async with (
        anthropic_sdk(staged) as sdk,
        sdk.messages.stream(**create(model="redacted/c")) as stream,
    ):
        message = await stream.get_final_message()
    thinking, text, tool_use = message.content
    assert thinking.type == "thinking"
    assert thinking.signature
    assert thinking.thinking
    assert text.type == "text"
    assert text.text
    assert tool_use.type == "tool_use"
    assert tool_use.input == {"city": "Paris", "unit": "celsius"}
    assert message.stop_reason == "tool_use"


async def test_a_field_a_responses_upstream_has_no_equivalent_for_is_a_400_naming_the_anthropic_field(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    config = proxy_config(
        upstream,
        resp={"type": "openai_responses", "base_url": upstream.url + "/v1"},
        lenient={"type": "openai_responses", "base_url": upstream.url + "/v1", "drop_params": ["stop_sequences"]},
    )
    proxy = await serve_proxy(nursery, config)
    ask: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["END"]}
    async with anthropic_sdk(proxy) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(model="resp/gpt", **ask)
        error = info.value.body["error"]
        assert "'stop_sequences' has no equivalent in the OpenAI Responses API" in error["message"]
        assert not upstream.requests

        upstream.push(Reply(tokens=("Hel", "lo")))
        message = await client.messages.create(model="lenient/gpt", **ask)
    assert message.content[0].text == "Hello"
    assert upstream.requests[-1].path == "/v1/responses"
    assert "stop" not in upstream.requests[-1].json
