"""
What a streaming client sees when a stream fails before its first token, with the official
openai SDK as the client: an HTTP status and the protocol's error body (so the SDK raises its
typed error), not a 200 with a role chunk and then an in-stream error. Only a heartbeat that
had to be sent while waiting commits the 200; then the error comes in the stream.

Timing tests run the app in-process on trio's MockClock; the others on real hypercorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio

from tests.conftest import chat_text, free_port, in_process, openai_sdk, proxy_config, serve_proxy
from trioproxy import Config, SSEDecoder, StreamEvent, parse_config
from trioproxy.testing import FakeUpstream, Reply

MESSAGES = [{"role": "user", "content": "go"}]


def simulated(**sim: Any) -> Config:
    """One simulated provider `sim`, configured by `sim`, no retries."""
    return parse_config(
        {"retry": {"max_retries": 0}, "providers": {"sim": {"type": "simulated", "token_interval_ms": 0, **sim}}},
        environ={},
    )


async def test_a_first_token_timeout_before_any_heartbeat_is_a_504(autojump_clock: trio.abc.Clock) -> None:
    async with in_process(simulated(ttft_ms=5000, first_token_timeout=1, heartbeat_interval=10)) as (http, client):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="sim/echo", messages=MESSAGES, stream=True)
        assert info.value.status_code == 504
        assert info.value.body["code"] == "first_token_timeout"
        assert info.value.body["message"] == "the upstream sent no first token within first_token_timeout (1 s)"

        # The generic endpoints too: one `error` event with the status, no `stream_start` before it.
        body = {"model": "sim/echo", "messages": MESSAGES}
        for path in ("/v1/chat/stream/json", "/v1/chat/stream"):
            response = await http.post(path, json=body)
            assert response.status_code == 504, path
            assert "stream_start" not in response.text
            assert "first_token_timeout" in response.text


async def test_heartbeats_flow_during_a_long_first_token_and_then_the_timeout_is_in_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with in_process(simulated(ttft_ms=10_000, first_token_timeout=3.5, heartbeat_interval=1)) as (http, client):
        stream = await client.chat.completions.create(model="sim/echo", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
        assert "first_token_timeout" in info.value.message

        body = {"model": "sim/echo", "messages": MESSAGES, "stream": True}
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    text = response.text
    assert text.count(": keep-alive\n\n") == 3
    # The held role chunk comes first, before the first keep-alive; the error is the last word.
    assert text.index('"role":"assistant"') < text.index(": keep-alive")
    events = [e.data for e in SSEDecoder().feed(response.content)]
    assert orjson.loads(events[-1])["error"]["code"] == "first_token_timeout"
    assert "[DONE]" not in events


async def test_a_stream_that_starts_in_time_still_carries_its_role_chunk_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with in_process(simulated(ttft_ms=500, first_token_timeout=1, heartbeat_interval=10)) as (_, client):
        stream = await client.chat.completions.create(model="sim/echo", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chat_text(chunks) == "go"


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    config = proxy_config(
        upstream,
        guarded={
            "type": "simulated",
            "ttft_ms": 0,
            "token_interval_ms": 0,
            "validators": [{"type": "banned_phrases", "phrases": ["forbidden"]}],
        },
        broken={"type": "simulated", "ttft_ms": 0, "fail_after_tokens": 0},
        gone={"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "fallbacks": ["up/backup"]},
    )
    return await serve_proxy(nursery, config)


@pytest.fixture
async def sdk(proxy: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_sdk(proxy) as client:
        yield client


async def test_a_validator_refusing_the_first_chunk_is_a_422(sdk: openai.AsyncOpenAI, proxy: str) -> None:
    prompt = [{"role": "user", "content": "forbidden fruit"}]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        await sdk.chat.completions.create(model="guarded/echo", messages=prompt, stream=True)
    assert info.value.body["type"] == "validation_error"
    assert "banned phrase" in info.value.body["message"]

    body = {"model": "guarded/echo", "messages": prompt}
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/chat/stream/json", json=body)
    assert response.status_code == 422
    (event,) = [StreamEvent.from_json(line) for line in response.text.splitlines()]
    assert event.type == "error"
    assert event.data["type"] == "validation_error"


async def test_an_upstream_error_after_its_200_but_before_a_token_is_an_http_status(
    sdk: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="broken/echo", messages=MESSAGES, stream=True)
    assert info.value.status_code == 500
    assert "simulated failure after 0 tokens" in info.value.body["message"]


async def test_a_failover_that_fails_names_every_route_tried(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.push(Reply(status=503, error_message="backup is overloaded"))
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="gone/m", messages=MESSAGES, stream=True)
    assert info.value.status_code == 503  # the last failure's status
    message = info.value.body["message"]
    assert message.startswith("all 2 routes failed: ")
    assert "gone/m: cannot connect to the upstream" in message
    assert "up/backup: " in message
    assert "backup is overloaded" in message

    upstream.push(Reply(status=503, error_message="backup is overloaded"))
    with pytest.raises(openai.InternalServerError) as again:
        await sdk.chat.completions.create(model="gone/m", messages=MESSAGES)
    assert again.value.body["message"] == message


async def test_an_upstream_that_sends_only_content_less_chunks_is_not_held_back_without_bound(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    role_chunk = b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",' + (
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    )
    upstream.push(Reply(raw_body=role_chunk * 40, stall_after=0))
    with trio.fail_after(5):  # not first_token_timeout (120 s): a bounded number of them starts the response
        stream = await sdk.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
        first = await stream.__anext__()
        await stream.close()
    assert first.choices[0].delta.role == "assistant"


async def test_on_the_generic_endpoints_a_failover_event_starts_the_stream(proxy: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(status=503, error_message="backup is overloaded"))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/chat/stream/json", json={"model": "gone/m", "messages": MESSAGES})
    assert response.status_code == 200  # the client was shown the failover: the error comes in the stream
    events = [StreamEvent.from_json(line) for line in response.text.splitlines()]
    assert [(e.type, e.data) for e in events[:-1]] == [("metadata", "failover")]
    assert events[-1].type == "error"
    assert events[-1].data["status"] == 503
    assert events[-1].data["message"].startswith("all 2 routes failed: gone/m: ")
