"""The load generator's client against a canned HTTP/1.1 server on 127.0.0.1:0."""

from __future__ import annotations

from functools import partial

import orjson
import pytest
import trio

from trioproxy._bench.loadgen import MAX_NDJSON_LINE, _Connection, _Endpoint, _run_stream, run_phase
from trioproxy._bench.stats import StreamRecord
from trioproxy._bench.wire import PhaseSpec
from trioproxy.testing import Reply, open_fake_upstream


def ndjson(*events: dict[str, object]) -> bytes:
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


async def _answer(body: bytes, stream: trio.SocketStream) -> None:
    """Read the request head, send `body` as one NDJSON response, close."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some(65536)
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: {len(body)}\r\n\r\n"
    await stream.send_all(head.encode() + body)
    await stream.aclose()


async def one_stream(nursery: trio.Nursery, body: bytes, tokens: int) -> StreamRecord:
    [listener] = await nursery.start(partial(trio.serve_tcp, partial(_answer, body), 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    spec = PhaseSpec(
        url=f"http://127.0.0.1:{port}/v1/chat/stream/json",
        payload={"model": "up/m"},
        protocol="ndjson",
        concurrency=1,
        rounds=1,
        warmup_rounds=0,
        tokens=tokens,
        stream_timeout_s=10.0,
    )
    endpoint = _Endpoint.from_spec(spec)
    connection = _Connection(endpoint, spec.connect_timeout_s)
    try:
        return await _run_stream(connection, endpoint, spec)
    finally:
        await connection.close()
        nursery.cancel_scope.cancel()


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
    assert record.ttft_s is not None and record.duration_s is not None and record.ttft_s <= record.duration_s


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
    assert record.error is not None and record.error.startswith(error), record.error


async def test_staggered_streams_start_spread_over_the_stagger(nursery: trio.Nursery) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=[f" tok{i}" for i in range(3)]))
    spec = PhaseSpec(
        url=f"{upstream.url}/v1/chat/completions",
        payload={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        protocol="openai",
        concurrency=4,
        rounds=1,
        warmup_rounds=0,
        tokens=3,
        stream_timeout_s=30.0,
        stagger_s=0.2,
    )

    async def go() -> None:
        return None  # the runner reads its CPU counters here

    result = await run_phase(spec, go)

    assert [record.error for record in result.records] == [None] * 4
    starts = sorted(request.started for request in upstream.requests)
    # Connection i starts 50 ms after connection i - 1 (or later, never earlier).
    assert all(later - earlier >= 0.049 for earlier, later in zip(starts, starts[1:])), starts
