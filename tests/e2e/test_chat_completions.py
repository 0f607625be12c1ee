"""
`POST /v1/chat/completions` end to end: the official openai SDK → trioproxy (hypercorn on
127.0.0.1:0) → a real scripted upstream speaking OpenAI or Anthropic SSE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import orjson
import pytest
import trio

from tests.conftest import (
    Instant,
    chat_text,
    collect_into,
    free_port,
    hang_up_mid_stream,
    openai_sdk,
    openai_upstream_config,
    proxy_config,
    serve_proxy,
    upstream_closed_soon_after,
    wait_until,
)
from trioproxy import parse_config
from trioproxy.testing import FakeUpstream, Reply, ToolCall

TOKENS = ("Hel", "lo", ",", " wörld", " 🌍", "!")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
# Both formats of upstream behind one proxy: "up" speaks OpenAI, "claude" speaks Anthropic.
MODELS = pytest.mark.parametrize("model", ["up/gpt-test", "claude/claude-test"])


async def content_until_error(stream: openai.AsyncStream) -> tuple[list[str], openai.APIError]:
    """The text pieces a stream delivers before the SDK raises, and what it raised."""
    chunks: list[openai.types.chat.ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as info:
        await collect_into(stream, chunks)
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content], info.value


async def collect(stream: openai.AsyncStream) -> tuple[str, list]:
    chunks = [chunk async for chunk in stream]
    text = chat_text(chunks)
    return text, chunks


@MODELS
async def test_streamed_text_is_identical_to_the_upstreams(client, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(tokens=TOKENS))
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    text, chunks = await collect(stream)

    assert text == "".join(TOKENS)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert len({c.id for c in chunks}) == 1


async def test_upstream_sees_the_model_name_and_every_field_the_client_sent(
    client, upstream: FakeUpstream, upstream_keys: dict[str, str]
) -> None:
    stream = await client.chat.completions.create(
        model="up/org/model-7b",
        messages=MESSAGES,
        stream=True,
        temperature=0.25,
        response_format={"type": "json_object"},
        extra_body={"vendor_knob": {"top_k": 3}},
    )
    await collect(stream)

    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "org/model-7b"
    assert sent.json["messages"] == MESSAGES
    assert sent.json["temperature"] == 0.25
    assert sent.json["response_format"] == {"type": "json_object"}
    assert sent.json["vendor_knob"] == {"top_k": 3}
    assert sent.headers["authorization"] == f"Bearer {upstream_keys['up']}"


async def test_anthropic_upstream_gets_a_messages_request(
    client, upstream: FakeUpstream, upstream_keys: dict[str, str]
) -> None:
    stream = await client.chat.completions.create(
        model="claude/claude-test", messages=MESSAGES, stream=True, max_tokens=50
    )
    await collect(stream)

    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == upstream_keys["claude"]
    assert sent.headers["anthropic-version"]
    assert sent.json["model"] == "claude-test"
    assert sent.json["system"] == "Be brief."
    assert sent.json["messages"] == [{"role": "user", "content": "Say hello"}]
    assert sent.json["max_tokens"] == 50
    assert sent.json["stream"] is True


THINKING_STREAM = Path(__file__).parent.parent / "fixtures" / "anthropic" / "stream_thinking_tools.sse"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


async def test_a_schema_and_an_effort_reach_an_anthropic_upstream_and_its_thinking_comes_back(
    client, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(raw_body=THINKING_STREAM.read_bytes()))
    stream = await client.chat.completions.create(
        model="claude/claude-test",
        messages=MESSAGES,
        stream=True,
        max_completion_tokens=2048,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
        reasoning_effort="high",
    )
    _, chunks = await collect(stream)

    sent = upstream.requests[-1].json
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": CITY}}
    assert (sent["thinking"], sent["max_tokens"]) == ({"type": "enabled", "budget_tokens": 1536}, 2048)
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert thought.startswith("The user wants the weather in Paris.")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"reasoning_effort": "low", "max_tokens": 512}, "reasoning_effort"),
    ],
)
async def test_what_an_anthropic_upstream_cannot_hold_the_answer_to_is_a_400_naming_it(
    client, upstream: FakeUpstream, fields: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="claude/claude-test", messages=MESSAGES, **fields)
    assert info.value.param == param
    assert f"'{param}'" in info.value.message
    assert not upstream.requests


async def test_a_field_an_anthropic_upstream_has_no_equivalent_for_is_a_400_unless_its_provider_drops_it(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    lenient = {"type": "anthropic", "base_url": upstream.url, "drop_params": ["seed"]}
    proxy = await serve_proxy(nursery, proxy_config(upstream, lenient=lenient))
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="claude/claude-test", messages=MESSAGES, seed=7)
        assert info.value.param == "seed"
        assert "'seed' has no equivalent in the Anthropic Messages API" in info.value.message
        assert not upstream.requests

        upstream.push(Reply(tokens=TOKENS))
        answer = await client.chat.completions.create(
            model="lenient/claude-test", messages=MESSAGES, seed=7, n=1, prompt_cache_key="k"
        )
    assert answer.choices[0].message.content == "".join(TOKENS)
    sent = upstream.requests[-1].json
    assert "seed" not in sent
    assert "prompt_cache_key" not in sent


@MODELS
async def test_usage_chunk_when_asked(client, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(11, 6)))
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, chunks = await collect(stream)

    assert text == "".join(TOKENS)
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (
        11,
        6,
        17,
    )
    assert all(c.usage is None for c in chunks[:-1])


@MODELS
async def test_tool_call_deltas_arrive_intact(client, upstream: FakeUpstream, model: str) -> None:
    calls = (
        ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris", "unit": "C"}'),
        ToolCall(id="call_2", name="get_time", arguments='{"tz": "Europe/Paris"}'),
    )
    upstream.push(Reply(tokens=("Let me check.",), tool_calls=calls))
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True, tools=tools)
    text, chunks = await collect(stream)

    assembled: dict[int, dict] = {}
    for chunk in chunks:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = assembled.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or tc.id
            call["name"] += tc.function.name or "" if tc.function else ""
            call["arguments"] += tc.function.arguments or "" if tc.function else ""
    assert text == "Let me check."
    assert assembled == {
        0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
        1: {"id": "call_2", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@MODELS
async def test_non_streaming_answer(client, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(9, 6)))
    completion = await client.chat.completions.create(model=model, messages=MESSAGES)

    assert completion.choices[0].message.content == "".join(TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 9
    assert completion.usage.completion_tokens == 6


async def test_simulated_provider_needs_no_upstream(client, upstream: FakeUpstream) -> None:
    stream = await client.chat.completions.create(
        model="sim/echo", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    text, _ = await collect(stream)
    assert text == "one two three"
    assert list(upstream.requests) == []


async def test_streaming_headers_and_strict_openai_framing(proxy_url: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS))
    async with httpx.AsyncClient() as http:
        response = await http.post(
            proxy_url + "/v1/chat/completions",
            json={"model": "up/m", "messages": MESSAGES, "stream": True},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: {"), event  # no id:, event: or retry: lines, ever
        assert "\n" not in event
        assert orjson.loads(event[6:])["object"] == "chat.completion.chunk"


# --- upstream connections ---------------------------------------------------------------------

ONE_CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
)


@MODELS
async def test_the_upstream_connection_is_kept_for_the_next_stream(client, upstream: FakeUpstream, model: str) -> None:
    for _ in range(3):
        upstream.push(Reply(tokens=TOKENS))
        text, _ = await collect(await client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
        assert text == "".join(TOKENS)
    assert [request.connection for request in upstream.requests] == [1, 1, 1]


@MODELS
async def test_a_cookie_the_upstream_set_for_one_client_is_not_sent_for_the_next(
    client, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, headers={"set-cookie": "session=first-client; Path=/"}), Reply(tokens=TOKENS))
    for _ in range(2):
        text, _ = await collect(await client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
        assert text == "".join(TOKENS)
    assert [request.headers.get("cookie") for request in upstream.requests] == [None, None]


async def test_with_a_proxy_in_the_environment_httpxs_own_transport_streams(
    nursery: trio.Nursery, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Proxy variables select httpx's own transport (which honours them); NO_PROXY keeps loopback direct.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    from tests.conftest import proxy_config

    proxy = await serve_proxy(nursery, proxy_config(upstream))
    async with openai_sdk(proxy) as sdk:
        for _ in range(2):
            upstream.push(Reply(tokens=TOKENS))
            text, _ = await collect(await sdk.chat.completions.create(model="up/m", messages=MESSAGES, stream=True))
            assert text == "".join(TOKENS)
    assert [request.connection for request in upstream.requests] == [1, 1]


@pytest.mark.parametrize("after_the_end", ["stall", "reset"])
async def test_an_upstream_misbehaving_after_its_end_marker_does_not_fail_the_stream(
    client, upstream: FakeUpstream, after_the_end: str
) -> None:
    fault = {"stall_after": 0} if after_the_end == "stall" else {"reset_after": 0}
    upstream.push(Reply(raw_body=ONE_CHUNK + b"data: [DONE]\n\n", **fault))
    text, _ = await collect(await client.chat.completions.create(model="up/m", messages=MESSAGES, stream=True))
    assert text == "ok"

    upstream.push(Reply(tokens=TOKENS))
    text, _ = await collect(await client.chat.completions.create(model="up/m", messages=MESSAGES, stream=True))
    assert text == "".join(TOKENS)
    first, second = upstream.requests
    assert second.connection != first.connection  # that connection was closed, not pooled
    if after_the_end == "stall":
        await first.disconnected.wait()


# --- errors -------------------------------------------------------------------------------


async def test_upstream_rate_limit_becomes_429_with_retry_after(client, upstream: FakeUpstream) -> None:
    upstream.push(Reply(status=429, error_message="slow down", headers={"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
    assert info.value.status_code == 429
    assert "slow down" in info.value.message
    assert info.value.response.headers["retry-after"] == "7"


@MODELS
async def test_upstream_server_error_before_the_stream(client, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(status=500, error_message="upstream exploded"))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    assert info.value.status_code == 500
    assert "upstream exploded" in info.value.message


async def test_upstream_key_never_reaches_the_client(
    client, upstream: FakeUpstream, upstream_keys: dict[str, str]
) -> None:
    UPSTREAM_KEY = upstream_keys["up"]
    upstream.push(Reply(status=401, error_message=f"Incorrect API key provided: {UPSTREAM_KEY}"))
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
    assert UPSTREAM_KEY not in info.value.response.text
    assert UPSTREAM_KEY[:12] not in info.value.response.text


async def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="nowhere/m", messages=MESSAGES, stream=True)
    assert "nowhere" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="sim/no-such-model", messages=MESSAGES, stream=True)


async def test_bad_requests_are_400_naming_the_field(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        url = proxy_url + "/v1/chat/completions"
        not_json = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        no_messages = await http.post(url, json={"model": "sim/echo"})
        bad_role = await http.post(url, json={"model": "sim/echo", "messages": [{"role": "robot", "content": "x"}]})
        bad_stream = await http.post(url, json={"model": "sim/echo", "messages": MESSAGES, "stream": "yes"})
        still_serving = await http.post(url, json={"model": "sim/echo", "messages": MESSAGES})

    for response in (not_json, no_messages, bad_role, bad_stream):
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert no_messages.json()["error"]["param"] == "messages"
    assert bad_role.json()["error"]["param"] == "messages[0].role"
    assert bad_stream.json()["error"]["param"] == "stream"
    assert still_serving.status_code == 200


@MODELS
async def test_connection_reset_mid_stream_is_an_api_error_after_the_tokens(
    client, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, reset_after=3))
    if model.startswith("claude/"):  # an Anthropic upstream is asked to continue (prefill): this one cannot
        upstream.push(Reply(refuse_continuation=True))
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    received, error = await content_until_error(stream)
    assert received == list(TOKENS[:3])
    assert "upstream" in error.message
    assert "prefill" not in error.message
    # and the proxy keeps serving
    upstream.push(Reply(tokens=TOKENS))
    text, _ = await collect(await client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    assert text == "".join(TOKENS)


@MODELS
async def test_in_stream_upstream_error_is_an_api_error(client, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2, error_message="overloaded right now"))
    if model.startswith("claude/"):  # an Anthropic upstream is asked to continue (prefill): this one cannot
        upstream.push(Reply(refuse_continuation=True))
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    received, error = await content_until_error(stream)
    assert received == list(TOKENS[:2])
    assert "overloaded" in error.message.lower()
    assert "after 5 characters were delivered; they are not repeated" in error.message  # "Hel", "lo"


async def test_a_non_streaming_answer_that_fails_midway_claims_no_delivered_text(
    client, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """It is sent whole or not at all: its client got none of the text the upstream wrote, nor does the log say so."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    upstream.push(Reply(tokens=TOKENS, error_after=2, error_message="overloaded right now"))
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="up/gpt-test", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["message"] == "overloaded right now"
    await wait_until(lambda: any(r.name == "trioproxy.access" for r in caplog.records))
    (line,) = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    assert line["error"] == "overloaded right now"


