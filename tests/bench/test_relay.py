"""
The bare trio relay (`cpu_per_stream.py --reference trio-relay`) through real sockets: the
official SDK streams through it, a kept-alive connection carries the next request, and a
response cut short ends the client's connection rather than passing as whole.
"""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from tests.bench.test_benchmark_upstream import MESSAGES, TEXT, read_response, request, start
from trioproxy._bench import relay


async def start_relay(nursery: trio.Nursery, host: str, port: int) -> str:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, functools.partial(relay._serve_connection, host, port), 0, host="127.0.0.1")
    )
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_the_sdk_streams_through_the_relay_on_one_kept_alive_connection(nursery: trio.Nursery) -> None:
    upstream = await start(nursery)
    url = await start_relay(nursery, "127.0.0.1", upstream.port)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as sdk:
        with trio.fail_after(10):
            for _ in range(2):
                stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
                assert text == TEXT
    assert upstream.connections_accepted == 1  # one client connection, one upstream connection, two requests


async def test_two_requests_in_one_write_are_answered_in_order(nursery: trio.Nursery) -> None:
    upstream = await start(nursery)
    url = await start_relay(nursery, "127.0.0.1", upstream.port)
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    async with stream:
        with trio.fail_after(10):
            first = request("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True})
            second = request("/v1/models", b"", method="GET")
            await stream.send_all(first + second)
            status, _, body = await read_response(stream)
            assert status == 200
            assert body.endswith(b"data: [DONE]\n\n")
            status, _, body = await read_response(stream)
            assert status == 200
            assert b'"object":"list"' in body


async def test_a_response_cut_short_ends_the_client_connection(nursery: trio.Nursery) -> None:
    async def cut_short(upstream_side: trio.SocketStream) -> None:
        async with upstream_side:
            await upstream_side.receive_some()
            await upstream_side.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, cut_short, 0, host="127.0.0.1"))
    url = await start_relay(nursery, "127.0.0.1", listeners[0].socket.getsockname()[1])
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    async with stream:
        with trio.fail_after(10):
            await stream.send_all(request("/v1/chat/completions", {"model": "m", "messages": MESSAGES}))
            received = b""
            while data := await stream.receive_some():
                received += data
    assert received.endswith(b"5\r\nhel")  # what came, and then the end: never a whole-looking body


@pytest.mark.parametrize("upstream", ["127.0.0.1:9", "ftp://127.0.0.1:9"])
def test_the_upstream_must_be_an_http_url(upstream: str) -> None:
    with pytest.raises(SystemExit, match="--upstream must be http://HOST:PORT"):
        trio.run(relay.main, upstream, 0)
