"""
Forwarding every other `/v1/` path a provider allows (`forward_paths`), end to end: clients →
trioproxy (hypercorn on 127.0.0.1:0) → the fake upstream's echo route, which sends back what
it got (or streams its reply's tokens as SSE).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.conftest import (
    ANTHROPIC_KEY,
    UPSTREAM_KEY,
    Instant,
    collect_into,
    free_port,
    openai_sdk,
    serve_proxy,
    upstream_closed_soon_after,
    wait_until,
    wait_until_idle,
)
from trioproxy import parse_config
from trioproxy.testing import FakeUpstream, Reply, open_fake_upstream


async def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream, **tables: Any) -> str:
    """`up` forwards `/v1/echo`, `claude` (Anthropic) `/v1/echo/anthropic`, `quiet` nothing."""
    config = parse_config(
        {
            "retry": {"max_retries": 0},
            "server": {"write_timeout": 5},
            "providers": {
                "up": {
                    "type": "openai",
                    "base_url": upstream.url + "/v1",
                    "api_key_env": "UP_KEY",
                    "forward_paths": ["/v1/echo"],
                },
                "claude": {
                    "type": "anthropic",
                    "base_url": upstream.url,
                    "api_key_env": "CLAUDE_KEY",
                    "forward_paths": ["/v1/echo/anthropic"],
                },
                "quiet": {"type": "openai", "base_url": upstream.url + "/v1"},
            },
            **tables,
        },
        environ={"UP_KEY": UPSTREAM_KEY, "CLAUDE_KEY": ANTHROPIC_KEY},
    )
    return await serve_proxy(nursery, config)


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    return await start_proxy(nursery, upstream)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def test_a_get_goes_up_with_its_query_and_the_providers_key_not_the_clients(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    answer = await http.get(
        proxy + "/v1/echo/files?limit=2&order=desc",
        headers={"authorization": "Bearer client-key", "x-api-key": "client-key", "x-vendor": "v"},
    )

    assert answer.status_code == 200
    assert (answer.headers["x-echo-method"], answer.headers["x-echo-target"]) == (
        "GET",
        "/v1/echo/files?limit=2&order=desc",
    )
    sent = upstream.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in sent.headers
    assert sent.headers["x-vendor"] == "v"
    assert "transfer-encoding" not in sent.headers
    assert sent.body == b""  # no body, none made up
    assert answer.headers["x-request-id"]


async def test_a_body_streams_up_and_back_whole(proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    pieces = [bytes([i]) * 10_000 for i in range(40)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    answer = await http.put(
        proxy + "/v1/echo/uploads/u-1/parts", content=body(), headers={"content-type": "application/octet-stream"}
    )

    assert answer.status_code == 200
    assert answer.content == b"".join(pieces)
    assert answer.headers["content-type"] == "application/octet-stream"
    assert upstream.requests[-1].headers.get("transfer-encoding") == "chunked"  # as the client sent it


async def test_a_body_of_known_length_streams_up_with_its_length(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    upload = bytes(range(256)) * 1000
    answer = await http.post(proxy + "/v1/echo/files", content=upload, headers={"content-type": "application/pdf"})

    assert answer.content == upload
    sent = upstream.requests[-1]
    assert (sent.headers["content-length"], sent.headers.get("transfer-encoding")) == (str(len(upload)), None)


async def test_an_sse_answer_streams_through_as_it_comes(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    upstream.push(Reply(tokens=("one", "two", "three"), interval=0.05))
    received = []
    async with http.stream("POST", proxy + "/v1/echo/runs", headers={"accept": "text/event-stream"}) as answer:
        assert answer.headers["content-type"] == "text/event-stream"
        async for line in answer.aiter_lines():
            if line:
                received.append((line, upstream.requests[-1].tokens_sent))

    assert [line for line, _ in received] == ["data: one", "data: two", "data: three"]
    assert [sent for _, sent in received] == [1, 2, 3]  # each before the upstream sent the next


async def test_a_json_body_is_routed_by_its_model(proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    answer = await http.post(proxy + "/v1/echo/moderations", json={"model": "up/omni-mod", "input": "hi"})

    assert answer.json() == {"model": "omni-mod", "input": "hi"}


async def test_a_model_whose_provider_does_not_forward_the_path_is_a_404(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    answer = await http.post(proxy + "/v1/echo/moderations", json={"model": "quiet/omni-mod", "input": "hi"})

    assert answer.status_code == 404
    assert "does not forward /v1/echo/moderations" in answer.json()["error"]["message"]
    assert not upstream.requests


async def test_an_anthropic_provider_gets_its_own_key_and_version(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    answer = await http.get(proxy + "/v1/echo/anthropic/batches", headers={"x-api-key": "client-key"})

    assert answer.status_code == 200
    sent = upstream.requests[-1]
    assert sent.path == "/v1/echo/anthropic/batches"
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.headers["anthropic-version"]


async def test_a_header_value_past_ascii_goes_up_byte_for_byte(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """HTTP carries a header's value as bytes, read as Latin-1: forwarded as it is, those same bytes."""
    answer = await http.get(proxy + "/v1/echo", headers=[(b"x-vendor", "café".encode("latin-1"))])

    assert answer.status_code == 200
    assert upstream.requests[-1].headers["x-vendor"] == "café"