@MODELS
async def test_a_body_that_ends_after_its_finish_reason_is_complete_without_the_end_marker(
    client, upstream: FakeUpstream, model: str
) -> None:
    """Some OpenAI-compatible servers never send `[DONE]` (Anthropic ones, `message_stop`): the answer is whole."""
    upstream.push(Reply(tokens=TOKENS, usage=(11, 6), omit_done=True))
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, chunks = await collect(stream)
    assert text == "".join(TOKENS)
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 6)


async def test_truncated_stream_is_never_passed_off_as_complete(proxy_url: str, upstream: FakeUpstream) -> None:
    first = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
    )
    upstream.push(Reply(raw_body=first))  # a clean end of the body, but no finish reason
    async with httpx.AsyncClient() as http:
        response = await http.post(
            proxy_url + "/v1/chat/completions", json={"model": "up/m", "messages": MESSAGES, "stream": True}
        )
    assert "data: [DONE]" not in response.text
    last = orjson.loads(response.text.strip().split("\n\n")[-1][6:])
    assert "before a finish reason" in last["error"]["message"]


async def test_malformed_upstream_chunk_is_an_in_stream_error(client, upstream: FakeUpstream) -> None:
    good = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
    )
    upstream.push(Reply(raw_body=good + b'data: {"id":"c","obj\n\n'))
    stream = await client.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        await collect(stream)
    assert "not JSON" in info.value.message


