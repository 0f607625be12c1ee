"""
`[limits]` shared on Redis, as an operator runs them: three real `trioproxy serve` processes
sharing one real `redis-server`, driven with the official SDK and httpx over loopback. Then
Redis killed while streams run and started again: no hang, no 500, the documented fallback,
and the limits shared again once it is back.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import trio

from tests.conftest import RedisServer, anthropic_sdk, listening_url, openai_sdk, wait_until
from tests.e2e.test_observability import scrape_until, value
from trioproxy.testing import FakeUpstream

MESSAGES = [{"role": "user", "content": "one two three"}]
#: 40 tokens 50 ms apart: a stream that is still running while the test looks.
SLOW = {"model": "slow/lorem", "messages": MESSAGES, "stream": True, "max_tokens": 40}


def config_text(redis_url: str, limits: str, redis: str = "lease_ttl = 5") -> str:
    return f"""
[redis]
url = "{redis_url}"
{redis}

[limits]
{limits}

[providers.slow]
type = "simulated"
ttft_ms = 0
token_interval_ms = 50
"""


@dataclass
class Proxy:
    url: str
    process: trio.Process
    log: Path


@asynccontextmanager
async def proxies(tmp_path: Path, text: str, count: int = 3) -> AsyncIterator[list[Proxy]]:
    """`count` trioproxy processes with the config `text`, once all listen."""
    config = tmp_path / "trioproxy.toml"
    config.write_text(text)
    started: dict[int, Proxy] = {}
    processes: list[trio.Process] = []
    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):

                async def start(index: int = index) -> None:
                    command = [sys.executable, "-m", "trioproxy", "serve", "--config", str(config), "--port", "0"]
                    log = tmp_path / f"stderr-{index}.log"
                    with log.open("wb") as stderr:
                        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=stderr)
                    processes.append(process)
                    started[index] = Proxy(await listening_url(process), process, log)

                nursery.start_soon(start)
        yield [started[index] for index in range(count)]
    finally:
        for process in processes:
            process.kill()
            await process.wait()


async def chat(proxy: Proxy, **body: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            proxy.url + "/v1/chat/completions", json={"model": "sim/echo", "messages": MESSAGES, **body}
        )


async def chats_at_once(proxies: list[Proxy], count: int, **body: object) -> list[httpx.Response]:
    """`count` chat requests (`chat`'s, with `body`) at once, to `proxies` in turn; their answers."""
    answers: list[httpx.Response] = []

    async def ask(proxy: Proxy) -> None:
        answers.append(await chat(proxy, **body))

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(ask, proxies[n % len(proxies)])
    return answers


async def streams_running(http: httpx.AsyncClient, running: list[Proxy], count: int) -> bool:
    """Whether `running` (their `/health`) run `count` streams together."""
    return sum([(await http.get(p.url + "/health")).json()["active_streams"] for p in running]) == count


async def test_requests_per_minute_are_exact_across_three_processes(tmp_path: Path, redis_server: RedisServer) -> None:
    async with proxies(tmp_path, config_text(redis_server.url, "requests_per_minute = 7")) as three:
        answers = await chats_at_once(three, 24)  # 8 to each process
        assert sorted(answer.status_code for answer in answers) == [200] * 7 + [429] * 17
        refused = next(answer for answer in answers if answer.status_code == 429)
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert 55 <= int(refused.headers["retry-after"]) <= 60

        async with openai_sdk(three[1].url) as sdk:
            with pytest.raises(openai.RateLimitError):
                await sdk.chat.completions.create(model="sim/echo", messages=MESSAGES)  # type: ignore[arg-type]

        # A refusal is a rejected request, not a stream (whose end would count its tokens too).
        chat_route = {"route": "/v1/chat/completions", "status": "429", "outcome": "rejected"}
        rejected = streams = 0.0
        for proxy in three:
            samples = await scrape_until(proxy.url, lambda s: True)
            rejected += value(samples, "trioproxy_requests_total", **chat_route)
            streams += sum(count for (name, _), count in samples.items() if name == "trioproxy_streams_total")
        assert (rejected, streams) == (17 + 1, 7)  # the SDK's request was refused too; streams: the admitted


async def test_concurrent_streams_are_counted_across_processes_and_freed_when_one_dies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with proxies(tmp_path, config_text(redis_server.url, "max_concurrent_streams = 2")) as three:
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
            ends: list[str] = []

            async def stream(proxy: Proxy) -> None:
                async with http.stream("POST", proxy.url + "/v1/chat/completions", json=SLOW) as response:
                    assert response.status_code == 200
                    ends.append((await response.aread()).decode().rstrip()[-12:])

            nursery.start_soon(stream, three[0])
            nursery.start_soon(stream, three[1])
            await wait_until(lambda: streams_running(http, three[:2], 2), seconds=10)
            refused = await chat(three[2])  # the third process counts the two others' streams
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_overloaded"
        assert ends == ["data: [DONE]"] * 2
        assert (await chat(three[2])).status_code == 200  # their places were given back at their end

        # A process that dies with a stream running: its place is freed when its lease expires.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(http_stream_forgotten, three[0]))
            nursery.start_soon(partial(http_stream_forgotten, three[1]))
            async with httpx.AsyncClient() as health:
                await wait_until(lambda: streams_running(health, three[:2], 2), seconds=10)
            three[0].process.kill()
            assert (await chat(three[2])).status_code == 503  # within lease_ttl (5 s): still counted

            async def admitted() -> bool:
                return (await chat(three[2])).status_code == 200

            await wait_until(admitted, seconds=15)
            nursery.cancel_scope.cancel()


async def http_stream_forgotten(proxy: Proxy) -> None:
    """A slow stream read until cancelled (or its process dies)."""
    async with httpx.AsyncClient(timeout=30) as http:
        try:
            async with http.stream("POST", proxy.url + "/v1/chat/completions", json=SLOW) as response:
                async for _ in response.aiter_raw():
                    pass
        except httpx.HTTPError:
            pass


async def test_redis_killed_and_restarted_falls_back_to_each_process_then_shares_again(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`on_error = "open"` (the default): while Redis is down each process applies its own limits."""
    async with proxies(tmp_path, config_text(redis_server.url, "requests_per_minute = 3")) as three:
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
            ended: list[str] = []

            async def stream() -> None:
                async with http.stream("POST", three[0].url + "/v1/chat/completions", json=SLOW) as response:
                    ended.append((await response.aread()).decode().rstrip()[-12:])

            nursery.start_soon(stream)
            await wait_until(lambda: streams_running(http, three[:1], 1), seconds=10)
            await redis_server.stop()  # mid-stream

            with trio.fail_after(5):  # no hang: each answered within [redis] timeout, by local limits
                statuses = [(await chat(three[1])).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]  # this process's own 3 a minute
        assert ended == ["data: [DONE]"]  # the stream in flight ran to its end

        await redis_server.start()  # empty: its counts were lost with it
        assert [(await chat(three[2])).status_code for _ in range(3)] == [200] * 3
        assert (await chat(three[0])).status_code == 429  # shared again: three[0] has not asked since
    logs = [proxy.log.read_text() for proxy in three]
    assert "Redis failed" in logs[1]
    assert "Redis answers again" in logs[0] + logs[1] + logs[2]
    assert "Traceback" not in "".join(logs)


async def test_redis_down_with_on_error_closed_refuses_with_503(tmp_path: Path, redis_server: RedisServer) -> None:
    text = config_text(redis_server.url, "requests_per_minute = 100", redis='on_error = "closed"')
    async with proxies(tmp_path, text, count=1) as (proxy,):
        assert (await chat(proxy)).status_code == 200
        await redis_server.stop()
        with trio.fail_after(5):
            refused = await chat(proxy)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shared_state_unavailable"
        async with httpx.AsyncClient() as http:  # the generic endpoint: its own error shape
            response = await http.post(proxy.url + "/v1/chat/stream", json={"model": "sim/echo", "messages": MESSAGES})
        assert response.status_code == 503
        assert "shared_state_unavailable" in response.text
        await redis_server.start()
        assert (await chat(proxy)).status_code == 200


async def test_every_front_is_admitted_by_the_shared_limits_and_refused_in_its_own_shape(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Chat, Anthropic messages and each way of the Responses front count against one shared budget."""
    async with proxies(tmp_path, config_text(redis_server.url, "requests_per_minute = 5")) as three:
        async with openai_sdk(three[0].url) as first:
            stored = await first.responses.create(model="sim/echo", input="one two three")
            assert stored.status == "completed"
            async with await first.responses.create(model="sim/echo", input="hi", stream=True) as events:
                assert [e.type async for e in events][-1] == "response.completed"
        async with httpx.AsyncClient(timeout=30) as http:
            not_stored = {"model": "sim/echo", "input": "hi", "store": False}
            assert (await http.post(three[1].url + "/v1/responses", json=not_stored)).status_code == 200
            message = {"model": "sim/echo", "max_tokens": 20, "messages": MESSAGES}
            assert (await http.post(three[2].url + "/v1/messages", json=message)).status_code == 200
            assert (await chat(three[1])).status_code == 200  # the fifth of the minute, on any process

            background = {"model": "sim/echo", "input": "hi", "background": True}
            refused = await http.post(three[2].url + "/v1/responses", json=background)
            assert refused.status_code == 429, refused.text  # refused, not "queued" and failed later
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert refused.headers["retry-after"]
            refused = await http.post(three[0].url + "/v1/messages", json=message)
            assert (refused.status_code, refused.json()["error"]["type"]) == (429, "rate_limit_error")
        async with openai_sdk(three[1].url) as second:
            with pytest.raises(openai.RateLimitError):
                await second.responses.create(model="sim/echo", input="hi")
            with pytest.raises(openai.RateLimitError):
                await second.responses.create(model="sim/echo", input="hi", stream=True)


async def test_forwarded_requests_count_with_chat_against_one_shared_rate(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    """A forwarded path (`forward_paths`) is admitted by the same shared limits as chat, across processes."""
    forwarding = f"""
[providers.up]
type = "openai"
base_url = "{upstream.url}/v1"
forward_paths = ["/v1/echo"]
"""
    text = config_text(redis_server.url, "requests_per_minute = 6") + forwarding
    async with proxies(tmp_path, text) as three, httpx.AsyncClient(timeout=30) as http:
        answers: list[tuple[str, httpx.Response]] = []

        async def ask(proxy: Proxy, forwarded: bool) -> None:
            if forwarded:
                answers.append(("forwarded", await http.get(proxy.url + "/v1/echo")))
            else:
                answers.append(("chat", await chat(proxy)))

        async with trio.open_nursery() as nursery:  # 18 at once: 6 forwarded, 12 chat, spread over three
            for n in range(18):
                nursery.start_soon(ask, three[n % 3], n % 3 == 0)
        admitted = [kind for kind, answer in answers if answer.status_code == 200]
        assert len(admitted) == 6, [(kind, answer.status_code) for kind, answer in answers]
        assert len(upstream.requests) == admitted.count("forwarded")
        refused = await http.get(three[1].url + "/v1/echo")  # the minute's six are used, whoever took them
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 55 <= int(refused.headers["retry-after"]) <= 60


async def test_token_budgets_are_reserved_and_reconciled_exactly_across_three_processes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """
    Each slow stream reserves 44 tokens (13 characters of prompt: 4, and its max_tokens, 40)
    and uses 43 (the simulated provider counts 3 words of prompt and its 40 tokens).
    """
    async with proxies(tmp_path, config_text(redis_server.url, "tokens_per_minute = 220")) as three:
        answers = await chats_at_once(three, 15, **SLOW)  # 5 to each process: 5 * 44 = 220 fit
        assert sorted(answer.status_code for answer in answers) == [200] * 5 + [429] * 10
        refused = next(answer for answer in answers if answer.status_code == 429)
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "tokens_per_minute_exceeded")
        assert 55 <= int(refused.headers["retry-after"]) <= 60

        # Reconciled at each stream's end, whichever process ran it: 5 * 43 = 215 used, so one
        # more request reserving 5 (4 + max_tokens 1) fits exactly; it uses 4, and then 5 do not.
        async def admitted() -> bool:
            return (await chat(three[2], max_tokens=1)).status_code == 200

        await wait_until(admitted, seconds=10)
        await wait_until(lambda: _refused(three[0]), seconds=10)
        async with anthropic_sdk(three[1].url) as claude:
            with pytest.raises(anthropic.RateLimitError):
                await claude.messages.create(model="sim/echo", max_tokens=1, messages=MESSAGES)  # type: ignore[arg-type]


async def _refused(proxy: Proxy) -> bool:
    response = await chat(proxy, max_tokens=1)
    return response.status_code == 429 and response.json()["error"]["code"] == "tokens_per_minute_exceeded"