async def test_hop_by_hop_headers_stay_on_their_hop(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    await http.get(
        proxy + "/v1/echo", headers={"connection": "keep-alive, x-hop", "x-hop": "1", "proxy-authorization": "p"}
    )

    sent = upstream.requests[-1]
    assert "x-hop" not in sent.headers
    assert "proxy-authorization" not in sent.headers


async def test_a_path_no_provider_forwards_is_a_404_in_openais_shape(proxy: str, upstream: FakeUpstream) -> None:
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.files.list()

    assert "no endpoint at GET /v1/files" in info.value.message
    assert "forward_paths" in info.value.message
    assert not upstream.requests


async def test_the_upstreams_own_status_comes_back_as_it_is(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    upstream.push(Reply(status=409))
    answer = await http.post(proxy + "/v1/echo/conflict", content=b"x", headers={"content-type": "text/plain"})

    assert (answer.status_code, answer.content) == (409, b"x")


async def test_client_keys_apply(nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    proxy = await start_proxy(nursery, upstream, auth={"keys": ["key-a"]})

    refused = await http.get(proxy + "/v1/echo")
    allowed = await http.get(proxy + "/v1/echo", headers={"authorization": "Bearer key-a"})

    assert refused.status_code == 401
    assert allowed.status_code == 200
    assert [r.headers["authorization"] for r in upstream.requests] == [f"Bearer {UPSTREAM_KEY}"]


async def test_a_streamed_body_over_max_body_bytes_is_a_413(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_body_bytes": 4096})

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 1024

    answer = await http.post(proxy + "/v1/echo", content=body(), headers={"content-type": "text/plain"})

    assert answer.status_code == 413
    assert "4096" in answer.json()["error"]["message"]


async def test_requests_per_minute_count_forwarded_requests(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"requests_per_minute": 2})

    statuses = [(await http.get(proxy + "/v1/echo")).status_code for _ in range(3)]

    assert statuses == [200, 200, 429]
    assert len(upstream.requests) == 2


async def test_forwarded_requests_are_counted_by_route(proxy: str, http: httpx.AsyncClient) -> None:
    await http.get(proxy + "/v1/echo/a")
    await http.get(proxy + "/v1/echo/b")

    metrics = (await http.get(proxy + "/metrics")).text
    assert 'trioproxy_requests_total{outcome="completed",route="/v1/echo/<path:rest>",status="200"} 2.0' in metrics


async def test_a_client_that_goes_away_mid_answer_cancels_the_upstream(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    upstream.push(Reply(tokens=("x",) * 1000, interval=0.01))
    async with http.stream("GET", proxy + "/v1/echo/events", headers={"accept": "text/event-stream"}) as answer:
        async for _ in answer.aiter_lines():
            break
        hung_up = Instant.now()
    await upstream_closed_soon_after(upstream.requests[-1], hung_up)
    await wait_until_idle(proxy)


async def test_an_unreachable_upstream_is_a_502_before_any_answer(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    config = parse_config(
        {
            "providers": {
                "gone": {
                    "type": "openai",
                    "base_url": f"http://127.0.0.1:{free_port()}/v1",
                    "forward_paths": ["/v1/files"],
                }
            }
        }
    )
    proxy = await serve_proxy(nursery, config)

    answer = await http.get(proxy + "/v1/files")

    assert answer.status_code == 502
    assert "cannot connect to the upstream" in answer.json()["error"]["message"]


async def test_a_provider_with_several_targets_forwards_as_it_streams_balanced_and_circuit_broken(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    down = await open_fake_upstream(nursery, Reply(status=503))  # every request: its echo answers 503
    up1, up2 = [await open_fake_upstream(nursery) for _ in range(2)]
    refusing = f"http://127.0.0.1:{free_port()}/v1"
    targets = [refusing, down.url + "/v1", up1.url + "/v1", up2.url + "/v1"]
    config = parse_config(
        {
            "providers": {
                "pool": {
                    "type": "openai",
                    "base_urls": targets,
                    "breaker": {"failures": 2, "cooldown": 60},
                    "forward_paths": ["/v1/echo"],
                }
            }
        }
    )
    proxy = await serve_proxy(nursery, config)

    statuses = [(await http.get(proxy + "/v1/echo/files")).status_code for _ in range(12)]

    # a refused connection passes the request to the next target at once; the down target's
    # 5xx answers come back as they are, and open its breaker after two
    assert sorted(statuses) == [200] * 10 + [503, 503]
    assert down.request_count == 2
    assert up1.request_count + up2.request_count == 10
    assert min(up1.request_count, up2.request_count) >= 2
    health = (await http.get(proxy + "/health")).json()
    states = {t["url"]: t["state"] for t in health["providers"]["pool"]["targets"]}
    assert states == dict(zip(targets, ["open", "open", "closed", "closed"], strict=True))


async def test_a_path_served_natively_is_never_forwarded(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    config = parse_config(
        {
            "providers": {
                "up": {"type": "openai", "base_url": upstream.url + "/v1", "forward_paths": ["/v1/models", "/v1/chat"]}
            }
        }
    )
    proxy = await serve_proxy(nursery, config)

    models = await http.get(proxy + "/v1/models")
    chat = await http.get(proxy + "/v1/chat/completions")
    other = await http.get(proxy + "/v1/models/fake-model")

    assert any(model["owned_by"] == "sim" for model in models.json()["data"])  # the proxy's own list
    assert chat.status_code == 405
    assert other.status_code == 404  # forwarded: the fake upstream has no such path
    assert [r.path for r in upstream.requests] == ["/v1/models/fake-model"]


async def test_a_forwarded_request_has_its_access_line(
    proxy: str, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    answer = await http.get(proxy + "/v1/echo/files?limit=1", headers={"authorization": "Bearer client-secret"})
    await wait_until(lambda: any(r.name == "trioproxy.access" for r in caplog.records))

    (line,) = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    assert line["request_id"] == answer.headers["x-request-id"]
    assert (line["route"], line["path"], line["status"], line["provider"]) == (
        "/v1/echo/<path:rest>",
        "/v1/echo/files",
        200,
        "up",
    )
    assert "client-secret" not in str(line)


async def lines_into(answer: AbstractAsyncContextManager[httpx.Response], into: list[str]) -> None:
    """Open a streamed answer and keep its lines in `into`, until it ends or breaks."""
    async with answer as response:
        await collect_into(response.aiter_lines(), into)


async def test_an_upstream_that_breaks_mid_answer_cuts_the_clients_answer_short(
    proxy: str, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    upstream.push(Reply(tokens=("one", "two", "three"), reset_after=2))
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await lines_into(
            http.stream("GET", proxy + "/v1/echo/events", headers={"accept": "text/event-stream"}), received
        )

    assert [line for line in received if line] == ["data: one", "data: two"]
    assert (await http.get(proxy + "/health")).status_code == 200  # the server lives on


async def test_anthropic_paths_under_messages_are_forwarded_with_anthropics_errors(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    config = parse_config(
        {
            "auth": {"keys": ["key-a"]},
            "providers": {
                "claude": {
                    "type": "anthropic",
                    "base_url": upstream.url + "/v1",
                    "api_key_env": "CLAUDE_KEY",
                    "forward_paths": ["/v1/messages/batches"],
                }
            },
        },
        environ={"CLAUDE_KEY": ANTHROPIC_KEY},
    )
    proxy = await serve_proxy(nursery, config)

    refused = await http.get(proxy + "/v1/messages/batches")
    await http.get(proxy + "/v1/messages/batches/b-1?x=1", headers={"x-api-key": "key-a", "anthropic-version": "v9"})

    assert refused.status_code == 401
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "authentication_error"
    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages/batches/b-1?x=1"
    assert (sent.headers["x-api-key"], sent.headers["anthropic-version"]) == (ANTHROPIC_KEY, "v9")


async def test_the_drain_counts_a_forwarded_answer_and_cuts_it_at_its_deadline(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.server")
    asked_to_stop = trio.Event()
    requests_to_stop = 0

    async def shutdown_trigger() -> None:
        nonlocal requests_to_stop
        requests_to_stop += 1
        if requests_to_stop > 1:
            await trio.sleep_forever()  # one request to stop, no second
        await asked_to_stop.wait()

    config = parse_config(
        {
            "server": {"shutdown_grace_period": 0.5, "write_timeout": 5},
            "providers": {"up": {"type": "openai", "base_url": upstream.url + "/v1", "forward_paths": ["/v1/echo"]}},
        }
    )
    proxy = await serve_proxy(nursery, config, shutdown_trigger=shutdown_trigger)
    upstream.push(Reply(tokens=[f"t{i}" for i in range(1000)], interval=0.01))
    lines = []
    with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012 - read, asking the server to stop at the first line
        async with http.stream("GET", proxy + "/v1/echo/events", headers={"accept": "text/event-stream"}) as answer:
            async for line in answer.aiter_lines():
                lines.append(line)
                if line == "data: t0":
                    asked_to_stop.set()

    assert "data: t1" in lines  # it ran on into the grace period
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("draining: 1 stream(s) in flight") for message in messages)
    assert any("interrupted 1 stream(s)" in message for message in messages)
    with trio.fail_after(1):
        await upstream.requests[-1].disconnected.wait()


async def test_the_openai_sdk_reaches_a_vendor_path_through_the_proxy(proxy: str, upstream: FakeUpstream) -> None:
    async with openai_sdk(proxy, "client-key") as client:
        posted = await client.post("/echo/vendor/rerank", body={"model": "up/rerank-1", "query": "q"}, cast_to=object)
        got = await client.get("/echo/vendor/jobs", options={"params": {"after": "j-1"}}, cast_to=httpx.Response)

    assert posted == {"model": "rerank-1", "query": "q"}
    assert (got.status_code, got.headers["x-echo-target"]) == (200, "/v1/echo/vendor/jobs?after=j-1")
    assert all(r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}" for r in upstream.requests)