async def test_unreachable_upstream_is_502(proxy_url: str, nursery: trio.Nursery) -> None:
    config = parse_config({"providers": {"gone": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"}}})
    proxy = await serve_proxy(nursery, config)
    async with openai_sdk(proxy) as sdk:
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(model="gone/m", messages=MESSAGES, stream=True)
    assert info.value.status_code == 502
    assert "cannot connect" in info.value.message


# --- the client goes away -------------------------------------------------------------------


async def test_client_disconnect_mid_stream_closes_the_upstream(client, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=("a",) * 1000, interval=0.01))
    stream = await client.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
    await hang_up_mid_stream(stream, upstream)


@MODELS
async def test_client_disconnect_before_first_token_closes_the_upstream(
    proxy_url: str, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, stall_after=0))  # headers sent, then silence
    await _disconnect_while_waiting(proxy_url, upstream, {"model": model, "messages": MESSAGES, "stream": True})


async def test_client_disconnect_before_upstream_headers_closes_the_upstream(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, headers_delay=60))
    await _disconnect_while_waiting(proxy_url, upstream, {"model": "up/m", "messages": MESSAGES, "stream": True})


@MODELS
async def test_client_disconnect_during_non_streaming_request_closes_the_upstream(
    proxy_url: str, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=60))
    await _disconnect_while_waiting(proxy_url, upstream, {"model": model, "messages": MESSAGES})


