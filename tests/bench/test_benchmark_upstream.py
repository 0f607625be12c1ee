"""
The benchmark upstream through its real interfaces: a socket on 127.0.0.1:0, the official
`openai` and `anthropic` SDKs, and raw HTTP/1.1 where the bytes themselves are the point.

Timings are 1 ms or less, so no test sleeps long; every wait has a `fail_after`.
"""

from __future__ import annotations

import contextlib
import re
import socket

import orjson
import pytest
import trio

from tests.conftest import Instant, anthropic_sdk, openai_sdk, wait_until
from trioproxy._bench.http1 import ChunkedBody, find_head_end, parse_head
from trioproxy._bench.upstream import BenchUpstream
from trioproxy.testing import Reply
from trioproxy.testing._wire import anthropic_frames, openai_frames, responses_frames

TOKENS = 5
TEXT = "".join(f" tok{index}" for index in range(TOKENS))
MESSAGES = [{"role": "user", "content": "x"}]


async def start(nursery: trio.Nursery, **options: float) -> BenchUpstream:
    settings = {"tokens": TOKENS, "ttft": 0.001, "interval": 0.001} | options
    return await nursery.start(BenchUpstream(**settings).serve)  # type: ignore[arg-type]


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> BenchUpstream:
    return await start(nursery)


async def connect(upstream: BenchUpstream) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", upstream.port)


def request(path: str, payload: object, *, method: str = "POST", extra: str = "") -> bytes:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def read_response(stream: trio.SocketStream, pending: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One whole response (status, headers, de-chunked body) as the harness's parser reads it."""
    buffer = pending
    while (end := find_head_end(buffer)) < 0:
        buffer += await stream.receive_some()
    head = parse_head(buffer[:end])
    framing = head.response_body()
    body, data = b"", buffer[end:]
    while not framing.done:
        body += framing.feed(data or await stream.receive_some())
        data = b""
    return head.status, head.headers, body


async def test_an_openai_stream_through_the_sdk_has_every_token_and_honours_include_usage(
    upstream: BenchUpstream,
) -> None:
    async with openai_sdk(upstream.url) as sdk:
        with trio.fail_after(10):
            stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
            with_usage = await sdk.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            usage_chunks = [chunk async for chunk in with_usage]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == TEXT
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert usage_chunks[-1].choices == []
    assert usage_chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[0].id != usage_chunks[0].id  # each response its own id
    assert upstream.connections_accepted == 1  # the second request reused the kept-alive connection


async def test_a_non_streaming_openai_request_gets_a_chat_completion(upstream: BenchUpstream) -> None:
    async with openai_sdk(upstream.url) as sdk:
        with trio.fail_after(10):
            completion = await sdk.chat.completions.create(model="gpt-x", messages=MESSAGES)
            models = await sdk.models.list()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-x"
    assert completion.choices[0].message.content == TEXT
    assert completion.usage is not None
    assert completion.usage.completion_tokens == TOKENS
    assert [model.id for model in models.data] == ["fake-model"]


async def test_an_anthropic_stream_and_message_through_the_sdk(upstream: BenchUpstream) -> None:
    async with anthropic_sdk(upstream.url) as sdk:
        with trio.fail_after(10):
            async with sdk.messages.stream(model="claude-x", max_tokens=10, messages=MESSAGES) as stream:
                text = "".join([piece async for piece in stream.text_stream])
                final = await stream.get_final_message()
            message = await sdk.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES)
    assert text == TEXT
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == TOKENS
    assert message.content[0].text == TEXT
    assert message.model == "claude-x"


