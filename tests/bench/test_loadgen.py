"""
The load generator's client against canned HTTP/1.1 servers and the benchmark upstream, on 127.0.0.1:0.
"""

from __future__ import annotations

import contextlib
import json
import socket
from functools import partial
from typing import Any

import orjson
import pytest
import trio

from tests.bench.test_websocket_client import server_frame
from tests.conftest import RequestSkipper, serve_proxy
from trioproxy import SSEDecoder, parse_config
from trioproxy._bench.loadgen import (
    MAX_NDJSON_LINE,
    _Connection,
    _Endpoint,
    _Reader,
    _run_stream,
    _SSEPayloads,
    _upgrade,
    run_phase,
)
from trioproxy._bench.stats import StreamRecord
from trioproxy._bench.upstream import BenchUpstream
from trioproxy._bench.websocket import PING, TEXT, MessageDecoder, accept_key
from trioproxy._bench.wire import PhaseSpec, Protocol
from trioproxy.testing import Reply, open_fake_upstream
from trioproxy.testing._wire import anthropic_frames, responses_frames, responses_stream_error


def ndjson(*events: dict[str, object]) -> bytes:
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


# --------------------------------------------------------------------------------------------
# Canned servers, framing and spacing streams as any compatible server may


def sse(*events: bytes, line_end: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + event + line_end + line_end for event in events)


def spaced_chunk(content: str) -> bytes:
    """A `chat.completion.chunk` as a server that re-serialises JSON (spaces after separators) writes it."""
    return json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"content": content}}]}).encode()


def chunked(body: bytes, *sizes: int) -> bytes:
    """`body` as HTTP chunks of the given sizes (the rest in one more), then the last chunk."""
    pieces, start = [], 0
    for size in [*sizes, len(body)]:
        if start < len(body):
            pieces.append(b"%x;ext=1\r\n%b\r\n" % (len(body[start : start + size]), body[start : start + size]))
            start += size
    return b"".join(pieces) + b"0\r\n\r\n"


class CannedServer:
    """
    Answers requests with `responses`, in order across connections. A connection is closed
    after a response that says `connection: close`, and after `per_connection` responses.
    """

    def __init__(self, *responses: bytes, per_connection: int | None = None) -> None:
        self.responses = list(responses)
        self.per_connection = per_connection
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        requests, answered = RequestSkipper(stream), 0
        async with stream:
            while self.responses and answered != self.per_connection:
                if not await requests.skip():
                    return
                response = self.responses.pop(0)
                await stream.send_all(response)
                answered += 1
                if b"connection: close" in response:
                    return


PATHS: dict[Protocol, str] = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "ndjson": "/v1/chat/stream/json",
    "responses": "/v1/responses",
}


async def run_streams(
    nursery: trio.Nursery, server: CannedServer, streams: int, tokens: int, protocol: Protocol = "openai"
) -> list[StreamRecord]:
    """`streams` streams one after another on one connection of the load generator."""
    [listener] = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    path = PATHS[protocol]
    spec = PhaseSpec(
        url=f"http://127.0.0.1:{listener.socket.getsockname()[1]}{path}",
        payload={"model": "m", "stream": True},
        protocol=protocol,
        concurrency=1,
        rounds=streams,
        warmup_rounds=0,
        tokens=tokens,
        stream_timeout_s=10.0,
    )
    endpoint = _Endpoint.from_spec(spec)
    connection = _Connection(endpoint, spec.connect_timeout_s)
    reader = _Reader()
    nursery.start_soon(reader.run)
    try:
        return [await _run_stream(connection, endpoint, spec, reader) for _ in range(streams)]
    finally:
        connection.close()
        nursery.cancel_scope.cancel()


OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


async def one_stream(nursery: trio.Nursery, body: bytes, tokens: int) -> StreamRecord:
    """One NDJSON stream whose response is `body`, from a server that then closes the connection."""
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )
    [record] = await run_streams(nursery, CannedServer(response, per_connection=1), 1, tokens, protocol="ndjson")
    return record