async def _disconnect_while_waiting(proxy_url: str, upstream: FakeUpstream, body: dict) -> None:
    """Send `body`, hang up once the upstream has it, and time how soon the upstream knows."""
    client = await _send_post(proxy_url, body)
    with trio.fail_after(5):
        await upstream.wait_for_requests(upstream.request_count + 1)
    hung_up = Instant.now()
    await client.aclose()  # closes the socket before its first checkpoint
    await upstream_closed_soon_after(upstream.requests[-1], hung_up)


async def _send_post(proxy_url: str, body: dict) -> trio.SocketStream:
    """A raw `POST /v1/chat/completions` of `body`, on a connection the caller owns (and reads, or not)."""
    host, port = proxy_url.removeprefix("http://").split(":")
    client = await trio.open_tcp_stream(host, int(port))
    payload = orjson.dumps(body)
    await client.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return client


async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_cancelled(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    """hypercorn's writes cannot be cancelled; the kernel's write_timeout still ends them."""
    proxy = await serve_proxy(nursery, openai_upstream_config(upstream, server={"write_timeout": 0.5}))
    upstream.push(Reply(tokens=tuple("y" * 65536 for _ in range(400)), interval=0.001))
    stalled = await _send_post(proxy, {"model": "up/m", "messages": MESSAGES, "stream": True})
    # The client never reads: the proxy's buffers fill, its write stalls, and the kernel gives up.
    with trio.fail_after(15):
        await upstream.wait_for_requests(1)
        await upstream.requests[-1].disconnected.wait()
    assert not upstream.requests[-1].completed
    await stalled.aclose()