async def test_a_responses_stream_and_response_through_the_sdk(upstream: BenchUpstream) -> None:
    async with openai_sdk(upstream.url) as sdk:
        with trio.fail_after(10):
            async with sdk.responses.stream(model="gpt-x", input="x") as stream:
                deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
                final = await stream.get_final_response()
            again = await sdk.responses.create(model="gpt-x", input="x", stream=True)
            second = [event async for event in again]
            response = await sdk.responses.create(model="gpt-x", input="x")
    assert "".join(deltas) == TEXT == final.output_text == response.output_text
    assert final.status == "completed"
    assert final.usage is not None
    assert final.usage.output_tokens == TOKENS
    assert len(deltas) == TOKENS  # one event per token, as the schedule writes them
    assert final.id != second[0].response.id
    assert final.output[0].id != second[-1].response.output[0].id
    assert upstream.connections_accepted == 1


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {"model": "m", "stream": True}),
        (
            "/v1/chat/completions",
            {"model": 'a "quoted" model', "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/messages", {"model": "claude", "stream": True, "max_tokens": 5}),
        ("/v1/responses", {"model": "gpt-x", "input": "x", "stream": True}),
    ],
)
async def test_the_stream_is_byte_for_byte_what_fake_upstream_sends(
    upstream: BenchUpstream, path: str, payload: dict[str, object]
) -> None:
    stream = await connect(upstream)
    with trio.fail_after(10):
        await stream.send_all(request(path, payload))
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += await stream.receive_some()
    head_end = find_head_end(received)
    assert parse_head(received[:head_end]).headers == {
        b"content-type": b"text/event-stream",
        b"cache-control": b"no-cache",
        b"transfer-encoding": b"chunked",
    }
    number = int(re.search(rb'"id":"(?:chatcmpl-fake|msg_fake|resp_fake)(\d+)"', received)[1])
    reply, model = Reply(tokens=[f" tok{index}" for index in range(TOKENS)]), str(payload["model"])
    if path == "/v1/messages":
        frames = anthropic_frames(reply, model, number)
    elif path == "/v1/responses":
        created = int(re.search(rb'"created_at":(\d+)', received)[1])
        frames = responses_frames(reply, model, number, created=created)
    else:
        created = int(re.search(rb'"created":(\d+)', received)[1])
        include_usage = "stream_options" in payload
        frames = openai_frames(reply, model, number, include_usage=include_usage, created=created)
    # Each event is one chunk, as h11 frames FakeUpstream's writes.
    expected = b"".join(b"%x\r\n%b\r\n" % (len(frame.data), frame.data) for frame in frames) + b"0\r\n\r\n"
    assert received[head_end:] == expected


async def test_tokens_keep_their_schedule(nursery: trio.Nursery) -> None:
    upstream = await start(nursery, tokens=4, ttft=0.05, interval=0.02)
    stream = await connect(upstream)
    with trio.fail_after(10):
        await stream.send_all(request("/v1/chat/completions", {"stream": True}))
        sent, arrivals, received = Instant.now(), [], b""
        while not received.endswith(b"0\r\n\r\n"):
            data = await stream.receive_some()
            now = Instant.now()
            arrivals += [(now.time - sent.time, sent.to(now))] * data.count(b'"content":" tok')
            received += data
    assert len(arrivals) == 4
    # Token k is due 50 + 20k ms after the request. Lateness is tolerated, once the time this
    # thread (client and upstream both) waited for a CPU is taken out: a busy machine's share.
    for index, (arrival, arrival_less_cpu_wait) in enumerate(arrivals):
        due = 0.05 + 0.02 * index
        assert due - 0.002 <= arrival, (index, arrival, arrival_less_cpu_wait)
        assert arrival_less_cpu_wait <= due + 0.05, (index, arrival, arrival_less_cpu_wait)


async def test_a_client_that_leaves_mid_stream_ends_its_connection(nursery: trio.Nursery) -> None:
    upstream = await start(nursery, tokens=100_000, ttft=0, interval=0.001)
    stream = await connect(upstream)
    with trio.fail_after(10):
        await stream.send_all(request("/v1/chat/completions", {"stream": True}))
        received = b""
        while b" tok3" not in received:
            received += await stream.receive_some()
        assert upstream.open_connections == 1
        await stream.aclose()
        await wait_until(lambda: not upstream.open_connections)
        # The server goes on serving others.
        status, _, _ = await exchange(upstream, request("/v1/models", b"", method="GET"))
    assert status == 200


