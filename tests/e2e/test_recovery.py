"""
Recovery instead of failure (issue 13), end to end: the official SDKs and plain HTTP against a
real proxy and the scripted `FakeUpstream` on loopback. Each case ends with its defined
outcome: the canonical text exactly once, or an honest error; and no upstream request is left
open behind it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest
import trio

from tests.conftest import collect_into, wait_until
from tests.e2e.test_observability import scrape_until, value
from trioproxy import create_app, parse_config, serve
from trioproxy.testing import FakeUpstream, Reply, open_fake_upstream

MESSAGES = [{"role": "user", "content": "go"}]
TOKENS = ("The", " canonical", " answer", ".")
CHAT = "/v1/chat/completions"


def chunk(content: str | None = None, finish_reason: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream, **providers: dict[str, Any]) -> str:
    """A proxy whose `up` (OpenAI format) and `claude` (Anthropic format) point at `upstream`, plus `providers`."""
    tables = {
        "up": {"type": "openai", "base_url": upstream.url + "/v1"},
        "claude": {"type": "anthropic", "base_url": upstream.url},
    }
    for name, table in providers.items():
        tables[name] = {**tables.get(name, {}), **table}
    config = parse_config({"retry": {"max_retries": 0}, "providers": tables}, environ={})
    return (await nursery.start(partial(serve, config, host="127.0.0.1", port=0)))[0]


async def test_a_malformed_event_is_skipped_when_the_provider_says_so_counted_and_logged(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    proxy = await start_proxy(nursery, upstream, up={"skip_malformed_events": True})
    body = chunk("one") + b"data: {not json\n\n" + chunk(" two") + chunk(finish_reason="stop") + b"data: [DONE]\n\n"
    upstream.push(Reply(raw_body=body))
    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="k", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "one two"

    samples = await scrape_until(
        proxy, lambda s: value(s, "trioproxy_recoveries_total", provider="up", kind="skipped_event") == 1
    )
    assert value(samples, "trioproxy_streams_total", route=CHAT, provider="up", outcome="completed") == 1
    await wait_until(lambda: any(r.name == "trioproxy.access" for r in caplog.records))
    (line,) = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    assert line["skipped_events"] == 1
    assert line["request_id"]


async def test_without_the_setting_a_malformed_event_ends_the_stream_honestly(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(raw_body=chunk("one") + b"data: {not json\n\n" + chunk(" two") + chunk(finish_reason="stop")))
    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="k", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
    assert "not JSON" in info.value.message


async def test_the_generic_endpoints_announce_a_skipped_event(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(nursery, upstream, up={"skip_malformed_events": True})
    upstream.push(Reply(raw_body=chunk("one") + b"data: [1, 2]\n\n" + chunk(finish_reason="stop")))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/chat/stream/json", json={"model": "up/m", "messages": MESSAGES})
    events = [orjson.loads(line) for line in response.text.splitlines()]
    skipped = [e for e in events if e["type"] == "metadata" and e["data"] == "skipped_event"]
    assert len(skipped) == 1
    assert "not a JSON object" in skipped[0]["metadata"]["reason"]
    assert events[-1]["type"] == "done"


@asynccontextmanager
async def in_process(tables: dict[str, dict[str, Any]], **policy: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    """
    The app on the current (mock) clock, its upstreams real `FakeUpstream`s on loopback: the
    timeouts pass on trio's MockClock, the upstream requests are real HTTP on real sockets.
    """
    config = parse_config({"retry": {"max_retries": 0}, **policy, "providers": tables}, environ={})
    app = create_app(config)
    async with app.test_app():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")
        async with openai.AsyncOpenAI(
            base_url="http://proxy.test/v1", api_key="k", max_retries=0, http_client=http
        ) as client:
            # The SDK's first request looks up the platform in a worker thread, while the
            # MockClock jumps ahead: done here, the time a test measures is the proxy's only.
            await client.models.list()
            yield client


async def open_upstreams(nursery: trio.Nursery, n: int) -> list[FakeUpstream]:
    return [await open_fake_upstream(nursery) for _ in range(n)]


async def collect(client: openai.AsyncOpenAI, model: str) -> str:
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_route_that_never_answers_is_left_for_the_fallback_after_one_first_token_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(headers_delay=1000))  # no response at all
    backup.push(Reply(tokens=TOKENS))
    tables = {
        "primary": {"type": "openai", "base_url": primary.url + "/v1", "fallbacks": ["backup/m"]},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with in_process(tables, timeouts={"first_token_timeout": 5}, retry={"max_retries": 2}) as client:
        start = trio.current_time()
        assert await collect(client, "primary/m") == "".join(TOKENS)
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)  # one timeout, no retry, no backoff
    assert primary.request_count == 1
    assert primary.requests[0].disconnected.is_set()  # the request that lost was cancelled


async def test_a_refused_connection_goes_to_the_fallback_at_once(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    (backup,) = await open_upstreams(nursery, 1)
    closed = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = closed.socket.getsockname()[1]
    await closed.aclose()
    backup.push(Reply(tokens=TOKENS))
    tables = {
        "gone": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "fallbacks": ["backup/m"]},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with in_process(tables, retry={"max_retries": 2, "base_delay_ms": 1000}) as client:
        start = trio.current_time()
        assert await collect(client, "gone/m") == "".join(TOKENS)
        assert trio.current_time() - start < 0.1


async def test_a_5xx_is_retried_with_its_retry_after_before_the_fallback(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(status=503, headers={"retry-after": "3"}), Reply(tokens=TOKENS))
    tables = {
        "primary": {"type": "openai", "base_url": primary.url + "/v1", "fallbacks": ["backup/m"]},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with in_process(tables, retry={"max_retries": 2, "base_delay_ms": 10}) as client:
        start = trio.current_time()
        assert await collect(client, "primary/m") == "".join(TOKENS)
        assert trio.current_time() - start == pytest.approx(3, abs=0.1)
    assert (primary.request_count, backup.request_count) == (2, 0)


async def test_a_content_filter_refusal_is_neither_retried_nor_failed_over(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(status=400, error_message="the prompt was filtered"))
    tables = {
        "primary": {"type": "openai", "base_url": primary.url + "/v1", "fallbacks": ["backup/m"]},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with in_process(tables, retry={"max_retries": 2}) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await collect(client, "primary/m")
    assert "filtered" in info.value.message
    assert (primary.request_count, backup.request_count) == (1, 0)


async def test_a_first_token_after_20_s_is_hedged_and_the_slow_request_cancelled(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(tokens=("slow",), ttft=20))
    backup.push(Reply(tokens=TOKENS, ttft=0.5))
    tables = {
        "primary": {"type": "openai", "base_url": primary.url + "/v1", "fallbacks": ["backup/m"], "hedge_after": 3},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with in_process(tables) as client:
        start = trio.current_time()
        assert await collect(client, "primary/m") == "".join(TOKENS)
        assert trio.current_time() - start == pytest.approx(3.5, abs=0.1)
        assert primary.requests[0].disconnected_at == pytest.approx(start + 3.5, abs=0.1)  # cancelled at once
        assert not backup.requests[0].disconnected.is_set()

        # The generic endpoints announce the hedge and who won; the metrics count it.
        primary.push(Reply(tokens=("slow",), ttft=20))
        backup.push(Reply(tokens=TOKENS, ttft=0.5))
        response = await client._client.post(
            "http://proxy.test/v1/chat/stream/json", json={"model": "primary/m", "messages": MESSAGES}
        )
        events = [orjson.loads(line) for line in response.text.splitlines()]
        announced = [(e["data"], e["metadata"]["provider"]) for e in events if e["type"] == "metadata"]
        assert ("hedge", "backup") in announced
        assert ("hedge_won", "backup") in announced
        assert "".join(e["data"] for e in events if e["type"] == "token") == "".join(TOKENS)
        metrics = (await client._client.get("http://proxy.test/metrics")).text
    assert 'trioproxy_recoveries_total{kind="hedge",provider="primary"} 2.0' in metrics


@pytest.mark.parametrize("refusing", ["up", "claude"])
async def test_context_length_exceeded_goes_to_the_larger_model(nursery: trio.Nursery, refusing: str) -> None:
    small, large = await open_upstreams(nursery, 2)
    message = (
        "prompt is too long: 9000 tokens > 8192 maximum"
        if refusing == "claude"
        else ("This model's maximum context length is 8192 tokens. However, you requested 9000 tokens.")
    )
    small.push(Reply(status=400, error_message=message))
    large.push(Reply(tokens=TOKENS))
    proxy = await start_proxy(
        nursery,
        small,
        up={"context_fallbacks": ["big/m-128k"], "fallbacks": ["claude/m"], "retry": {"max_retries": 2}},
        claude={"context_fallbacks": ["big/m-128k"], "fallbacks": ["up/m"]},
        big={"type": "openai", "base_url": large.url + "/v1"},
    )
    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="k", max_retries=0) as client:
        assert await collect(client, f"{refusing}/m") == "".join(TOKENS)
    assert small.request_count == 1  # never resent to the route that refused, nor to its ordinary fallback
    assert large.requests[0].json["model"] == "m-128k"


# --- the fault matrix after the first token: continuation ------------------------------------

CANONICAL = tuple(f" w{i}" if i % 7 else f" w{i}." for i in range(60))
"""60 tokens of canonical text, some ending a sentence."""

VLLM = {"type": "openai", "continuation": "continue_final_message"}


def continuing_upstream(**fault: Any) -> tuple[Reply, Reply]:
    """The broken reply, then one that continues whatever prefix it is given."""
    return Reply(tokens=CANONICAL, **fault), Reply(tokens=CANONICAL, continues=True)


MID_STREAM_FAULTS = {
    "cut after 40 of 60 tokens": {"reset_after": 40},
    "stall after 20 tokens": {"stall_after": 20},
    "in-stream overloaded_error after 30 tokens": {"error_after": 30},
}


@pytest.mark.parametrize("fault", list(MID_STREAM_FAULTS))
@pytest.mark.parametrize("provider", ["claude", "vllm"])
async def test_a_stream_broken_mid_way_is_continued_seamlessly(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, provider: str, fault: str
) -> None:
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(*continuing_upstream(**MID_STREAM_FAULTS[fault]))
    base_url = upstream.url if provider == "claude" else upstream.url + "/v1"
    tables = {
        "claude": {"type": "anthropic", "base_url": base_url},
        "vllm": {**VLLM, "base_url": base_url},
    }
    async with in_process(tables, timeouts={"silence_timeout": 5}) as client:
        start = trio.current_time()
        assert await collect(client, f"{provider}/m") == "".join(CANONICAL)
        assert trio.current_time() - start <= 5.1  # at most one silence_timeout
    broken, continued = upstream.requests
    if "stall_after" in MID_STREAM_FAULTS[fault]:
        assert broken.disconnected.is_set()  # the silent request was cancelled, its connection closed
    last = continued.json["messages"][-1]
    delivered = "".join(CANONICAL[: broken.tokens_sent])
    content = last["content"] if isinstance(last["content"], str) else last["content"][0]["text"]
    assert last["role"] == "assistant"
    assert content == (delivered.rstrip() if provider == "claude" else delivered)
    if provider == "vllm":
        assert (continued.json["continue_final_message"], continued.json["add_generation_prompt"]) == (True, False)


async def test_a_malformed_tenth_event_is_continued(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    (upstream,) = await open_upstreams(nursery, 1)
    nine = b"".join(chunk(token) for token in CANONICAL[:9])
    upstream.push(Reply(raw_body=nine + b"data: {not json\n\n"), Reply(tokens=CANONICAL, continues=True))
    tables = {"vllm": {**VLLM, "base_url": upstream.url + "/v1"}}
    async with in_process(tables) as client:
        assert await collect(client, "vllm/m") == "".join(CANONICAL)
    assert upstream.requests[1].json["messages"][-1]["content"] == "".join(CANONICAL[:9])


async def test_a_fallback_that_rejects_prefill_leaves_the_client_the_original_failure(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(tokens=CANONICAL, reset_after=40))
    backup.push(Reply(refuse_continuation=True))
    tables = {
        "primary": {"type": "openai", "base_url": primary.url + "/v1", "fallbacks": ["backup/m"]},
        "backup": {"type": "anthropic", "base_url": backup.url},
    }
    async with in_process(tables) as client:
        stream = await client.chat.completions.create(model="primary/m", messages=MESSAGES, stream=True)
        chunks: list[openai.types.chat.ChatCompletionChunk] = []
        with pytest.raises(openai.APIError) as info:
            await collect_into(stream, chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(CANONICAL[:40])
    assert "connection broke" in info.value.message
    assert "prefill" not in info.value.message
    assert f"after {len(''.join(CANONICAL[:40]))} characters were delivered" in info.value.message
    assert backup.request_count == 1  # asked once; the refusal is remembered for continuation_cooldown


async def test_the_generic_endpoints_announce_a_continuation(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(*continuing_upstream(reset_after=10))
    async with in_process({"vllm": {**VLLM, "base_url": upstream.url + "/v1"}}) as client:
        response = await client._client.post(
            "http://proxy.test/v1/chat/stream/json", json={"model": "vllm/m", "messages": MESSAGES}
        )
    events = [orjson.loads(line) for line in response.text.splitlines()]
    (notice,) = [e for e in events if e["type"] == "metadata" and e["data"] == "continuation"]
    assert notice["metadata"]["provider"] == "vllm"
    assert "connection broke" in notice["metadata"]["reason"]
    assert "".join(e["data"] for e in events if e["type"] == "token") == "".join(CANONICAL)
    (done,) = [e for e in events if e["type"] == "done"]
    assert done["metadata"]["usage"]["estimated"] is True  # both attempts, the broken one estimated


@pytest.mark.parametrize("provider", ["claude", "vllm"])
async def test_an_anthropic_client_gets_one_seamless_message(nursery: trio.Nursery, provider: str) -> None:
    """From an Anthropic upstream its events pass through, then the continuation's are rendered; from vLLM, all are."""
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(*continuing_upstream(reset_after=40))
    proxy = await start_proxy(nursery, upstream, vllm={**VLLM, "base_url": upstream.url + "/v1"})
    async with (
        anthropic.AsyncAnthropic(base_url=proxy, api_key="k", max_retries=0) as client,
        client.messages.stream(model=f"{provider}/m", max_tokens=100, messages=MESSAGES) as stream,
    ):
        message = await stream.get_final_message()
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "".join(CANONICAL)
    assert message.stop_reason == "end_turn"