async def test_an_ndjson_stream_is_timed_and_checked(nursery: trio.Nursery) -> None:
    body = ndjson(
        {"type": "token", "data": " tok0"},
        {"type": "chunk", "data": " tok1 tok2"},
        {"type": "done", "metadata": {"buffer_latency_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0}}},
    )
    record = await one_stream(nursery, body, tokens=3)
    assert record.error is None
    assert (record.tokens, record.chunks, record.lost, record.duplicated, record.reordered) == (3, 2, 0, 0, 0)
    assert record.buffer_latency_ms == {"p50": 1.0, "p99": 2.0, "max": 3.0}
    assert record.ttft_s is not None
    assert record.duration_s is not None
    assert record.ttft_s <= record.duration_s


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (ndjson({"type": "token", "data": " tok0"}), "the stream ended without its end marker"),
        (ndjson({"type": "error", "data": "boom"}, {"type": "done"}), "in-stream error: boom"),
        (b'{"type": "token", "data": ' + b"x" * (MAX_NDJSON_LINE + 1), "malformed stream: _MalformedStream"),
    ],
)
async def test_a_broken_ndjson_stream_is_an_error(nursery: trio.Nursery, body: bytes, error: str) -> None:
    record = await one_stream(nursery, body, tokens=1)
    assert record.error is not None
    assert record.error.startswith(error), record.error


async def test_a_re_serialised_crlf_stream_in_odd_chunks_is_read_and_the_connection_reused(
    nursery: trio.Nursery,
) -> None:
    body = sse(
        spaced_chunk(""),
        spaced_chunk(" tok0 to"),
        spaced_chunk("k1"),
        spaced_chunk(" tok2"),
        b"[DONE]",
        line_end=b"\r\n",
    )
    response = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(body, 7, 1, 100, 3)
    server = CannedServer(response, response)
    records = await run_streams(nursery, server, streams=2, tokens=3)
    for record in records:
        assert record.error is None, record.error
        assert (record.tokens, record.chunks, record.lost, record.reordered) == (3, 3, 0, 0)
    assert server.connections == 1


async def test_a_kept_alive_connection_the_server_closed_gets_the_request_resent(nursery: trio.Nursery) -> None:
    body = sse(b'{"choices":[{"delta":{"content":" tok0"}}]}', b"[DONE]")
    # Content-Length framing and no `connection: close`: the client learns only on its next request.
    response = OK_HEAD + b"content-length: %d\r\n\r\n%b" % (len(body), body)
    server = CannedServer(response, response, response, per_connection=1)
    records = await run_streams(nursery, server, streams=3, tokens=1)
    assert [record.error for record in records] == [None, None, None]
    assert server.connections == 3


async def test_a_body_until_close_an_error_status_and_a_lost_token(nursery: trio.Nursery) -> None:
    until_close = (
        OK_HEAD + b"connection: close\r\n\r\n" + sse(b'{"choices":[{"delta":{"content":" tok1"}}]}', b"[DONE]")
    )
    error = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\noverload!"
    records = await run_streams(nursery, CannedServer(until_close, error), streams=2, tokens=2)
    assert records[0].error is None
    assert (records[0].tokens, records[0].lost) == (1, 1)
    assert records[1].error == "HTTP 503: overload!"


def anthropic_stream(tokens: int) -> bytes:
    """An Anthropic Messages stream of `tokens` tokens, as FakeUpstream (and so the benchmark upstream) sends it."""
    reply = Reply(tokens=tuple(f" tok{index}" for index in range(tokens)))
    return b"".join(frame.data for frame in anthropic_frames(reply, "claude", 1))


async def one_anthropic_stream(nursery: trio.Nursery, body: bytes, tokens: int) -> StreamRecord:
    response = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(body, 5, 100, 1)
    [record] = await run_streams(nursery, CannedServer(response), 1, tokens, protocol="anthropic")
    return record


