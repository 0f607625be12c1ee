"""
Token budgets (`[limits] tokens_per_minute`, `tokens_per_day`) in one process, end to end: real
hypercorn and a scripted upstream on 127.0.0.1:0 whose usage the tests choose, the official
SDKs as clients, on every front (chat, legacy completions, embeddings, Responses, Anthropic
messages, the generic events). Admission reserves the prompt and the maximum output; the stream's end
corrects that to the upstream's count; a request that does not fit is a 429 in every front's
shape, naming the budget, with `Retry-After`. The windows pass on trio's MockClock in-process.
The budgets shared on Redis across processes are in `test_shared_limits.py`.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from tests.conftest import anthropic_sdk, in_process, openai_sdk, openai_upstream_config, serve_proxy
from trioproxy import StreamEvent, parse_config
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply, open_fake_upstream

#: Every answer's usage: 7 prompt and 3 completion tokens.
USED = 10
#: "hi" is two characters: one token of prompt reserved.
PROMPT = [{"role": "user", "content": "hi"}]


def reply_for(request: RecordedRequest) -> Reply:
    if request.json.get("messages", [{}])[-1].get("content") == "fail":
        return Reply(status=500)
    return Reply(tokens=("a", "b", "c"), usage=(7, 3))


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery, reply_for)


async def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream, **limits: int) -> str:
    return await serve_proxy(nursery, openai_upstream_config(upstream, limits=limits))


async def ask(client: openai.AsyncOpenAI, max_tokens: int | None, content: str = "hi", stream: bool = False) -> None:
    extra: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    messages: Any = [{"role": "user", "content": content}]
    if stream:
        async for _ in await client.chat.completions.create(model="up/m", messages=messages, stream=True, **extra):
            pass
    else:
        await client.chat.completions.create(model="up/m", messages=messages, **extra)


async def test_a_reservation_is_reconciled_with_the_usage_and_a_request_over_the_budget_is_refused_in_every_shape(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, tokens_per_minute=1000)
    async with openai_sdk(proxy) as client:
        await ask(client, 500)  # reserves 501, then counts 10
        await ask(client, 980, stream=True)  # 10 + 981 fits only because the first was reconciled
        with pytest.raises(openai.RateLimitError) as info:  # 20 + 986 does not
            await ask(client, 985)
        assert info.value.body["code"] == "tokens_per_minute_exceeded"
        assert "at most 1000 tokens per minute" in info.value.body["message"]
        assert 59 <= int(info.value.response.headers["retry-after"]) <= 61
        with pytest.raises(openai.RateLimitError) as responses:
            await client.responses.create(model="up/m", input="hi", max_output_tokens=985)
        assert responses.value.body["code"] == "tokens_per_minute_exceeded"
        await ask(client, 979)  # 20 + 980: still fits

    async with anthropic_sdk(proxy) as claude:
        with pytest.raises(anthropic.RateLimitError) as refused:
            await claude.messages.create(model="up/m", max_tokens=985, messages=PROMPT)  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "tokens per minute" in refused.value.body["error"]["message"]  # type: ignore[index]
    assert refused.value.response.headers["retry-after"]

    async with httpx.AsyncClient() as http:
        body = {"provider": "up", "model": "m", "messages": PROMPT, "max_tokens": 985}
        response = await http.post(proxy + "/v1/chat/stream/json", json=body)
    assert response.status_code == 429
    assert response.headers["retry-after"]
    event = StreamEvent.from_json(response.text.strip())
    assert (event.type, event.data["code"]) == ("error", "tokens_per_minute_exceeded")
    assert len(upstream.requests) == 3  # the refusals cost the upstream nothing


async def test_a_stream_without_usage_keeps_its_reservation_and_no_max_tokens_reserves_the_estimate(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, tokens_per_minute=1000, estimated_output_tokens=900)
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await ask(client, None, content="fail")  # reserves 1 + 900, and no usage ever comes
        await ask(client, 98)  # 901 + 99 = 1000: just fits; counts 10
        with pytest.raises(openai.RateLimitError):
            await ask(client, 89)  # 911 + 90 = 1001


async def test_embeddings_reserve_their_input_only_and_legacy_completions_their_output_too(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, tokens_per_minute=50, estimated_output_tokens=1000)
    async with openai_sdk(proxy) as client:
        await client.embeddings.create(model="up/m", input="hi")  # reserves 1, not the estimate; uses 7
        await client.completions.create(model="up/m", prompt="hi", max_tokens=40)  # 7 + 41 fits; uses 10
        with pytest.raises(openai.RateLimitError) as info:  # 17 + 34 does not
            await client.completions.create(model="up/m", prompt="hi", max_tokens=33)
        assert info.value.body["code"] == "tokens_per_minute_exceeded"
        await client.completions.create(model="up/m", prompt="hi", max_tokens=32, stream=True)  # 17 + 33 = 50
    assert len(upstream.requests) == 3


async def test_a_request_larger_than_the_whole_budget_is_a_429_without_retry_after(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, tokens_per_minute=1000)
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await ask(client, 1000)
    assert "retry-after" not in info.value.response.headers
    assert "more than the 1000 tokens per minute a client may use" in info.value.body["message"]
    assert not upstream.requests


async def test_the_windows_free_the_budget_when_retry_after_says(autojump_clock: trio.abc.Clock) -> None:
    """In-process (no sockets), so that the minute and the day pass on trio's MockClock."""
    simulated = {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0}
    config = parse_config(
        {"limits": {"tokens_per_minute": 100, "tokens_per_day": 150}, "providers": {"sim": simulated}}, environ={}
    )
    async with in_process(config) as (_, client):

        async def lorem(max_tokens: int) -> None:  # "hi": 1 token of prompt reserved, 1 counted
            await client.chat.completions.create(model="sim/lorem", messages=PROMPT, max_tokens=max_tokens)  # type: ignore[arg-type]

        await lorem(59)  # 60 reserved, 60 used
        await trio.sleep(10)
        with pytest.raises(openai.RateLimitError) as minute:
            await lorem(40)
        assert minute.value.body["code"] == "tokens_per_minute_exceeded"
        wait = int(minute.value.response.headers["retry-after"])
        assert 50 <= wait <= 51
        await trio.sleep(wait - 1)
        with pytest.raises(openai.RateLimitError):  # not a second early
            await lorem(40)
        await trio.sleep(1)
        await lorem(59)  # the minute is free; the day now holds 120
        with pytest.raises(openai.RateLimitError) as day:  # within the minute's 100, not the day's 150
            await lorem(30)
        assert day.value.body["code"] == "tokens_per_day_exceeded"
        wait = int(day.value.response.headers["retry-after"])
        assert 86_400 - 61 <= wait <= 86_400 + 900  # the first leaves a day after its quarter hour
        await trio.sleep(wait)
        await lorem(30)
