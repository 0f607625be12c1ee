"""
`[limits]` end to end, on real hypercorn and a real scripted upstream on 127.0.0.1:0, with the
official openai SDK as the client: every refusal has its status and the SDK's matching
exception (413 `APIStatusError`, 400 `BadRequestError`, 429 `RateLimitError` with
`Retry-After`, 503 `InternalServerError`), comes in each protocol's own shape, and never
reaches the upstream; a stream's slot frees however the stream ends; and a flood of clients
is refused quickly while the streams already admitted finish whole.

The one test that needs a minute to pass runs the app in-process on trio's MockClock.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
import trio.lowlevel
import trio_websocket

from tests.conftest import (
    Instant,
    in_process,
    openai_sdk,
    openai_upstream_config,
    serve_proxy,
    streamed_chat_text,
    wait_until_idle,
)
from trioproxy import SSEDecoder, StreamEvent, parse_config
from trioproxy._request import MAX_JSON_DEPTH
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply, open_fake_upstream

SLOW_TOKENS = 50
SLOW_INTERVAL = 0.05  # a slow stream lasts about two and a half seconds


def reply_for(request: RecordedRequest) -> Reply:
    """`slow`: SLOW_TOKENS tokens, SLOW_INTERVAL apart; `endless`: a stream no test waits out; else 3 tokens."""
    prompt = request.json["messages"][-1]["content"]
    if prompt == "slow":
        return Reply(tokens=tuple(f"t{i} " for i in range(SLOW_TOKENS)), interval=SLOW_INTERVAL)
    if prompt == "endless":
        return Reply(tokens=("tick",) * 100_000, interval=0.01)
    if prompt == "fail":
        return Reply(status=500)
    return Reply(tokens=("a", "b", "c"))


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery, reply_for)


async def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream, **tables: Any) -> str:
    return await serve_proxy(nursery, openai_upstream_config(upstream, **tables))


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def sse_events(body: bytes) -> list[StreamEvent]:
    return [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(body)]


async def open_stream(client: openai.AsyncOpenAI, prompt: str) -> openai.AsyncStream[Any]:
    """A streamed completion, once its first chunk arrived (the proxy admitted it and the upstream answered)."""
    stream = await client.chat.completions.create(model="up/m", messages=messages(prompt), stream=True)
    await stream.__anext__()
    return stream


# --------------------------------------------------------------------------------------------
# 413 and 400: the size and the shape of a request


async def test_a_body_over_max_body_bytes_is_a_413_before_anything_else(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_body_bytes": 4096})
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="up/m", messages=messages("x" * 5000))
        assert (await client.chat.completions.create(model="up/m", messages=messages("x" * 3000))).choices
    assert type(info.value) is openai.APIStatusError  # no subclass: the SDK has none for 413
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"
    assert "4096 bytes" in info.value.body["message"]
    assert len(upstream.requests) == 1  # only the one within the limit


async def test_a_declared_length_over_the_limit_is_refused_without_waiting_for_the_body(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_body_bytes": 4096})
    host, port = proxy.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n"
        b"content-length: 1000000000\r\n\r\n{"
    )
    await stream.send_all(head)  # and not one byte more: the answer must not wait for them
    received = b""
    with trio.fail_after(2):
        while b"request_too_large" not in received:
            received += await stream.receive_some()
    assert received.startswith(b"HTTP/1.1 413 ")
    await stream.aclose()


async def chunks(total: int, size: int = 1000) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/stream", "/v1/chat/stream/json"])
async def test_a_chunked_body_is_cut_off_at_the_limit_in_the_routes_own_shape(
    nursery: trio.Nursery, upstream: FakeUpstream, path: str
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_body_bytes": 4096})
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + path, content=chunks(6000), headers={"content-type": "application/json"})
    assert response.status_code == 413
    if path == "/v1/chat/completions":
        error = response.json()["error"]
    elif path == "/v1/chat/stream":
        (event,) = sse_events(response.content)
        assert event.type == "error"
        error = event.data
    else:
        event = StreamEvent.from_json(response.text.strip())
        assert event.type == "error"
        error = event.data
    assert error["code"] == "request_too_large"
    assert upstream.requests == type(upstream.requests)()


async def test_too_many_messages_and_too_long_strings_are_400s(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_messages": 3, "max_string_chars": 100})
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.BadRequestError) as many:
            await client.chat.completions.create(model="up/m", messages=messages("hi") * 4)
        with pytest.raises(openai.BadRequestError) as long:
            await client.chat.completions.create(
                model="up/m", messages=[*messages("hi"), {"role": "user", "content": "y" * 101}], stream=True
            )
        ok = await client.chat.completions.create(model="up/m", messages=messages("y" * 100) * 3)
    assert (many.value.body["code"], many.value.body["param"]) == ("array_above_max_length", "messages")
    assert (long.value.body["code"], long.value.body["param"]) == ("string_above_max_length", "messages[1].content")
    assert ok.choices[0].message.content == "abc"
    async with httpx.AsyncClient() as http:
        body = {"provider": "up", "model": "m", "messages": messages("z" * 101)}
        response = await http.post(proxy + "/v1/chat/stream", json=body)
    assert response.status_code == 400
    (event,) = sse_events(response.content)
    assert event.type == "error"
    assert event.data["code"] == "string_above_max_length"
    assert len(upstream.requests) == 1


def nested_arrays(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


async def test_a_body_nested_just_within_max_json_depth_streams_and_one_deeper_is_a_400(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    """Deeper than orjson re-serialises for the upstream (254 levels) was a 500 with a traceback."""
    proxy = await start_proxy(nursery, upstream)
    async with openai_sdk(proxy) as client:
        within = nested_arrays(MAX_JSON_DEPTH - 1)  # the body is the first level
        stream = await client.chat.completions.create(
            model="up/m", messages=messages("hi"), stream=True, extra_body={"x": within}
        )
        assert await streamed_chat_text(stream) == "abc"
        for levels in (MAX_JSON_DEPTH, 300, 900):
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model="up/m", messages=messages("hi"), stream=True, extra_body={"x": nested_arrays(levels)}
                )
            assert f"nested deeper than {MAX_JSON_DEPTH} levels" in info.value.body["message"]
    assert [request.json["x"] for request in upstream.requests] == [within]


async def test_a_body_that_trickles_is_a_408_after_the_configured_body_timeout(autojump_clock: trio.abc.Clock) -> None:
    """In-process (no sockets), so that the wait passes on trio's MockClock."""
    config = parse_config({"server": {"body_timeout": 5}}, environ={})

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"model": "sim/echo", '
        await trio.sleep(3600)  # and the rest never comes

    async with in_process(config) as (http, _):
        start = trio.current_time()
        headers = {"content-type": "application/json"}
        response = await http.post("/v1/chat/completions", content=trickle(), headers=headers)
    assert response.status_code == 408
    assert 5 <= trio.current_time() - start < 6
    assert response.json()["error"]["message"] == "the request body did not arrive within [server] body_timeout (5 s)"