async def test_an_anthropic_stream_is_timed_and_checked(nursery: trio.Nursery) -> None:
    body = anthropic_stream(3)
    assert b"event: ping" in body
    assert b"event: message_start" in body  # events that carry no text

    record = await one_anthropic_stream(nursery, body, tokens=3)

    assert record.error is None, record.error
    assert (record.tokens, record.chunks, record.lost, record.duplicated, record.reordered) == (3, 3, 0, 0, 0)
    assert len(record.gaps_us) == 2
    assert record.ttft_s is not None
    assert record.duration_s is not None
    assert record.ttft_s <= record.duration_s


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (anthropic_stream(2).partition(b"event: message_stop")[0], "the stream ended without its end marker"),
        (
            anthropic_stream(2).partition(b"event: content_block_stop")[0]
            + b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
            "in-stream error: {'type': 'overloaded_error', 'message': 'Overloaded'}",
        ),
    ],
)
async def test_a_broken_anthropic_stream_is_an_error(nursery: trio.Nursery, body: bytes, error: str) -> None:
    record = await one_anthropic_stream(nursery, body, tokens=2)
    assert record.error == error


@pytest.mark.parametrize(
    ("stream", "payloads"),
    [
        (b'data: {"a":1}\n\n', [b'{"a":1}']),
        (b'\xef\xbb\xbfdata:{"a":1}\r\n\r\n', [b'{"a":1}']),
        (b"data: one\rdata:  two\r\r", [b"one\n two"]),
        (b": comment\nevent: x\nid: 1\ndata\ndatax: no\ndata: y\n\nretry: 5\n\n", [b"\ny"]),
        (b"data: a\n\ndata: b\r\n\r\ndata: c\n", [b"a", b"b"]),
        (b'event: content_block_delta\ndata: {"a":1}\n\n', [b'{"a":1}']),
        (b"event: x\ndata: one\ndata: two\n\nevent: ping\n\nevent: y\ndata:\n\n", [b"one\ntwo", b""]),
    ],
)
def test_sse_payloads_are_the_same_however_the_stream_is_split(stream: bytes, payloads: list[bytes]) -> None:
    for size in range(1, len(stream) + 1):
        decoder = _SSEPayloads()
        found = [
            payload for start in range(0, len(stream), size) for payload in decoder.feed(stream[start : start + size])
        ]
        assert found == payloads, size


def openai_phase(base_url: str, *, tokens: int, **phase: Any) -> PhaseSpec:
    """Four connections streaming Chat Completions from `base_url`."""
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    fields: dict[str, Any] = {"concurrency": 4, "rounds": 1, "warmup_rounds": 0, "stream_timeout_s": 10.0, **phase}
    return PhaseSpec(url=f"{base_url}/v1/chat/completions", payload=payload, protocol="openai", tokens=tokens, **fields)


def anthropic_phase(base_url: str, *, tokens: int, **phase: Any) -> PhaseSpec:
    """Four connections streaming Anthropic Messages from `base_url`."""
    payload = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    fields: dict[str, Any] = {"concurrency": 4, "rounds": 1, "warmup_rounds": 0, "stream_timeout_s": 10.0, **phase}
    return PhaseSpec(url=f"{base_url}/v1/messages", payload=payload, protocol="anthropic", tokens=tokens, **fields)


async def go() -> None:
    """Where the runner reads its CPU counters between the warm-up and the measured rounds."""
    await trio.lowlevel.checkpoint()


async def test_a_phase_against_the_benchmark_upstream_loses_nothing(nursery: trio.Nursery) -> None:
    upstream = await nursery.start(BenchUpstream(tokens=8, ttft=0.001, interval=0.001).serve)
    spec = openai_phase(upstream.url, tokens=8, rounds=2, warmup_rounds=1)
    with trio.fail_after(20):
        result = await run_phase(spec, go)
    assert len(result.records) == 8
    for record in result.records:
        assert record.error is None
        assert (record.tokens, record.lost, record.duplicated, record.reordered) == (
            8,
            0,
            0,
            0,
        )
        assert len(record.gaps_us) == 7
        assert record.ttft_s is not None
    assert upstream.connections_accepted == 4  # warm-up and measured rounds on the same kept-alive connections