async def exchange(upstream: BenchUpstream, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    stream = await connect(upstream)
    async with stream:
        await stream.send_all(data)
        return await read_response(stream)


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (request("/v1/chat/completions", b"not json"), 400, {"message", "type", "param", "code"}),
        (request("/v1/messages", b"[1, 2]"), 400, {"type", "message"}),
        (request("/v1/nowhere", {"model": "m"}), 404, {"message", "type", "param", "code"}),
        # FakeUpstream serves these; the benchmark upstream does not, and must not answer them as another API
        (request("/v1/completions", {"model": "m", "stream": True}), 404, {"message", "type", "param", "code"}),
        (request("/v1/embeddings", {"model": "m", "input": "x"}), 404, {"message", "type", "param", "code"}),
        (request("/v1/responses/compact", {"model": "m"}), 404, {"message", "type", "param", "code"}),
        (request("/v1/chat/completions", {}, method="GET"), 404, {"message", "type", "param", "code"}),
        (b"POST /v1/chat/completions HTTP/1.1\r\nbad header\r\n\r\n", 400, {"message", "type", "param", "code"}),
    ],
)
async def test_a_bad_request_gets_a_json_error(
    upstream: BenchUpstream, data: bytes, status: int, error: set[str]
) -> None:
    with trio.fail_after(10):
        got, headers, body = await exchange(upstream, data)
    assert got == status
    assert headers[b"content-type"] == b"application/json"
    assert set(orjson.loads(body)["error"]) == error


async def test_a_malformed_request_closes_the_connection_after_its_answer(upstream: BenchUpstream) -> None:
    stream = await connect(upstream)
    with trio.fail_after(10):
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, _ = await read_response(stream)
        assert status == 400
        assert headers[b"connection"] == b"close"
        assert await stream.receive_some() == b""


async def test_expect_100_continue_and_http_1_0(upstream: BenchUpstream) -> None:
    body = orjson.dumps({"stream": True})
    stream = await connect(upstream)
    with trio.fail_after(10):
        head = f"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: {len(body)}\r\nexpect: 100-continue\r\n\r\n"
        await stream.send_all(head.encode())
        assert await stream.receive_some() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(body)
        status, _, received = await read_response(stream)
        assert status == 200
        assert received.endswith(b"data: [DONE]\n\n")
        # HTTP/1.0 has no chunks: the stream ends with the connection.
        legacy = await connect(upstream)
        await legacy.send_all(request("/v1/chat/completions", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        status, headers, received = await read_response(legacy)
    assert status == 200
    assert headers[b"connection"] == b"close"
    assert b"transfer-encoding" not in headers
    assert received.count(b"data: ") == TOKENS + 3
    assert received.endswith(b"data: [DONE]\n\n")


async def test_a_client_that_does_not_read_gets_everything_in_order_and_stalls_no_one(nursery: trio.Nursery) -> None:
    """Far more than the kernel buffers at once (about 24 MB): the rest queues for that connection alone."""
    tokens = 100_000
    upstream = await start(nursery, tokens=tokens, ttft=0, interval=0)
    slow = socket.create_connection(("127.0.0.1", upstream.port))
    slow.sendall(request("/v1/chat/completions", {"stream": True}))
    with trio.fail_after(20):
        # Meanwhile another client is served as usual (a short request: a models list).
        status, _, _ = await exchange(upstream, request("/v1/models", b"", method="GET"))
        assert status == 200
        received = bytearray()
        slow.setblocking(False)
        while not received.endswith(b"\r\n0\r\n\r\n"):
            await trio.lowlevel.wait_readable(slow)
            received += slow.recv(1 << 20)
    slow.close()
    body = ChunkedBody().feed(bytes(received[find_head_end(received) :]))
    numbers = [int(number) for number in re.findall(rb'"content":" tok(\d+)"', body)]
    assert numbers == list(range(tokens))


async def test_cancelling_the_server_closes_every_socket() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await start(nursery, tokens=100_000)
            stream = await connect(upstream)
            await stream.send_all(request("/v1/chat/completions", {"stream": True}))
            await stream.receive_some()
            nursery.cancel_scope.cancel()
        with contextlib.suppress(trio.BrokenResourceError):  # a reset ends it as well as a FIN
            while await stream.receive_some():
                pass  # what was on its way, then the end
    with pytest.raises(OSError, match="all attempts to connect"):
        await connect(upstream)