# --------------------------------------------------------------------------------------------
# 429: requests per minute and streams per key


async def test_requests_per_minute_is_a_429_with_an_honest_retry_after(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"requests_per_minute": 2})
    async with openai_sdk(proxy) as client:
        for _ in range(2):
            await client.chat.completions.create(model="up/m", messages=messages("hi"))
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="up/m", messages=messages("hi"), stream=True)
    assert info.value.status_code == 429
    assert info.value.body["code"] == "rate_limit_exceeded"
    # The first request leaves the window a minute after its second ended: now, give or take a second.
    assert 59 <= int(info.value.response.headers["retry-after"]) <= 61

    async with httpx.AsyncClient() as http:
        body = {"provider": "up", "model": "m", "messages": messages("hi")}
        response = await http.post(proxy + "/v1/chat/stream/json", json=body)
    assert response.status_code == 429
    assert 59 <= int(response.headers["retry-after"]) <= 61
    event = StreamEvent.from_json(response.text.strip())
    assert event.type == "error"
    assert event.data["status"] == 429
    assert event.data["retry_after"] == int(response.headers["retry-after"])
    assert len(upstream.requests) == 2


async def test_the_window_frees_a_slot_when_retry_after_says(autojump_clock: trio.abc.Clock) -> None:
    """In-process (no sockets), so that the minute passes on trio's MockClock."""
    config = parse_config(
        {
            "limits": {"requests_per_minute": 2},
            "providers": {"sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0}},
        },
        environ={},
    )
    async with in_process(config) as (_, client):

        async def ask() -> str:
            completion = await client.chat.completions.create(model="sim/echo", messages=messages("hi"))
            return completion.choices[0].message.content or ""

        start = trio.current_time()
        assert await ask() == "hi"
        await trio.sleep(10)
        assert await ask() == "hi"
        await trio.sleep(20)
        with pytest.raises(openai.RateLimitError) as info:
            await ask()
        retry_after = int(info.value.response.headers["retry-after"])
        assert 30 <= retry_after <= 31  # the first request leaves the window at about 60 s
        await trio.sleep(retry_after - 1)
        with pytest.raises(openai.RateLimitError):  # not a second early
            await ask()
        await trio.sleep(1)
        assert await ask() == "hi"
        # The second request (at 10 s) is still in the window, for about ten seconds more.
        with pytest.raises(openai.RateLimitError) as again:
            await ask()
        assert 9 <= int(again.value.response.headers["retry-after"]) <= 11
        assert trio.current_time() - start < 65


async def test_streams_per_key_are_counted_per_client_key(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(nursery, upstream, auth={"keys": ["key-a", "key-b"]}, limits={"max_streams_per_key": 1})
    async with openai_sdk(proxy, "key-a") as a, openai_sdk(proxy, "key-b") as b:
        running = await open_stream(a, "endless")
        with pytest.raises(openai.RateLimitError) as info:
            await a.chat.completions.create(model="up/m", messages=messages("hi"))
        assert (await b.chat.completions.create(model="up/m", messages=messages("hi"))).choices  # its own share
        await running.close()
    assert info.value.body["code"] == "too_many_streams"
    assert info.value.response.headers["retry-after"] == "1"
    assert len(upstream.requests) == 2


async def test_without_keys_a_client_is_its_address(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_streams_per_key": 1})
    async with openai_sdk(proxy, "one") as first, openai_sdk(proxy, "two") as second:
        running = await open_stream(first, "endless")
        with pytest.raises(openai.RateLimitError):  # another key, but the same address
            await second.chat.completions.create(model="up/m", messages=messages("hi"))
        await running.close()


# --------------------------------------------------------------------------------------------
# 503: the server's concurrent streams, and the slot freeing however a stream ends


async def test_the_global_limit_is_a_503_the_sdk_calls_internal_server_error(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_concurrent_streams": 1})
    async with openai_sdk(proxy) as client:
        running = await open_stream(client, "endless")
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="up/m", messages=messages("hi"), stream=True)
        async with httpx.AsyncClient() as http:
            body = {"provider": "up", "model": "m", "messages": messages("hi")}
            generic = await http.post(proxy + "/v1/chat/stream", json=body)
        await running.close()
    assert info.value.status_code == 503
    assert (info.value.body["type"], info.value.body["code"]) == ("overloaded_error", "server_overloaded")
    assert info.value.response.headers["retry-after"] == "1"
    assert generic.status_code == 503
    assert generic.headers["retry-after"] == "1"
    (event,) = sse_events(generic.content)
    assert event.type == "error"
    assert event.data["type"] == "overloaded_error"
    assert len(upstream.requests) == 1


async def test_the_slot_frees_when_the_stream_completes_fails_or_its_client_leaves(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_concurrent_streams": 1})
    async with openai_sdk(proxy) as client:
        # Completion: the slot is free by the time the client has the whole answer.
        for _ in range(3):
            assert (await client.chat.completions.create(model="up/m", messages=messages("hi"))).choices
        # An upstream failure.
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="up/m", messages=messages("fail"), stream=True)
        assert failed.value.status_code == 500
        await wait_until_idle(proxy)
        assert (await client.chat.completions.create(model="up/m", messages=messages("hi"))).choices

    # A client that goes away mid-stream, without a word.
    async with httpx.AsyncClient() as http, openai_sdk(proxy) as client:
        body = {"model": "up/m", "messages": messages("endless"), "stream": True}
        async with http.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            received = response.aiter_bytes()  # kept: a collected iterator would close the response
            await anext(received)
            with pytest.raises(openai.InternalServerError):  # the stream holds the slot...
                await client.chat.completions.create(model="up/m", messages=messages("hi"))
        await wait_until_idle(proxy)  # ... until its client is gone
        assert (await client.chat.completions.create(model="up/m", messages=messages("hi"))).choices
    (endless,) = [r for r in upstream.requests if r.json["messages"][-1]["content"] == "endless"]
    assert endless.disconnected.is_set()


async def test_a_flood_is_refused_fast_while_admitted_streams_finish_whole(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    admitted_count, flood_count = 4, 100
    proxy = await start_proxy(nursery, upstream, limits={"max_concurrent_streams": admitted_count})
    streams_started = trio.Event()
    started = 0
    admitted: list[tuple[list[str], list[Instant]]] = []  # per stream: its tokens and when each came
    refusals: list[tuple[int, float]] = []  # status, when it came back

    async with openai_sdk(proxy) as client:

        async def admitted_stream() -> None:
            nonlocal started
            tokens: list[str] = []
            times: list[Instant] = []
            admitted.append((tokens, times))
            stream = await client.chat.completions.create(model="up/m", messages=messages("slow"), stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    tokens.append(chunk.choices[0].delta.content)
                    times.append(Instant.now())
                    if len(tokens) == 1:
                        started += 1
                        if started == admitted_count:
                            streams_started.set()

        async def refused_request() -> None:
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(model="up/m", messages=messages("slow"), stream=True)
            refusals.append((refused.value.status_code, trio.current_time()))

        with trio.fail_after(30):
            async with trio.open_nursery() as streams:
                for _ in range(admitted_count):
                    streams.start_soon(admitted_stream)
                await streams_started.wait()
                flood_started = trio.current_time()
                async with trio.open_nursery() as flood:
                    for _ in range(flood_count):
                        flood.start_soon(refused_request)

    assert [status for status, _ in refusals] == [503] * flood_count
    first_admitted_end = min(times[-1].time for _, times in admitted)
    assert max(when for _, when in refusals) < first_admitted_end  # every refusal came back mid-stream
    expected = "".join(f"t{i} " for i in range(SLOW_TOKENS))
    assert ["".join(tokens) for tokens, _ in admitted] == [expected] * admitted_count
    # The admitted streams kept flowing through the flood: no gap near the whole refusal burst
    # (a generous bound: tokens come SLOW_INTERVAL apart). Client, proxy and upstream share this
    # thread, so a gap is taken net of the thread's wait for a CPU: on a loaded machine the bare
    # gaps reached 1.4 s, the net ones 0.2 s.
    flood_gaps = [a.to(b) for _, times in admitted for a, b in itertools.pairwise(times) if b.time > flood_started]
    assert max(flood_gaps) < 1.0
    assert len(upstream.requests) == admitted_count  # not one refusal reached the upstream


# --------------------------------------------------------------------------------------------
# WebSocket: refusals are error events on the stream, and the connection stays open


def ws_request(prompt: str, request_id: str) -> str:
    return orjson.dumps({"id": request_id, "provider": "up", "model": "m", "messages": messages(prompt)}).decode()


async def next_event(connection: trio_websocket.WebSocketConnection, request_id: str | None) -> dict:
    with trio.fail_after(2):
        while True:
            message = orjson.loads(await connection.get_message())
            if message.get("id") == request_id and message["type"] in ("error", "done"):
                return message


async def test_websocket_stream_requests_are_limited_and_refused_with_error_events(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_streams_per_key": 1, "max_body_bytes": 1000})
    url = proxy.replace("http://", "ws://", 1) + "/v1/chat/ws"
    async with trio_websocket.open_websocket_url(url) as connection:
        await connection.send_message(ws_request("endless", "a"))
        await upstream.wait_for_requests(1)
        await connection.send_message(ws_request("hi", "b"))
        refused = await next_event(connection, "b")
        assert refused["type"] == "error"
        assert (refused["data"]["status"], refused["data"]["code"]) == (429, "too_many_streams")
        assert refused["data"]["retry_after"] == 1

        await connection.send_message(ws_request("x" * 1500, "big"))
        too_large = await next_event(connection, None)  # not parsed, so not tagged
        assert (too_large["data"]["status"], too_large["data"]["code"]) == (413, "request_too_large")

        await connection.send_message(orjson.dumps({"type": "cancel", "id": "a"}).decode())
        assert (await next_event(connection, "a"))["type"] == "error"  # cancelled
        await wait_until_idle(proxy)
        await connection.send_message(ws_request("hi", "c"))
        assert (await next_event(connection, "c"))["type"] == "done"
    assert len(upstream.requests) == 2


async def test_a_websocket_message_nested_too_deep_gets_an_error_event_and_the_connection_stays_open(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream)
    url = proxy.replace("http://", "ws://", 1) + "/v1/chat/ws"
    async with trio_websocket.open_websocket_url(url) as connection:
        # Deeper than orjson serialises: written by hand.
        await connection.send_message(ws_request("hi", "deep")[:-1] + ', "x": ' + "[" * 300 + "]" * 300 + "}")
        refused = await next_event(connection, None)  # not parsed, so not tagged
        assert refused["data"]["status"] == 400
        assert f"nested deeper than {MAX_JSON_DEPTH} levels" in refused["data"]["message"]
        await connection.send_message(ws_request("hi", "ok"))
        assert (await next_event(connection, "ok"))["type"] == "done"
    assert len(upstream.requests) == 1


async def test_a_websocket_message_far_over_the_limit_closes_the_connection_unread(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream, limits={"max_body_bytes": 1000})
    url = proxy.replace("http://", "ws://", 1) + "/v1/chat/ws"
    async with trio_websocket.open_websocket_url(url) as connection:
        await connection.send_message(ws_request("x" * 2500, "huge"))  # over twice the limit
        with trio.fail_after(2), pytest.raises(trio_websocket.ConnectionClosed) as info:
            await connection.get_message()
    assert info.value.reason.code == 1009  # message too big
    assert len(upstream.requests) == 0