async def test_an_anthropic_phase_against_the_benchmark_upstream_loses_nothing(nursery: trio.Nursery) -> None:
    upstream = await nursery.start(BenchUpstream(tokens=8, ttft=0.001, interval=0.001).serve)
    with trio.fail_after(20):
        result = await run_phase(anthropic_phase(upstream.url, tokens=8, rounds=2), go)
    assert len(result.records) == 8
    for record in result.records:
        assert record.error is None, record.error
        assert (record.tokens, record.lost, record.duplicated, record.reordered, len(record.gaps_us)) == (8, 0, 0, 0, 7)


async def test_an_anthropic_request_says_its_api_version(nursery: trio.Nursery) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=(" tok0",)))
    result = await run_phase(anthropic_phase(upstream.url, tokens=1, concurrency=1), go)

    assert [record.error for record in result.records] == [None]
    [sent] = upstream.requests
    assert sent.path == "/v1/messages"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "text/event-stream" in sent.headers["accept"]


async def test_staggered_streams_start_spread_over_the_stagger(nursery: trio.Nursery) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=[f" tok{i}" for i in range(3)]))
    measured_from: list[float] = []

    async def go_now() -> None:
        measured_from.append(trio.current_time())

    result = await run_phase(openai_phase(upstream.url, tokens=3, stagger_s=0.2), go_now)

    assert [record.error for record in result.records] == [None] * 4
    starts = sorted(request.started for request in upstream.requests)
    # Connection i starts i × 50 ms after the measured rounds begin, or later (a busy machine
    # delays a start, and with it only that start), never earlier.
    assert all(start >= measured_from[0] + i * 0.05 for i, start in enumerate(starts)), (measured_from, starts)


def responses_phase(url: str, *, tokens: int, protocol: Protocol = "responses", **phase: Any) -> PhaseSpec:
    """Four connections streaming OpenAI Responses from `url` (its `/v1/responses`)."""
    payload = {"model": "m", "input": "hi", "stream": True, "store": False}
    fields: dict[str, Any] = {"concurrency": 4, "rounds": 1, "warmup_rounds": 0, "stream_timeout_s": 10.0, **phase}
    return PhaseSpec(url=url, payload=payload, protocol=protocol, tokens=tokens, **fields)


def check_every_token(records: list[StreamRecord], streams: int, tokens: int) -> None:
    assert len(records) == streams
    for record in records:
        assert record.error is None, record.error
        assert (record.tokens, record.lost, record.duplicated, record.reordered) == (tokens, 0, 0, 0)
        assert len(record.gaps_us) == tokens - 1
        assert record.ttft_s is not None


async def test_a_responses_phase_against_the_benchmark_upstream_loses_nothing(nursery: trio.Nursery) -> None:
    upstream = await nursery.start(BenchUpstream(tokens=8, ttft=0.001, interval=0.001).serve)
    with trio.fail_after(20):
        result = await run_phase(responses_phase(upstream.url + "/v1/responses", tokens=8, rounds=2), go)
    check_every_token(result.records, 8, 8)


def responses_stream(tokens: int) -> bytes:
    reply = Reply(tokens=tuple(f" tok{index}" for index in range(tokens)))
    return b"".join(frame.data for frame in responses_frames(reply, "gpt", 1))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (responses_stream(2).partition(b"event: response.completed")[0], "the stream ended without its end marker"),
        (
            responses_stream(2).replace(b"response.completed", b"response.incomplete"),
            "response.incomplete: None",
        ),
        (
            responses_stream(2).partition(b"event: response.output_item.done")[0]
            + responses_stream_error("Overloaded", 9),
            "in-stream error: {'type': 'server_error', 'code': 'server_error', 'message': 'Overloaded', 'param': None}",
        ),
    ],
)
async def test_a_broken_responses_stream_is_an_error(nursery: trio.Nursery, body: bytes, error: str) -> None:
    response = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(body, 5, 100, 1)
    [record] = await run_streams(nursery, CannedServer(response), 1, 2, protocol="responses")
    assert record.error == error


