"""
OpenAI's other endpoints end to end: `POST /v1/embeddings` and the legacy `POST /v1/completions`,
through the official openai SDK → trioproxy (hypercorn on 127.0.0.1:0) → a real scripted upstream.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import trio

from tests.conftest import (
    UPSTREAM_KEY,
    collect_into,
    hang_up_mid_stream,
    in_process,
    openai_sdk,
    openai_upstream_config,
    proxy_config,
    serve_proxy,
)
from trioproxy import Config, parse_config
from trioproxy.testing import FakeUpstream, Reply


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    """
    `up` and `claude` as in every e2e test; `flaky` retries once, then fails over to `up`;
    `picky` retries only a 429, fails over at once on any other failure, and continues a chat.
    """
    config = proxy_config(
        upstream,
        flaky={
            "type": "openai",
            "base_url": upstream.url + "/v1",
            "api_key_env": "UP_KEY",
            "retry": {"max_retries": 1, "base_delay_ms": 1, "max_delay_ms": 1},
            "fallbacks": ["up/backup-model"],
        },
        picky={
            "type": "openai",
            "base_url": upstream.url + "/v1",
            "api_key_env": "UP_KEY",
            "retry": {"max_retries": 1, "base_delay_ms": 1, "max_delay_ms": 1, "retry_on": ["rate_limit"]},
            "fallbacks": ["up/backup-model"],
            "continuation": "continue_final_message",
        },
    )
    return await serve_proxy(nursery, config)


# -- embeddings -------------------------------------------------------------------------------


async def test_embeddings_create_routes_by_model_and_returns_the_vectors(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    answer = await client.embeddings.create(model="up/embed-small", input=["hello", "hi"])

    assert [item.embedding for item in answer.data] == [[5.0, 0.0, 0.5], [2.0, 1.0, 0.5]]
    assert answer.model == "embed-small"
    assert answer.usage.prompt_tokens == 7
    sent = upstream.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.json == {"model": "embed-small", "input": ["hello", "hi"], "encoding_format": "base64"}
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_the_embeddings_answer_is_the_upstreams_byte_for_byte(proxy_url: str, upstream: FakeUpstream) -> None:
    body = {"model": "embed-small", "input": "one text", "dimensions": 3, "user": "u-1", "vendor_knob": [1, 2]}
    async with httpx.AsyncClient() as http:
        direct = await http.post(upstream.url + "/v1/embeddings", json=body)
        proxied = await http.post(proxy_url + "/v1/embeddings", json={**body, "model": "up/embed-small"})

    assert proxied.status_code == 200
    assert proxied.headers["content-type"] == "application/json"
    assert proxied.content == direct.content
    assert upstream.requests[-1].json == body  # every field as sent, only the model routed


async def test_embeddings_are_retried_then_failed_over_before_the_answer(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(status=503), Reply(status=429, headers={"retry-after": "0"}))
    answer = await client.embeddings.create(model="flaky/embed-small", input="x")

    assert answer.model == "backup-model"
    assert [r.json["model"] for r in upstream.requests] == ["embed-small", "embed-small", "backup-model"]


async def test_embeddings_for_an_anthropic_upstream_are_a_400_naming_why(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="claude/claude-test", input="x")

    assert "OpenAI-compatible upstreams only" in info.value.message
    assert info.value.body["param"] == "model"
    assert not upstream.requests


async def test_an_embeddings_request_without_input_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="up/embed-small", input=[])

    assert info.value.body["param"] == "input"


async def test_embeddings_usage_and_route_reach_the_metrics(client: openai.AsyncOpenAI, proxy_url: str) -> None:
    await client.embeddings.create(model="up/embed-small", input="x")

    async with httpx.AsyncClient() as http:
        metrics = (await http.get(proxy_url + "/metrics")).text
    assert 'trioproxy_tokens_total{direction="in",key="none",model="embed-small",provider="up"} 7.0' in metrics
    assert 'trioproxy_streams_total{outcome="completed",provider="up",route="/v1/embeddings"} 1.0' in metrics


# -- legacy completions -----------------------------------------------------------------------

PROMPT = "def fib(n):\n    "
SUFFIX = "\n    return a\n"
TOKENS = ("a, b", " = 0,", " 1", "\n    for _ in range(n):")


async def test_a_streamed_completion_is_the_upstreams_chunks_byte_for_byte(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    body = {"prompt": PROMPT, "suffix": SUFFIX, "stream": True, "max_tokens": 32, "temperature": 0, "n": 1}
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))
    async with httpx.AsyncClient() as http:
        direct = await http.post(upstream.url + "/v1/completions", json={**body, "model": "coder"})
        proxied = await http.post(proxy_url + "/v1/completions", json={**body, "model": "up/coder"})

    assert proxied.headers["content-type"].startswith("text/event-stream")
    assert same_but_id_and_time(proxied.content) == same_but_id_and_time(direct.content)
    assert proxied.content.endswith(b"data: [DONE]\n\n")
    sent = upstream.requests[-1].json
    assert sent == {**body, "model": "coder", "stream_options": {"include_usage": True}}


def same_but_id_and_time(stream: bytes) -> bytes:
    """A stream of the fake upstream with what differs from one answer to the next (its number, the time) blanked."""
    return re.sub(rb'"id":"cmpl-fake\d+","object":"text_completion","created":\d+', b"", stream)


async def test_completions_create_streams_a_fill_in_the_middle_request(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(12, 0)))
    stream = await client.completions.create(
        model="up/coder",
        prompt=PROMPT,
        suffix=SUFFIX,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"vendor_knob": 3},
    )
    chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(TOKENS)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert (chunks[-1].choices, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == ([], 12, 4)
    sent = upstream.requests[-1].json
    assert (sent["prompt"], sent["suffix"], sent["vendor_knob"], sent["model"]) == (PROMPT, SUFFIX, 3, "coder")


async def test_completions_create_without_stream_is_one_text_completion(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(12, 0)))
    completion = await client.completions.create(model="up/coder", prompt=PROMPT, suffix=SUFFIX, max_tokens=32)

    assert completion.object == "text_completion"
    assert completion.choices[0].text == "".join(TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 4)
    assert upstream.requests[-1].json["suffix"] == SUFFIX


async def test_a_completion_is_retried_before_its_first_token_and_fails_over(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(status=500), Reply(status=503), Reply(tokens=TOKENS))
    stream = await client.completions.create(model="flaky/coder", prompt=PROMPT, stream=True)
    chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(TOKENS)
    assert [r.json["model"] for r in upstream.requests] == ["coder", "coder", "backup-model"]


async def test_a_completion_failing_mid_stream_ends_with_an_error_not_done(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2))
    stream = await client.completions.create(model="up/coder", prompt=PROMPT, stream=True)
    with pytest.raises(openai.APIError, match="upstream failure"):
        async for _ in stream:
            pass


async def test_retry_on_decides_for_embeddings_and_completions_as_for_chat(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(
        Reply(status=503),
        Reply(),
        Reply(status=429, headers={"retry-after": "0"}),
        Reply(status=503),
        Reply(tokens=TOKENS),
    )
    embedded = await client.embeddings.create(model="picky/embed-small", input="x")
    stream = await client.completions.create(model="picky/coder", prompt=PROMPT, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])

    assert embedded.model == "backup-model"  # a 503 is not in its retry_on: the fallback at once
    assert text == "".join(TOKENS)
    assert [r.json["model"] for r in upstream.requests] == [
        "embed-small",
        "backup-model",
        "coder",  # 429: retried on its route
        "coder",  # 503: to the fallback
        "backup-model",
    ]


async def test_a_completion_broken_mid_stream_is_not_continued_as_a_chat(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2))
    stream = await client.completions.create(model="picky/coder", prompt=PROMPT, stream=True)
    chunks: list[openai.types.Completion] = []
    with pytest.raises(openai.APIError, match="upstream failure"):
        await collect_into(stream, chunks)

    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == "".join(TOKENS[:2])  # no text twice: a prompt is no chat to continue
    assert len(upstream.requests) == 1


async def test_a_completion_for_an_anthropic_upstream_is_a_400_naming_why(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="claude/claude-test", prompt=PROMPT, stream=True)

    assert "OpenAI-compatible upstreams only" in info.value.message
    assert not upstream.requests


async def test_disconnect_during_a_streamed_completion_cancels_the_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("x",) * 1000, interval=0.01))
    stream = await client.completions.create(model="up/coder", prompt=PROMPT, stream=True)
    await hang_up_mid_stream(stream, upstream)


def timed(upstream: FakeUpstream, **timeouts: float) -> Config:
    """`timed` at `upstream`, under `timeouts`."""
    return proxy_config(upstream, timed={"type": "openai", "base_url": upstream.url + "/v1", **timeouts})


async def test_a_completion_without_a_first_token_in_time_is_a_504(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=600))
    async with in_process(timed(upstream, first_token_timeout=1, heartbeat_interval=10)) as (_, client):
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="timed/coder", prompt=PROMPT, stream=True)

    assert info.value.status_code == 504
    assert info.value.body["code"] == "first_token_timeout"


async def test_heartbeats_keep_a_slow_completion_alive_then_its_timeout_is_in_stream(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=600))
    async with in_process(timed(upstream, first_token_timeout=3, heartbeat_interval=1)) as (_, client):
        response = await client.completions.with_raw_response.create(model="timed/coder", prompt=PROMPT, stream=True)
        body = (await response.http_response.aread()).decode()

    assert response.http_response.status_code == 200
    assert body.startswith(": keep-alive\n\n")
    assert '"code":"first_token_timeout"' in body
    assert "[DONE]" not in body


async def test_client_keys_and_limits_apply_to_embeddings_and_completions(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    config = openai_upstream_config(upstream, auth={"keys": ["key-a"]}, limits={"requests_per_minute": 2})
    proxy = await serve_proxy(nursery, config)
    async with (
        openai_sdk(proxy, "wrong") as stranger,
        openai_sdk(proxy, "key-a") as client,
    ):
        with pytest.raises(openai.AuthenticationError):
            await stranger.embeddings.create(model="up/embed", input="x")
        with pytest.raises(openai.AuthenticationError):
            await stranger.completions.create(model="up/coder", prompt=PROMPT)
        await client.embeddings.create(model="up/embed", input="x")
        await client.completions.create(model="up/coder", prompt=PROMPT)
        with pytest.raises(openai.RateLimitError) as info:
            await client.completions.create(model="up/coder", prompt=PROMPT, stream=True)

    assert info.value.response.headers["retry-after"]
    assert [r.path for r in upstream.requests] == ["/v1/embeddings", "/v1/completions"]


async def test_embeddings_and_completions_follow_aliases_patterns_and_the_default_provider(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    config = parse_config(
        {
            "retry": {"max_retries": 0},
            "default_provider": "up",
            "models": {"text-embedding-3-small": "up/embed-small", "qwen-coder-*": "local"},
            "providers": {
                "up": {"type": "openai", "base_url": upstream.url + "/v1", "headers": {"x-provider": "up"}},
                "local": {"type": "openai", "base_url": upstream.url + "/v1", "headers": {"x-provider": "local"}},
            },
        }
    )
    proxy = await serve_proxy(nursery, config)
    async with openai_sdk(proxy) as client:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
        await client.completions.create(model="qwen-coder-7b", prompt=PROMPT)
        await client.embeddings.create(model="bge-m3", input="x")

    sent = [(r.headers["x-provider"], r.json["model"]) for r in upstream.requests]
    assert sent == [("up", "embed-small"), ("local", "qwen-coder-7b"), ("up", "bge-m3")]