# --- several targets per provider, balanced and circuit-broken ---------------------------------


async def test_one_of_three_replicas_down_is_skipped_once_its_breaker_opens(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    down, up1, up2 = await open_upstreams(nursery, 3)
    for upstream in (down, up1, up2):
        upstream._replies = Reply(status=503) if upstream is down else Reply(tokens=TOKENS)  # every request
    tables = {
        "vllm": {
            "type": "openai",
            "base_urls": [down.url + "/v1", up1.url + "/v1", up2.url + "/v1"],
            "breaker": {"failures": 2, "cooldown": 60},
            "retry": {"max_retries": 2, "base_delay_ms": 10},
        }
    }
    async with in_process(tables) as client:
        for _ in range(12):
            assert await collect(client, "vllm/m") == "".join(TOKENS)
        assert down.request_count == 2  # then skipped: no request reaches it during the cooldown
        assert up1.request_count >= 4
        assert up2.request_count >= 4  # the healthy ones share the load

        health = (await client._client.get("http://proxy.test/health")).json()
        states = {t["url"]: t["state"] for t in health["providers"]["vllm"]["targets"]}
        assert states == {down.url + "/v1": "open", up1.url + "/v1": "closed", up2.url + "/v1": "closed"}
        metrics = (await client._client.get("http://proxy.test/metrics")).text
    assert f'trioproxy_target_state{{provider="vllm",state="open",target="{down.url}/v1"}} 1.0' in metrics
    assert f'trioproxy_breaker_transitions_total{{provider="vllm",state="open",target="{down.url}/v1"}} 1.0' in metrics


async def test_a_primary_down_then_healthy_again_is_skipped_then_probed_back(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    primary, backup = await open_upstreams(nursery, 2)
    primary._replies = Reply(status=502)
    backup._replies = Reply(tokens=("from", " backup"))
    tables = {
        "primary": {
            "type": "openai",
            "base_url": primary.url + "/v1",
            "fallbacks": ["backup/m"],
            "breaker": {"failures": 2, "cooldown": 30},
        },
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with in_process(tables) as client:
        for _ in range(5):
            assert await collect(client, "primary/m") == "from backup"
        assert primary.request_count == 2  # then straight to the fallback

        primary._replies = Reply(tokens=("from", " primary"))  # healthy again
        await trio.sleep(30)
        assert await collect(client, "primary/m") == "from primary"  # the probe
        assert await collect(client, "primary/m") == "from primary"
    lines = [r.fields for r in caplog.records if r.name == "trioproxy.access" and r.fields["route"] == CHAT]  # type: ignore[attr-defined]
    # every attempt shows under its request's id: the first two tried the primary, then failed over
    assert [(line.get("attempts"), line.get("failovers")) for line in lines] == [(2, 1)] * 5 + [(None, None)] * 2
    assert all(line["request_id"] for line in lines)
    transitions = [t for line in lines for t in line.get("breaker_transitions", [])]
    assert len(transitions) == 2
    assert "is open" in transitions[0]
    assert "is closed" in transitions[1]


async def test_an_anthropic_client_gets_the_hedges_message_alone(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    slow, fast = await open_upstreams(nursery, 2)
    slow.push(Reply(tokens=("slow",), ttft=20))
    fast.push(Reply(tokens=TOKENS, ttft=0.5))
    tables = {
        "slow": {"type": "anthropic", "base_url": slow.url, "fallbacks": ["fast/m"], "hedge_after": 3},
        "fast": {"type": "anthropic", "base_url": fast.url},
    }
    app = create_app(parse_config({"providers": tables}, environ={}))
    async with app.test_app():
        # The anthropic SDK brings its own copy of httpx, as `httpx2`.
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://proxy.test")
        async with anthropic.AsyncAnthropic(base_url="http://proxy.test", api_key="k", http_client=http) as client:
            await client.models.list()  # the SDK's first request looks up the platform in a thread
            start = trio.current_time()
            async with client.messages.stream(model="slow/m", max_tokens=100, messages=MESSAGES) as stream:
                message = await stream.get_final_message()
            assert trio.current_time() - start == pytest.approx(3.5, abs=0.1)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "".join(TOKENS)
    assert slow.requests[0].disconnected.is_set()


async def test_a_non_streaming_answer_is_continued_too(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(*continuing_upstream(reset_after=25))
    async with in_process({"claude": {"type": "anthropic", "base_url": upstream.url}}) as client:
        completion = await client.chat.completions.create(model="claude/m", messages=MESSAGES)
    assert completion.choices[0].message.content == "".join(CANONICAL)
    assert upstream.request_count == 2