async def test_websocket_mode_streams_one_response_create_after_another_on_each_connection(
    nursery: trio.Nursery,
) -> None:
    upstream = await nursery.start(BenchUpstream(tokens=8, ttft=0.001, interval=0.001).serve)
    config = parse_config(
        {"providers": {"up": {"type": "openai_responses", "base_url": upstream.url + "/v1"}}}, environ={}
    )
    proxy_url = await serve_proxy(nursery, config)
    spec = responses_phase(proxy_url + "/v1/responses", tokens=8, protocol="responses-ws", rounds=2, warmup_rounds=1)
    spec = PhaseSpec(**{**spec.__dict__, "payload": {**spec.payload, "model": "up/m"}})
    with trio.fail_after(20):
        result = await run_phase(spec, go)
    check_every_token(result.records, 8, 8)
    assert upstream.connections_accepted == 4  # as many as WebSockets: each ran its streams in turn


async def test_a_refused_websocket_upgrade_is_every_stream_s_error(nursery: trio.Nursery) -> None:
    upstream = await nursery.start(BenchUpstream(tokens=1, ttft=0.001, interval=0.001).serve)  # no WebSocket route
    spec = responses_phase(upstream.url + "/v1/responses", tokens=1, protocol="responses-ws", concurrency=1)
    with trio.fail_after(20):
        result = await run_phase(spec, go)
    [record] = result.records
    assert record.error is not None
    assert record.error.startswith("connection: ProtocolError: the WebSocket upgrade was refused"), record.error


async def test_a_ping_that_comes_with_the_websocket_handshake_is_answered_not_an_error() -> None:
    """hypercorn pings as soon as it accepts a WebSocket: that frame may share a read with the 101."""
    endpoint = _Endpoint.from_spec(
        responses_phase("http://127.0.0.1:9/v1/responses", tokens=1, protocol="responses-ws", concurrency=1)
    )
    client, server = socket.socketpair()
    with client, server:
        client.setblocking(False)
        server.settimeout(5)
        handshake = (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
            b"sec-websocket-accept: " + accept_key(endpoint.handshake_key) + b"\r\n\r\n"
        )
        server.sendall(handshake + b"\x89\x04ping")  # the 101 and a ping frame in one write
        with trio.fail_after(5):
            messages = await _upgrade(client, endpoint)
        answer = server.recv(65536)
    assert messages.feed(b"") == []
    pong = answer.rpartition(b"\r\n\r\n")[2]  # after the handshake's request
    assert pong[0] == 0x8A  # FIN | PONG, masked as a client's frame
    assert len(pong) == 2 + 4 + 4


async def test_a_pong_the_socket_cannot_take_whole_fails_the_connection() -> None:
    """
    The reader answers a ping without waiting (it serves every socket): when the send buffer
    cannot take the whole pong, the WebSocket is given up with an error in the stream's
    record, rather than the pong left out, or cut short and every frame after it corrupt.
    """
    spec = responses_phase("http://127.0.0.1:9/v1/responses", tokens=1, protocol="responses-ws", concurrency=1)
    endpoint = _Endpoint.from_spec(spec)
    messages = [event.data.encode() for event in SSEDecoder().feed(responses_stream(1))]
    client, server = socket.socketpair()  # a Unix socket: its buffers fill and stay full, with no ACK to wait for
    with client, server:
        client.setblocking(False)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        connection = _Connection(endpoint, spec.connect_timeout_s)
        connection.socket, connection.messages = client, MessageDecoder()  # as `open` leaves a WebSocket
        peer = trio.socket.from_stdlib_socket(server)

        async def answer_then_read_nothing() -> None:
            received = b""
            while len(received) < len(endpoint.request):  # the response.create message
                received += await peer.recv(65536)
            with contextlib.suppress(BlockingIOError):  # the client's send buffer filled: not one byte more fits
                while True:
                    client.send(b"\0" * 65536)
            await peer.send(server_frame(PING, b"p" * 125) + b"".join(server_frame(TEXT, m) for m in messages))

        reader = _Reader()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            nursery.start_soon(answer_then_read_nothing)
            with trio.fail_after(5):
                record = await _run_stream(connection, endpoint, spec, reader)
            nursery.cancel_scope.cancel()
    assert record.error is not None
    assert record.error.startswith("connection: ProtocolError: a pong could not be written whole"), record.error
    assert connection.socket is None  # closed: the next stream opens another
