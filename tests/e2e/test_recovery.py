"""
Recovery instead of failure (issue 13), end to end: the official SDKs and plain HTTP against a
real proxy and the scripted `FakeUpstream` on loopback. Each case ends with its defined
outcome: the canonical text exactly once, or an honest error; and no upstream request is left
open behind it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest
import trio
import trio_websocket

from tests.conftest import (
    anthropic_sdk,
    chat_text,
    collect_into,
    free_port,
    in_process,
    openai_sdk,
    serve_proxy,
    streamed_chat_text,
    wait_until,
)
from tests.e2e.test_observability import fingerprint, scrape_until, value
from tests.e2e.test_openai_responses import one_response, ws_url
from trioproxy import Config, create_app, parse_config
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
    return await serve_proxy(nursery, config)


async def sdk_stream_events(manager: Any, into: list[Any]) -> None:
    """Open an SDK's stream helper (`responses.stream`, `messages.stream`) and keep its events in `into`."""
    async with manager as stream:
        await collect_into(stream, into)


def text_of_messages_events(events: list[Any]) -> str:
    return "".join(event.delta.text for event in events if event.type == "content_block_delta")


async def test_a_malformed_event_is_skipped_when_the_provider_says_so_counted_and_logged(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    proxy = await start_proxy(nursery, upstream, up={"skip_malformed_events": True})
    body = chunk("one") + b"data: {not json\n\n" + chunk(" two") + chunk(finish_reason="stop") + b"data: [DONE]\n\n"
    upstream.push(Reply(raw_body=body))
    async with openai_sdk(proxy) as sdk:
        stream = await sdk.chat.completions.create(model="up/m", messages=MESSAGES, stream=True)
        text = await streamed_chat_text(stream)
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
    async with openai_sdk(proxy) as sdk:
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


def recovery_config(tables: dict[str, dict[str, Any]], **policy: Any) -> Config:
    """The providers `tables` under `policy`, no retries unless it says so."""
    return parse_config({"retry": {"max_retries": 0}, **policy, "providers": tables}, environ={})


@asynccontextmanager
async def proxied(tables: dict[str, dict[str, Any]], **policy: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    """
    The app in process (`in_process`), its upstreams real `FakeUpstream`s on loopback: the
    timeouts pass on trio's MockClock, the upstream requests are real HTTP on real sockets.
    """
    async with in_process(recovery_config(tables, **policy)) as (_, client):
        # The SDK's first request looks up the platform in a worker thread, while the
        # MockClock jumps ahead: done here, the time a test measures is the proxy's only.
        await client.models.list()
        yield client


@asynccontextmanager
async def proxied_anthropic(
    tables: dict[str, dict[str, Any]], **policy: Any
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """`proxied`, with the anthropic SDK as the client (it brings its own copy of httpx, as `httpx2`)."""
    app = create_app(recovery_config(tables, **policy))
    async with (
        app.test_app(),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://proxy.test") as http,
        anthropic.AsyncAnthropic(base_url="http://proxy.test", api_key="k", max_retries=0, http_client=http) as client,
    ):
        await client.models.list()  # the SDK's first request looks up the platform in a thread
        yield client


async def open_upstreams(nursery: trio.Nursery, n: int) -> list[FakeUpstream]:
    return [await open_fake_upstream(nursery) for _ in range(n)]


def failing_over(primary: FakeUpstream, backup: FakeUpstream, **settings: Any) -> dict[str, dict[str, Any]]:
    """Provider tables: `primary` (OpenAI format, with `settings`) falling back to `backup` (OpenAI format)."""
    return {
        "primary": {"type": "openai", "base_url": primary.url + "/v1", "fallbacks": ["backup/m"], **settings},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }


async def collect(client: openai.AsyncOpenAI, model: str) -> str:
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    return await streamed_chat_text(stream)


async def test_a_route_that_never_answers_is_left_for_the_fallback_after_one_first_token_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(headers_delay=1000))  # no response at all
    backup.push(Reply(tokens=TOKENS))
    tables = failing_over(primary, backup)
    async with proxied(tables, timeouts={"first_token_timeout": 5}, retry={"max_retries": 2}) as client:
        start = trio.current_time()
        assert await collect(client, "primary/m") == "".join(TOKENS)
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)  # one timeout, no retry, no backoff
    assert primary.request_count == 1
    assert primary.requests[0].disconnected.is_set()  # the request that lost was cancelled


async def test_a_refused_connection_goes_to_the_fallback_at_once(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    (backup,) = await open_upstreams(nursery, 1)
    backup.push(Reply(tokens=TOKENS))
    tables = {
        "gone": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "fallbacks": ["backup/m"]},
        "backup": {"type": "openai", "base_url": backup.url + "/v1"},
    }
    async with proxied(tables, retry={"max_retries": 2, "base_delay_ms": 1000}) as client:
        start = trio.current_time()
        assert await collect(client, "gone/m") == "".join(TOKENS)
        assert trio.current_time() - start < 0.1


async def test_a_5xx_is_retried_with_its_retry_after_before_the_fallback(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(status=503, headers={"retry-after": "3"}), Reply(tokens=TOKENS))
    tables = failing_over(primary, backup)
    async with proxied(tables, retry={"max_retries": 2, "base_delay_ms": 10}) as client:
        start = trio.current_time()
        assert await collect(client, "primary/m") == "".join(TOKENS)
        assert trio.current_time() - start == pytest.approx(3, abs=0.1)
    assert (primary.request_count, backup.request_count) == (2, 0)


async def test_a_content_filter_refusal_is_neither_retried_nor_failed_over(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    primary.push(Reply(status=400, error_message="the prompt was filtered"))
    tables = failing_over(primary, backup)
    async with proxied(tables, retry={"max_retries": 2}) as client:
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
    tables = failing_over(primary, backup, hedge_after=3)
    async with proxied(tables) as client:
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
    async with openai_sdk(proxy) as client:
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
    async with proxied(tables, timeouts={"silence_timeout": 5}) as client:
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
    async with proxied(tables) as client:
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
    async with proxied(tables) as client:
        stream = await client.chat.completions.create(model="primary/m", messages=MESSAGES, stream=True)
        chunks: list[openai.types.chat.ChatCompletionChunk] = []
        with pytest.raises(openai.APIError) as info:
            await collect_into(stream, chunks)
    assert chat_text(chunks) == "".join(CANONICAL[:40])
    assert "connection broke" in info.value.message
    assert "prefill" not in info.value.message
    assert f"after {len(''.join(CANONICAL[:40]))} characters were delivered" in info.value.message
    assert backup.request_count == 1  # asked once; the refusal is remembered for continuation_cooldown


async def test_the_generic_endpoints_announce_a_continuation(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(*continuing_upstream(reset_after=10))
    async with proxied({"vllm": {**VLLM, "base_url": upstream.url + "/v1"}}) as client:
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
        anthropic_sdk(proxy) as client,
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
    down = await open_fake_upstream(nursery, Reply(status=503))  # every request
    up1, up2 = [await open_fake_upstream(nursery, Reply(tokens=TOKENS)) for _ in range(2)]
    tables = {
        "vllm": {
            "type": "openai",
            "base_urls": [down.url + "/v1", up1.url + "/v1", up2.url + "/v1"],
            "breaker": {"failures": 2, "cooldown": 60},
            "retry": {"max_retries": 2, "base_delay_ms": 10},
        }
    }
    async with proxied(tables) as client:
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
    primary.replies = Reply(status=502)
    backup.replies = Reply(tokens=("from", " backup"))
    tables = failing_over(primary, backup, breaker={"failures": 2, "cooldown": 30})
    async with proxied(tables) as client:
        for _ in range(5):
            assert await collect(client, "primary/m") == "from backup"
        assert primary.request_count == 2  # then straight to the fallback

        primary.replies = Reply(tokens=("from", " primary"))  # healthy again
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
    async with proxied_anthropic(tables) as client:
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
    async with proxied({"claude": {"type": "anthropic", "base_url": upstream.url}}) as client:
        completion = await client.chat.completions.create(model="claude/m", messages=MESSAGES)
    assert completion.choices[0].message.content == "".join(CANONICAL)
    assert upstream.request_count == 2


async def test_usage_per_key_counts_a_continued_and_a_hedged_stream(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """
    A continued stream's usage is both attempts' (the broken one's estimated), under the
    provider that continued it; a hedged one's is the winner's: so it is counted per client key.
    """
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    broken, slow, fast = await open_upstreams(nursery, 3)
    broken.push(Reply(tokens=CANONICAL, reset_after=40), Reply(tokens=CANONICAL, continues=True, usage=(30, 0)))
    slow.push(Reply(tokens=("slow",), ttft=20))
    fast.push(Reply(tokens=TOKENS, ttft=0.5, usage=(9, 0)))
    tables = {
        "vllm": {**VLLM, "base_url": broken.url + "/v1"},
        "primary": {"type": "openai", "base_url": slow.url + "/v1", "fallbacks": ["backup/m"], "hedge_after": 3},
        "backup": {"type": "openai", "base_url": fast.url + "/v1"},
    }
    async with proxied(tables, auth={"keys": ["k"]}) as client:
        assert await collect(client, "vllm/m") == "".join(CANONICAL)
        assert await collect(client, "primary/m") == "".join(TOKENS)
        scraped = await client._client.get("http://proxy.test/metrics", headers={"authorization": "Bearer k"})
    key = fingerprint("k")
    delivered = -(-len("".join(CANONICAL[:40])) // 4)  # the broken attempt's tokens, estimated
    expected = {
        ("vllm", "in"): 30 + max(30 - delivered, 0),  # the prompt without the delivered text
        ("vllm", "out"): (60 - 40) + delivered,
        ("backup", "in"): 9,
        ("backup", "out"): len(TOKENS),
    }
    for (provider, direction), count in expected.items():
        sample = f'trioproxy_tokens_total{{direction="{direction}",key="{key}",model="m",provider="{provider}"}}'
        assert f"{sample} {float(count)}" in scraped.text
    assert not re.search(r'trioproxy_tokens_total\{[^}]*provider="primary"', scraped.text)  # the hedge's loser
    records = [r for r in caplog.records if r.name == "trioproxy.access"]
    lines = [r.fields for r in records if r.fields["route"] == CHAT]  # type: ignore[attr-defined]
    assert [(f["key"], f["attempts"], f["tokens_in"], f["tokens_out"]) for f in lines] == [
        (key, 2, expected["vllm", "in"], expected["vllm", "out"]),
        (key, 2, 9, len(TOKENS)),
    ]
    assert (lines[0]["continuations"], lines[1]["hedges"]) == (1, 1)


# --- every front: the Responses API and Anthropic Messages ------------------------------------

RESPONSES = {"type": "openai_responses"}

FRONT_CASES = {
    # name: (first route's table, whether it can continue, the fault)
    "anthropic prefill, cut": ("claude", {"reset_after": 40}),
    "anthropic prefill, stall": ("claude", {"stall_after": 20}),
    "anthropic prefill, overloaded_error": ("claude", {"error_after": 30}),
    "vllm, cut": ("vllm", {"reset_after": 40}),
    "vllm, stall": ("vllm", {"stall_after": 20}),
    "vllm, in-stream error": ("vllm", {"error_after": 30}),
}


def front_tables(first: str, primary: FakeUpstream, backup: FakeUpstream) -> dict[str, dict[str, Any]]:
    """
    `first` on `primary`: `claude` and `vllm` continue there; `resp` (a Responses upstream) and
    `anthropic_first` (no prefill) cannot, and `vllm/m` on `backup`, their fallback, does.
    """
    return {
        "claude": {"type": "anthropic", "base_url": primary.url},
        "vllm": {**VLLM, "base_url": (primary if first == "vllm" else backup).url + "/v1"},
        "resp": {**RESPONSES, "base_url": primary.url + "/v1", "fallbacks": ["vllm/m"]},
        "anthropic_first": {
            "type": "anthropic",
            "base_url": primary.url,
            "continuation": "none",
            "fallbacks": ["vllm/m"],
        },
    }


def push_broken(first: str, primary: FakeUpstream, backup: FakeUpstream, fault: dict[str, int]) -> None:
    if first in ("claude", "vllm"):
        primary.push(*continuing_upstream(**fault))
    else:  # it breaks, and its fallback continues in another protocol
        primary.push(Reply(tokens=CANONICAL, **fault))
        backup.push(Reply(tokens=CANONICAL, continues=True))


@pytest.mark.parametrize(
    ("first", "fault"), [*FRONT_CASES.values(), ("resp", {"reset_after": 40})], ids=[*FRONT_CASES, "responses, cut"]
)
async def test_a_responses_client_gets_one_seamless_response(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, first: str, fault: dict[str, int]
) -> None:
    """
    Through `client.responses.stream`: one `response.created`, `sequence_number`s 0, 1, 2, …
    and one message whose `output_text.done` carries the whole text. From a Responses upstream
    its events pass through, then the fallback's continuation goes on in its message item.
    """
    primary, backup = await open_upstreams(nursery, 2)
    push_broken(first, primary, backup, fault)
    async with proxied(front_tables(first, primary, backup), timeouts={"silence_timeout": 5}) as client:
        start = trio.current_time()
        async with client.responses.stream(model=f"{first}/m", input="go") as stream:
            events = [event async for event in stream]
            response = await stream.get_final_response()
        assert trio.current_time() - start <= 5.1  # at most one silence_timeout
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert types.count("response.created") == 1
    assert types.count("response.output_item.added") == 1
    (done,) = [event for event in events if event.type == "response.output_text.done"]
    assert done.text == "".join(CANONICAL)
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == done.text
    assert response.status == "completed"
    assert response.output_text == "".join(CANONICAL)
    assert [item.type for item in response.output] == ["message"]
    if "stall_after" in fault:
        assert primary.requests[0].disconnected.is_set()  # the silent request was cancelled


async def test_a_non_streaming_stored_response_is_continued_whole(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    primary, backup = await open_upstreams(nursery, 2)
    push_broken("resp", primary, backup, {"reset_after": 40})
    async with proxied(front_tables("resp", primary, backup)) as client:
        created = await client.responses.create(model="resp/m", input="go", store=True)
        stored = await client.responses.retrieve(created.id)
    assert created.output_text == stored.output_text == "".join(CANONICAL)
    assert [item.type for item in stored.output] == ["message"]


async def test_websocket_mode_continues_a_responses_upstream_on_its_fallback(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    backup = await open_fake_upstream(nursery)
    push_broken("resp", upstream, backup, {"reset_after": 40})
    proxy = await start_proxy(nursery, upstream, **front_tables("resp", upstream, backup))
    async with trio_websocket.open_websocket_url(ws_url(proxy)) as connection:
        events = await one_response(connection, model="resp/m", input="go")
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    (done,) = [event for event in events if event["type"] == "response.output_text.done"]
    assert done["text"] == "".join(CANONICAL)
    assert events[-1]["type"] == "response.completed"
    assert [item["content"][0]["text"] for item in events[-1]["response"]["output"]] == ["".join(CANONICAL)]


async def test_a_responses_upstream_alone_cannot_be_continued_and_says_so(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """OpenAI's Responses API takes no prefill: without a fallback that can, the stream ends with its error."""
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(Reply(tokens=CANONICAL, reset_after=40))
    delivered = "".join(CANONICAL[:40])
    async with proxied({"resp": {**RESPONSES, "base_url": upstream.url + "/v1"}}) as client:
        events: list[Any] = []
        with pytest.raises(openai.APIError) as info:
            await sdk_stream_events(client.responses.stream(model="resp/m", input="go"), events)
    assert "connection broke" in info.value.message
    assert f"after {len(delivered)} characters were delivered" in info.value.message
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == delivered
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert upstream.request_count == 1

    async with proxied_anthropic({"resp": {**RESPONSES, "base_url": upstream.url + "/v1"}}) as anthropic_client:
        upstream.push(Reply(tokens=CANONICAL, reset_after=40))
        message_events: list[Any] = []
        with pytest.raises(anthropic.APIError) as anthropic_info:
            await sdk_stream_events(
                anthropic_client.messages.stream(model="resp/m", max_tokens=100, messages=MESSAGES), message_events
            )
    assert "connection broke" in anthropic_info.value.message
    assert text_of_messages_events(message_events) == delivered


@pytest.mark.parametrize(
    ("first", "fault"),
    [*FRONT_CASES.values(), ("anthropic_first", {"reset_after": 40})],
    ids=[*FRONT_CASES, "anthropic without prefill, cut: its vllm fallback"],
)
async def test_an_anthropic_stream_client_gets_one_seamless_message(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, first: str, fault: dict[str, int]
) -> None:
    """Through `client.messages.stream`: one `message_start`, one text block at index 0, the whole text."""
    primary, backup = await open_upstreams(nursery, 2)
    push_broken(first, primary, backup, fault)
    async with (
        proxied_anthropic(front_tables(first, primary, backup), timeouts={"silence_timeout": 5}) as client,
        client.messages.stream(model=f"{first}/m", max_tokens=100, messages=MESSAGES) as stream,
    ):
        events = [event async for event in stream]
        message = await stream.get_final_message()
    types = [event.type for event in events]
    assert types.count("message_start") == 1
    assert types.count("content_block_start") == 1
    blocks = [event for event in events if event.type.startswith("content_block")]
    assert {event.index for event in blocks} == {0}  # type: ignore[union-attr]
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "".join(CANONICAL)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"


async def test_an_anthropic_prefill_the_upstream_refuses_leaves_the_original_failure(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    (upstream,) = await open_upstreams(nursery, 1)
    upstream.push(Reply(tokens=CANONICAL, reset_after=40), Reply(refuse_continuation=True))
    async with proxied_anthropic({"claude": {"type": "anthropic", "base_url": upstream.url}}) as client:
        events: list[Any] = []
        with pytest.raises(anthropic.APIError) as info:
            await sdk_stream_events(client.messages.stream(model="claude/m", max_tokens=100, messages=MESSAGES), events)
    assert "connection broke" in info.value.message
    assert "prefill" not in info.value.message
    assert text_of_messages_events(events) == "".join(CANONICAL[:40])
    assert upstream.request_count == 2


@pytest.mark.parametrize("front", ["responses", "anthropic"])
async def test_every_front_fails_over_by_kind_and_to_a_larger_context(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, front: str
) -> None:
    """
    A route that never answers costs one first_token_timeout, then a context-length refusal
    goes to `context_fallbacks`.
    """
    silent, small, large = await open_upstreams(nursery, 3)
    kind = RESPONSES if front == "responses" else {"type": "anthropic"}
    path = "/v1" if front == "responses" else ""
    too_long = "Your input exceeds the context window of this model." if front == "responses" else "prompt is too long"
    silent.push(Reply(headers_delay=1000))
    small.push(Reply(status=400, error_message=too_long))
    large.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))
    tables = {
        "silent": {**kind, "base_url": silent.url + path, "fallbacks": ["small/m"]},
        "small": {**kind, "base_url": small.url + path, "context_fallbacks": ["large/m"], "fallbacks": ["silent/m"]},
        "large": {**kind, "base_url": large.url + path},
    }
    policy = {"timeouts": {"first_token_timeout": 5}, "retry": {"max_retries": 2}}
    if front == "responses":
        async with proxied(tables, **policy) as client:
            start = trio.current_time()
            async with client.responses.stream(model="silent/m", input="go") as stream:
                text = (await stream.get_final_response()).output_text
            took = trio.current_time() - start
    else:
        async with proxied_anthropic(tables, **policy) as anthropic_client:
            start = trio.current_time()
            async with anthropic_client.messages.stream(model="silent/m", max_tokens=9, messages=MESSAGES) as stream:
                text = await stream.get_final_text()
            took = trio.current_time() - start
    assert text == "".join(TOKENS)
    assert took == pytest.approx(5, abs=0.1)  # one timeout, no retry, no backoff
    assert (silent.request_count, small.request_count, large.request_count) == (1, 1, 1)
    assert silent.requests[0].disconnected.is_set()


async def test_every_attempt_shows_in_the_access_log_and_metrics_under_its_request_id(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A Responses stream continued on its fallback, and an Anthropic stream won by a hedge."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    primary, backup, slow, fast = await open_upstreams(nursery, 4)
    push_broken("resp", primary, backup, {"reset_after": 40})
    slow.push(Reply(tokens=("slow",), ttft=20))
    fast.push(Reply(tokens=TOKENS, ttft=0.5))
    tables = {
        **front_tables("resp", primary, backup),
        "slow": {"type": "anthropic", "base_url": slow.url, "fallbacks": ["fast/m"], "hedge_after": 3},
        "fast": {"type": "anthropic", "base_url": fast.url},
    }
    async with proxied(tables) as client:
        async with client.responses.stream(model="resp/m", input="go") as stream:
            await stream.get_final_response()
        hedged = await client._client.post(
            "http://proxy.test/v1/messages", json={"model": "slow/m", "max_tokens": 9, "messages": MESSAGES}
        )
        assert hedged.json()["content"][0]["text"] == "".join(TOKENS)
        metrics = (await client._client.get("http://proxy.test/metrics")).text
    logged = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    lines = {line["route"]: line for line in logged}
    continued, raced = lines["/v1/responses"], lines["/v1/messages"]
    assert continued["request_id"] != raced["request_id"]
    assert continued["request_id"]
    assert raced["request_id"]
    assert (continued["attempts"], continued["continuations"], continued["provider"]) == (2, 1, "vllm")
    (failure,) = continued["failures"]  # each failed attempt: its provider, and why
    assert failure.startswith("resp: the upstream connection broke")
    assert (raced["attempts"], raced["hedges"], raced["provider"]) == (2, 1, "fast")
    assert "failures" not in raced  # the loser was cancelled, not failed
    assert 'trioproxy_recoveries_total{kind="continuation",provider="resp"} 1.0' in metrics
    assert 'trioproxy_recoveries_total{kind="hedge",provider="slow"} 1.0' in metrics
    assert 'trioproxy_upstream_errors_total{provider="resp",status="broken"} 1.0' in metrics


@pytest.mark.parametrize("front", ["responses", "anthropic"])
async def test_a_client_that_leaves_during_a_continuation_cancels_its_upstream_request(
    nursery: trio.Nursery, upstream: FakeUpstream, front: str
) -> None:
    upstream.push(Reply(tokens=CANONICAL, reset_after=40), Reply(tokens=CANONICAL, continues=True, stall_after=5))
    proxy = await start_proxy(nursery, upstream)
    delivered = "".join(CANONICAL[:45])
    text = ""
    if front == "responses":
        async with (
            openai_sdk(proxy) as sdk,
            sdk.responses.stream(model="claude/m", input="go") as stream,
        ):
            async for event in stream:
                text += event.delta if event.type == "response.output_text.delta" else ""
                if len(text) == len(delivered):
                    break  # leaves: the stream is closed
    else:
        async with (
            anthropic_sdk(proxy) as client,
            client.messages.stream(model="claude/m", max_tokens=100, messages=MESSAGES) as events,
        ):
            async for event in events:
                if event.type == "content_block_delta":
                    text += event.delta.text  # type: ignore[union-attr]
                if len(text) == len(delivered):
                    break
    assert text == delivered  # 40 tokens, then 5 of the continuation's
    continued = upstream.requests[1]
    with trio.fail_after(5):
        await continued.disconnected.wait()
    assert not continued.completed


@pytest.mark.parametrize("kind", ["openai_responses", "openai"])
async def test_a_responses_client_gets_the_hedges_response_alone(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, kind: str
) -> None:
    """From a Responses upstream (passed through) or a chat one (translated): the loser's opening never shows."""
    slow, fast = await open_upstreams(nursery, 2)
    slow.push(Reply(tokens=("slow",), ttft=20))
    fast.push(Reply(tokens=TOKENS, ttft=0.5))
    tables = {
        "slow": {"type": kind, "base_url": slow.url + "/v1", "fallbacks": ["fast/m"], "hedge_after": 3},
        "fast": {"type": kind, "base_url": fast.url + "/v1"},
    }
    async with proxied(tables) as client:
        start = trio.current_time()
        async with client.responses.stream(model="slow/m", input="go") as stream:
            events = [event async for event in stream]
            response = await stream.get_final_response()
        assert trio.current_time() - start == pytest.approx(3.5, abs=0.1)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [event.type for event in events].count("response.created") == 1
    assert response.output_text == "".join(TOKENS)
    assert slow.requests[0].disconnected.is_set()
