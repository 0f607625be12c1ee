"""
OpenAI's other endpoints end to end: `POST /v1/embeddings` and the legacy `POST /v1/completions`,
through the official openai SDK → trioproxy (hypercorn on 127.0.0.1:0) → a real scripted upstream.
"""

from __future__ import annotations

from functools import partial

import httpx
import openai
import orjson
import pytest
import trio

from trioproxy import parse_config, serve
from trioproxy.testing import FakeUpstream, Reply

from tests.conftest import UPSTREAM_KEY, proxy_config


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    """`up` and `claude` as in every e2e test; `flaky` retries once, then fails over to `up`."""
    config = proxy_config(
        upstream,
        flaky={
            "type": "openai",
            "base_url": upstream.url + "/v1",
            "api_key_env": "UP_KEY",
            "retry": {"max_retries": 1, "base_delay_ms": 1, "max_delay_ms": 1},
            "fallbacks": ["up/backup-model"],
        },
    )
    binds = await nursery.start(partial(serve, config, host="127.0.0.1", port=0))
    return binds[0]


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
    assert 'trioproxy_tokens_total{direction="in",model="embed-small",provider="up"} 7.0' in metrics
    assert 'trioproxy_streams_total{outcome="completed",provider="up",route="/v1/embeddings"} 1.0' in metrics
