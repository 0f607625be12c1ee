"""
Metrics, the access log and request ids, end to end: real streams through a real proxy,
then `/metrics` scraped and parsed, and the log lines read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    PROCESS_EXIT_BOUND,
    anthropic_sdk,
    listening_url,
    openai_sdk,
    proxy_config,
    serve_proxy,
    streamed_chat_text,
    wait_until,
)
from trioproxy import parse_config
from trioproxy._config import AuthConfig
from trioproxy._logs import JsonFormatter, LoggingConfig, TextFormatter
from trioproxy.testing import FakeUpstream, Reply

MESSAGES = [{"role": "user", "content": "a private prompt"}]
CHAT = "/v1/chat/completions"


async def scrape(proxy_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of `/metrics`, keyed by name and labels."""
    async with httpx.AsyncClient() as http:
        response = await http.get(proxy_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape_until(proxy_url: str, check: Callable[[dict], bool], *, seconds: float = 5.0) -> dict:
    """
    Scrape `/metrics` until `check` holds for its samples, and return them: requests are
    counted once their response is over, which the client may see first.
    """
    samples: dict = {}

    async def holds() -> bool:
        nonlocal samples
        samples = await scrape(proxy_url)
        return check(samples)

    await wait_until(holds, seconds=seconds)
    return samples


async def test_metrics_move_as_streams_go_through(
    proxy_url: str, upstream: FakeUpstream, client: openai.AsyncOpenAI, upstream_keys: dict[str, str]
) -> None:
    before = await scrape(proxy_url)
    upstream.push(*[Reply(tokens=["one", " two", " three", " four"])] * 3)
    for _ in range(3):
        stream = await client.chat.completions.create(model="up/gpt-x", messages=MESSAGES, stream=True)
        assert await streamed_chat_text(stream) == "one two three four"
    after = await scrape(proxy_url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    stream_labels = {"route": CHAT, "provider": "up", "model": "gpt-x"}
    assert moved("trioproxy_requests_total", route=CHAT, status="200", outcome="completed") == 3
    assert moved("trioproxy_streams_total", route=CHAT, provider="up", outcome="completed") == 3
    assert moved("trioproxy_time_to_first_token_seconds_count", **stream_labels) == 3
    assert moved("trioproxy_time_to_first_token_seconds_bucket", le="+Inf", **stream_labels) == 3
    assert moved("trioproxy_inter_token_latency_seconds_count", **stream_labels) == 3 * 3
    assert moved("trioproxy_buffer_latency_seconds_count", **stream_labels) == 3 * 4
    assert moved("trioproxy_stream_duration_seconds_count", **stream_labels) == 3
    tokens = {"provider": "up", "model": "gpt-x", "key": "none"}
    assert moved("trioproxy_tokens_total", direction="out", **tokens) == 3 * 4
    assert moved("trioproxy_tokens_total", direction="in", **tokens) > 0
    assert value(after, "trioproxy_active_streams") == 0
    assert value(after, "process_resident_memory_bytes") > 0
    assert upstream_keys["up"] not in repr(after)


def fingerprint(key: str) -> str:
    """How a client key is named in metrics and logs, as `printf %s KEY | sha256sum | cut -c1-12` shows it."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


async def test_usage_is_counted_per_client_key_and_model(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    keys = ("client-key-alice", "client-key-bob")
    config = proxy_config(upstream)
    config = dataclasses.replace(config, auth=AuthConfig(keys=keys, protect_metrics=False))
    proxy_url = await serve_proxy(nursery, config)
    upstream.push(
        Reply(tokens=["a", "b", "c"], usage=(100, 0), cached_tokens=60),
        Reply(tokens=["a"], usage=(10, 0)),
        Reply(tokens=["x", "y"], usage=(50, 0), cached_tokens=40),
        Reply(tokens=["r", "s"], usage=(20, 0)),
        Reply(tokens=["t"], usage=(30, 0), cached_tokens=10),
    )
    for key in keys:
        async with openai_sdk(proxy_url, key) as sdk:
            stream = await sdk.chat.completions.create(model="up/gpt-x", messages=MESSAGES, stream=True)
            async for _ in stream:
                pass
    async with (
        anthropic_sdk(proxy_url, keys[1]) as claude,
        claude.messages.stream(model="claude/opus", max_tokens=10, messages=MESSAGES) as stream,
    ):
        await stream.until_done()
    async with openai_sdk(proxy_url, keys[0]) as sdk:
        async with await sdk.responses.create(model="up/gpt-r", input="hi", stream=True) as events:  # stored
            async for _ in events:
                pass
        await sdk.responses.create(model="up/gpt-r", input="hi", store=False)
    await wait_until(lambda: len([r for r in caplog.records if r.name == "trioproxy.access"]) == 5)
    samples = await scrape(proxy_url)

    alice, bob = (fingerprint(key) for key in keys)
    expected = {
        (alice, "up", "gpt-x", "in"): 100,
        (alice, "up", "gpt-x", "cached"): 60,
        (alice, "up", "gpt-x", "out"): 3,
        (bob, "up", "gpt-x", "in"): 10,
        (bob, "up", "gpt-x", "out"): 1,
        (bob, "claude", "opus", "in"): 50,
        (bob, "claude", "opus", "cached"): 40,
        (bob, "claude", "opus", "out"): 2,
        (alice, "up", "gpt-r", "in"): 20 + 30,  # the Responses front, stored and streamed, then not
        (alice, "up", "gpt-r", "cached"): 10,
        (alice, "up", "gpt-r", "out"): 2 + 1,
    }
    counted = {
        (labels["key"], labels["provider"], labels["model"], labels["direction"]): count
        for (name, label_set), count in samples.items()
        if name == "trioproxy_tokens_total" and (labels := dict(label_set))
    }
    assert counted == expected
    assert not any(key in repr(samples) for key in keys)

    lines = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    assert [(f["key"], f["model"], f["tokens_in"], f["tokens_cached"], f["tokens_out"]) for f in lines] == [
        (alice, "gpt-x", 100, 60, 3),
        (bob, "gpt-x", 10, 0, 1),
        (bob, "opus", 50, 40, 2),
        (alice, "gpt-r", 20, 0, 2),
        (alice, "gpt-r", 30, 10, 1),
    ]


async def test_usage_without_client_keys_is_counted_under_no_key(proxy_url: str, client: openai.AsyncOpenAI) -> None:
    """Without `[auth]` keys a client is an address: not a label (unbounded), so all count as `none`."""
    await client.chat.completions.create(model="sim/echo", messages=MESSAGES)
    labels = {"key": "none", "provider": "sim", "model": "echo"}
    samples = await scrape_until(proxy_url, lambda s: value(s, "trioproxy_tokens_total", direction="out", **labels) > 0)
    assert value(samples, "trioproxy_tokens_total", direction="in", **labels) > 0


async def test_upstream_errors_retries_and_failures_are_counted(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    config = parse_config(
        {
            "retry": {"max_retries": 1, "base_delay_ms": 1, "jitter": 0},
            "providers": {"up": {"type": "openai", "base_url": upstream.url + "/v1", "api_key_env": "K"}},
        },
        environ={"K": "sk-x"},
    )
    proxy_url = await serve_proxy(nursery, config)
    upstream.push(Reply(status=503), Reply(status=500))
    async with openai_sdk(proxy_url) as sdk:
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(model="up/gpt-x", messages=MESSAGES, stream=True)
    samples = await scrape(proxy_url)

    assert value(samples, "trioproxy_upstream_errors_total", provider="up", status="503") == 1
    assert value(samples, "trioproxy_upstream_errors_total", provider="up", status="500") == 1
    assert value(samples, "trioproxy_retries_total", provider="up") == 1
    assert value(samples, "trioproxy_requests_total", route=CHAT, status="500", outcome="upstream_error") == 1


async def test_a_connection_reset_mid_stream_is_counted_as_broken_not_connect(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=["one", " two", " three"], reset_after=2))
    body = {"model": "up/gpt-x", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + CHAT, json=body)
    assert "the upstream connection broke" in response.text

    samples = await scrape_until(
        proxy_url, lambda s: value(s, "trioproxy_upstream_errors_total", provider="up", status="broken") == 1
    )
    assert value(samples, "trioproxy_upstream_errors_total", provider="up", status="connect") == 0


async def test_a_client_that_leaves_counts_a_disconnect_and_an_upstream_cancellation(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=[f" t{i}" for i in range(1000)], interval=0.01))
    body = {"model": "up/gpt-x", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient() as http, http.stream("POST", proxy_url + CHAT, json=body) as response:
        async for _ in response.aiter_raw():
            break
    with trio.fail_after(5):
        await upstream.requests[-1].disconnected.wait()

    samples = await scrape_until(
        proxy_url, lambda s: value(s, "trioproxy_upstream_cancellations_total", provider="up") == 1
    )
    assert value(samples, "trioproxy_client_disconnects_total", route=CHAT) == 1
    assert value(samples, "trioproxy_requests_total", route=CHAT, status="200", outcome="client_disconnected") == 1
    assert value(samples, "trioproxy_streams_total", route=CHAT, provider="up", outcome="cancelled") == 1
    assert value(samples, "trioproxy_active_streams") == 0


async def test_routes_are_labelled_by_rule_not_path(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        for n in range(3):
            assert (await http.get(f"{proxy_url}/v1/streams/no-such-{n}")).status_code == 404
        assert (await http.get(proxy_url + "/no/such/page")).status_code == 404
    samples = await scrape(proxy_url)
    assert (
        value(samples, "trioproxy_requests_total", route="/v1/streams/<stream_id>", status="404", outcome="rejected")
        == 3
    )
    assert value(samples, "trioproxy_requests_total", route="unmatched", status="404", outcome="rejected") == 1


async def test_every_response_carries_a_request_id(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        responses = [
            await http.get(proxy_url + "/health"),
            await http.get(proxy_url + "/v1/models"),
            await http.get(proxy_url + "/nowhere"),
            await http.post(proxy_url + CHAT, content=b"not json"),
            await http.post(proxy_url + CHAT, json={"model": "sim/echo", "messages": MESSAGES, "stream": True}),
            await http.post(proxy_url + "/v1/chat/stream", json={"model": "sim/echo", "messages": MESSAGES}),
        ]
        ids = [r.headers.get("x-request-id", "") for r in responses]
        assert all(i.startswith("req_") for i in ids), ids
        assert len(set(ids)) == len(ids)
        # The generic stream's events carry the same id as its header.
        assert ids[-1] in responses[-1].text

        kept = await http.get(proxy_url + "/health", headers={"x-request-id": "lb-7f3a:42"})
        assert kept.headers["x-request-id"] == "lb-7f3a:42"
        replaced = await http.get(proxy_url + "/health", headers={"x-request-id": "bad id\twith spaces"})
        assert replaced.headers["x-request-id"].startswith("req_")


async def test_one_access_line_per_request_without_secrets(
    proxy_url: str,
    upstream: FakeUpstream,
    client: openai.AsyncOpenAI,
    upstream_keys: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    secret = upstream_keys["up"]
    upstream.push(Reply(tokens=["a", "b"]), Reply(status=401, error_message=f"bad key {secret}"))
    stream = await client.chat.completions.with_raw_response.create(model="up/gpt-x", messages=MESSAGES, stream=True)
    request_id = stream.headers["x-request-id"]
    async for _ in stream.parse():
        pass
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="up/gpt-x", messages=MESSAGES, stream=True)
    await wait_until(lambda: len([r for r in caplog.records if r.name == "trioproxy.access"]) == 2)

    ok, failed = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    assert ok["request_id"] == request_id
    assert (ok["route"], ok["status"], ok["outcome"]) == (CHAT, 200, "completed")
    assert (ok["provider"], ok["model"], ok["tokens_out"]) == ("up", "gpt-x", 2)
    assert ok["ttft_ms"] is not None
    assert ok["duration_ms"] >= ok["ttft_ms"]
    assert (failed["status"], failed["outcome"]) == (401, "upstream_error")
    lines = [TextFormatter().format(r) + JsonFormatter().format(r) for r in caplog.records]
    assert secret not in "".join(lines)
    assert "private prompt" not in "".join(lines)


async def test_prompts_are_logged_only_when_enabled(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    config = parse_config({"logging": {"include_prompts": True, "format": "json"}})
    proxy_url = await serve_proxy(nursery, config)
    async with httpx.AsyncClient() as http:
        await http.post(proxy_url + CHAT, json={"model": "sim/echo", "messages": MESSAGES, "stream": True})
    await wait_until(lambda: any(r.name == "trioproxy.access" for r in caplog.records))
    (record,) = [r for r in caplog.records if r.name == "trioproxy.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["prompt"] == [{"role": "user", "content": "a private prompt"}]
    assert (line["level"], line["logger"], line["status"]) == ("info", "trioproxy.access", 200)


async def test_websocket_streams_get_a_line_each(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    from trioproxy.client import WebSocketClient

    caplog.set_level(logging.INFO, logger="trioproxy.access")
    proxy_url = await serve_proxy(nursery, parse_config({}))
    async with WebSocketClient.connect(proxy_url.replace("http", "ws") + "/v1/chat/ws") as ws:
        for n in range(2):
            events = [e async for e in ws.stream({"model": "sim/echo", "messages": MESSAGES, "id": f"s{n}"})]
            assert events[-1].type == "done"
    await wait_until(lambda: len([r for r in caplog.records if r.name == "trioproxy.access"]) >= 3)
    fields = [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    streams = [f for f in fields if f.get("stream_id")]
    assert [(f["stream_id"], f["outcome"], f["route"]) for f in streams] == [
        ("s0", "completed", "/v1/chat/ws"),
        ("s1", "completed", "/v1/chat/ws"),
    ]


def test_text_lines_are_key_value_pairs() -> None:
    record = logging.LogRecord("trioproxy.access", logging.INFO, __file__, 1, "POST %s", ("/x",), None)
    record.fields = {"request_id": "req_1", "status": 200, "error": 'said "no"', "ttft_ms": None}
    line = TextFormatter().format(record)
    assert line.endswith('POST /x request_id=req_1 status=200 error="said \\"no\\""')
    assert "\n" not in line


def test_logging_config_is_checked() -> None:
    assert parse_config({"logging": {"format": "json", "level": "debug"}}).logging == LoggingConfig(
        format="json", level="debug"
    )
    with pytest.raises(Exception, match=r"\[logging\]\.format must be one of 'text', 'json', got 'xml'"):
        parse_config({"logging": {"format": "xml"}})


async def test_serve_writes_json_lines(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The real command: `[logging] format = "json"` makes every stderr line a JSON object."""
    config = tmp_path / "trioproxy.toml"
    config.write_text('[logging]\nformat = "json"\n')
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        command = [sys.executable, "-m", "trioproxy", "serve", "--config", str(config), "--port", "0"]
        process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=stderr, check=False)
        )
        url = await listening_url(process, seconds=20)
        async with httpx.AsyncClient() as http:
            response = await http.post(url + CHAT, json={"model": "sim/echo", "messages": MESSAGES, "stream": True})
        process.send_signal(signal.SIGINT)
        with trio.fail_after(PROCESS_EXIT_BOUND):
            assert await process.wait() == 0

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    (access,) = [line for line in lines if line["logger"] == "trioproxy.access"]
    assert access["request_id"] == response.headers["x-request-id"]
    assert (access["status"], access["outcome"], access["provider"], access["model"]) == (
        200,
        "completed",
        "sim",
        "echo",
    )
    assert "private prompt" not in log.read_text()


async def test_a_client_that_leaves_before_the_first_token_is_a_disconnect(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(ttft=30))
    body = {"model": "up/gpt-x", "messages": MESSAGES, "stream": True}
    with trio.fail_after(5):
        async with httpx.AsyncClient() as http, trio.open_nursery() as leaving:
            leaving.start_soon(partial(http.post, proxy_url + CHAT, json=body))
            await upstream.wait_for_requests(1)  # it reached the upstream, whose first token is 30 s away
            leaving.cancel_scope.cancel()
        await upstream.requests[-1].disconnected.wait()

    samples = await scrape_until(
        proxy_url, lambda s: value(s, "trioproxy_upstream_cancellations_total", provider="up") == 1
    )
    assert value(samples, "trioproxy_requests_total", route=CHAT, status="0", outcome="client_disconnected") == 1
    assert value(samples, "trioproxy_client_disconnects_total", route=CHAT) == 1
