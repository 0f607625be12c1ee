"""
The upstream layer's own pool (`PooledTransport`), against `trioproxy.testing`'s fake
upstream on 127.0.0.1, port 0.
"""

from __future__ import annotations

import socket
import struct
import zlib

import h11
import httpcore
import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.conftest import RequestSkipper
from trioproxy import parse_config
from trioproxy._exceptions import UpstreamBrokenError, UpstreamConnectError, UpstreamProtocolError
from trioproxy._request import parse_chat_request
from trioproxy._targets import Breakers, BreakerState, Verdict
from trioproxy._upstream import BalancedUpstream, HttpUpstream, _http_upstream
from trioproxy._upstream._backend import read_when_readable
from trioproxy._upstream._pool import IDLE_SWEEP_INTERVAL, PooledTransport
from trioproxy.testing import Reply, open_fake_upstream

BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def recorded_releases(transport: PooledTransport) -> list[object]:
    """The connections `transport` is given back from now on, in order, as it releases them."""
    released: list[object] = []
    release = transport.release

    async def recording_release(connection: object, origin: object) -> None:
        released.append(connection)
        await release(connection, origin)  # type: ignore[arg-type]

    transport.release = recording_release  # type: ignore[method-assign]
    return released


async def test_a_response_that_ends_after_the_pool_closed_closes_its_connection(nursery: trio.Nursery) -> None:
    """It may not go back to the pool: nobody would ever close it there."""
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b")))
    transport = PooledTransport(httpx.Limits(max_connections=4))
    released = recorded_releases(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("POST", upstream.url + "/v1/chat/completions", json=BODY) as response:
            await transport.aclose()  # the server shuts down while the stream is in flight
            await response.aread()  # then the stream ends well, and its response closes
        [connection] = released
        assert transport._idle == {}
        assert connection.is_closed()  # type: ignore[attr-defined]


async def test_a_plain_socket_read_waits_for_data_and_maps_a_reset() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    ours = trio.socket.socket()
    with listener, ours:
        await ours.connect(listener.getsockname())
        theirs, _ = await listener.accept()
        with theirs:
            async with trio.open_nursery() as nursery:

                async def send_once_it_waits() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    await theirs.send(b"data: x\n\n")

                nursery.start_soon(send_once_it_waits)
                assert await read_when_readable(ours, 1024) == b"data: x\n\n"
            # Closed with SO_LINGER 0: the peer resets the connection.
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with pytest.raises(httpcore.ReadError):
            await read_when_readable(ours, 1024)


async def stream_in_parallel(transport: PooledTransport, url: str, n: int) -> set[object]:
    """`n` streams, all open at once (so each on its own connection), each read to its end; their connections."""
    released = recorded_releases(transport)
    all_open = trio.Event()
    opened = 0
    # No timeouts: on the MockClock, time only passes for the pool's own timer and the replies.
    client = httpx.AsyncClient(transport=transport, timeout=None)

    async def one() -> None:
        nonlocal opened
        async with client.stream("POST", url, json=BODY) as response:
            opened += 1
            if opened == n:
                all_open.set()
            await all_open.wait()
            await response.aread()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    connections = set(released)
    assert len(connections) == n
    return connections


async def test_idle_connections_expire_on_the_pools_own_timer_without_traffic(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Not only when the next request comes: an idle pool holds no socket past its keep-alive expiry."""
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b")))
    transport = PooledTransport(httpx.Limits(max_connections=100, keepalive_expiry=5))
    nursery.start_soon(transport.expire_idle_connections)
    connections = await stream_in_parallel(transport, upstream.url + "/v1/chat/completions", 60)

    await trio.sleep(5 + IDLE_SWEEP_INTERVAL)
    await trio.testing.wait_all_tasks_blocked()  # the sweep due now is over

    assert all(connection.is_closed() for connection in connections)  # type: ignore[attr-defined]
    assert not any(transport._idle.values())


async def test_an_idle_connection_its_upstream_closed_is_closed_within_a_sweep(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Not left half-closed (CLOSE-WAIT) until its keep-alive expiry, or the next request."""
    transport = PooledTransport(httpx.Limits(max_connections=100, keepalive_expiry=60))
    nursery.start_soon(transport.expire_idle_connections)
    async with trio.open_nursery() as upstream_nursery:
        upstream = await open_fake_upstream(upstream_nursery, Reply(tokens=("a", "b")))
        connections = await stream_in_parallel(transport, upstream.url + "/v1/chat/completions", 10)
        assert not any(connection.is_closed() for connection in connections)  # type: ignore[attr-defined]
        upstream_nursery.cancel_scope.cancel()  # the upstream goes away, closing its connections

    await trio.sleep(IDLE_SWEEP_INTERVAL)
    await trio.testing.wait_all_tasks_blocked()  # the sweep due now is over

    assert all(connection.is_closed() for connection in connections)  # type: ignore[attr-defined]
    assert not any(transport._idle.values())


async def test_closing_the_pool_ends_its_timer() -> None:
    transport = PooledTransport(httpx.Limits(max_connections=4))
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.expire_idle_connections)
            await trio.testing.wait_all_tasks_blocked()
            await transport.aclose()
        # and a timer started after the close ends at once
        await transport.expire_idle_connections()


class ScriptedBreakers:
    """
    A `Breakers` other than the in-process one (as a shared store would be): it admits every
    request as the probe, or none, and records what it is told.
    """

    def __init__(self, *, admits: bool) -> None:
        self.admits = admits
        self.settled: list[tuple[str, str, bool]] = []

    async def admit(self, url: str, now: float) -> BreakerState | None:
        return "half_open" if self.admits else None

    async def settle(self, url: str, verdict: Verdict, *, probe: bool, now: float) -> BreakerState | None:
        await trio.lowlevel.checkpoint()  # a round trip to the store
        self.settled.append((url, verdict, probe))
        return None

    def state(self, url: str) -> BreakerState:
        return "half_open" if self.admits else "open"


def http_upstream(url: str) -> HttpUpstream:
    config = parse_config({"providers": {"p": {"type": "openai", "base_url": url}}}, environ={})
    return _http_upstream(config.providers["p"], url)


def balanced(url: str, breakers: Breakers) -> BalancedUpstream:
    """Provider `p`'s one target, `url`, behind `breakers`."""
    return BalancedUpstream("p", [(url, 1.0, http_upstream(url))], breakers)


class Collected:
    def __init__(self) -> None:
        self.items: list[object] = []

    async def send(self, item: object) -> None:
        self.items.append(item)


CHAT = parse_chat_request({"model": "p/m", "messages": [{"role": "user", "content": "hi"}], "stream": True})


async def test_the_breakers_state_lives_behind_its_interface_and_a_cancelled_probe_is_settled(
    nursery: trio.Nursery,
) -> None:
    upstream = await open_fake_upstream(nursery, Reply(stall_after=1))
    breakers = ScriptedBreakers(admits=True)
    balanced_upstream = balanced(upstream.url + "/v1", breakers)
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as request:
            request.start_soon(balanced_upstream.stream, CHAT, Collected())
            await upstream.wait_for_requests(1)
            request.cancel_scope.cancel()  # the client went away mid-stream
    assert not scope.cancelled_caught
    assert breakers.settled == [(upstream.url + "/v1", "released", True)]  # the probe freed, though cancelled
    assert balanced_upstream.targets[0].outstanding == 0
    await balanced_upstream.aclose()


async def test_targets_the_breakers_skip_are_not_tried(nursery: trio.Nursery) -> None:
    upstream = await open_fake_upstream(nursery)
    balanced_upstream = balanced(upstream.url + "/v1", ScriptedBreakers(admits=False))
    with pytest.raises(UpstreamConnectError, match="circuit breaker is open"):
        await balanced_upstream.stream(CHAT, Collected())
    assert upstream.request_count == 0
    await balanced_upstream.aclose()


SSE_CHUNKS = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"he"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"llo"},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
)


async def serve_raw(answers: list[bytes], task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """
    An upstream on 127.0.0.1 that accepts one connection, answers each request on it with the
    next of `answers`, verbatim, and then closes it.
    """
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    task_status.started(f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1")
    async with listener:
        stream = await listener.accept()
        async with stream:
            requests = RequestSkipper(stream)
            for answer in answers:
                if not await requests.skip():
                    return
                await stream.send_all(answer)


def chunked(parts: tuple[bytes, ...], *, extension: bytes = b"", trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(part), extension, part) for part in parts)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + body + b"0\r\n" + trailer + b"\r\n"


def streamed_text(collected: Collected) -> str:
    return "".join(item.text for item in collected.items if getattr(item, "text", None))  # type: ignore[attr-defined]


async def test_a_chunked_body_with_extensions_and_trailers_streams_whole_and_its_connection_is_reused(
    nursery: trio.Nursery,
) -> None:
    """The body reader decodes chunked framing itself through h11: extensions and trailers are framing, not text."""
    answers = [
        chunked(SSE_CHUNKS, extension=b";name=value"),
        chunked(SSE_CHUNKS, trailer=b"x-trailer: done\r\n"),
    ]
    url = await nursery.start(serve_raw, answers)
    upstream = http_upstream(url)
    with trio.fail_after(5):
        for _ in answers:  # both on the one connection the raw upstream accepts
            collected = Collected()
            await upstream.stream(CHAT, collected)
            assert streamed_text(collected) == "hello"
    await upstream.aclose()


async def test_a_body_cut_short_is_a_broken_stream(nursery: trio.Nursery) -> None:
    whole = chunked(SSE_CHUNKS)
    cut = whole[: whole.index(b"[DONE]")]  # the connection closes inside a chunk
    url = await nursery.start(serve_raw, [cut])
    upstream = http_upstream(url)
    collected = Collected()
    with trio.fail_after(5), pytest.raises(UpstreamBrokenError):
        await upstream.stream(CHAT, collected)
    assert streamed_text(collected) == "hello"  # what came before the cut was delivered
    await upstream.aclose()


async def test_a_chunked_stream_is_read_whole_and_its_connection_pooled_and_reused(nursery: trio.Nursery) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("one", " two", " three")))
    transport = PooledTransport(httpx.Limits(max_connections=4))
    released = recorded_releases(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(2):
            async with client.stream("POST", upstream.url + "/v1/chat/completions", json=BODY) as response:
                assert response.headers["transfer-encoding"] == "chunked"
                body = await response.aread()
            assert all(b'"content":"%s"' % token in body for token in (b"one", b" two", b" three"))
            assert body.endswith(b"data: [DONE]\n\n")
            assert released[-1].is_idle()  # type: ignore[attr-defined]  # back in the pool, as after any response
    first, second = released
    assert first is second  # the second request went on the first one's connection


async def serve_writes(
    answers: list[tuple[bytes, ...]],
    accepted: list[trio.SocketStream],
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    An upstream on 127.0.0.1 that answers each request, on whichever connection it comes, with
    the next of `answers`: its writes one by one, each once the client waits for more (so that
    each is a read of its own), `b""` closing the connection. It adds each connection it
    accepts to `accepted`.
    """
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    task_status.started(f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1")
    pending = iter(answers)

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            requests = RequestSkipper(stream)
            while await requests.skip():
                for write in next(pending):
                    await trio.testing.wait_all_tasks_blocked()
                    if not write:
                        return
                    await stream.send_all(write)

    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            accepted.append(stream)
            nursery.start_soon(answer, stream)


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNKS = tuple(b"%x\r\n%s\r\n" % (len(part), part) for part in SSE_CHUNKS)
END = b"0\r\n\r\n"


async def streamed_answers(nursery: trio.Nursery, answers: list[tuple[bytes, ...]]) -> list[trio.SocketStream]:
    """Each of `answers` streamed in turn by one `HttpUpstream`, all as "hello"; the connections it made."""
    accepted: list[trio.SocketStream] = []
    upstream = http_upstream(await nursery.start(serve_writes, answers, accepted))
    with trio.fail_after(5):
        for _ in answers:
            collected = Collected()
            await upstream.stream(CHAT, collected)
            assert streamed_text(collected) == "hello"
    await upstream.aclose()
    return accepted


async def test_chunks_in_writes_of_their_own_are_read_past_h11(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h11 reads the head and the end (its connection then is idle as after any response); the chunks are ours."""
    events = 0
    next_event = h11.Connection.next_event

    def counted_next_event(self: h11.Connection) -> object:
        nonlocal events
        events += 1
        return next_event(self)

    monkeypatch.setattr(h11.Connection, "next_event", counted_next_event)
    comment = b": keep-alive\n\n"  # an SSE comment
    filler = b"%x\r\n%s\r\n" % (len(comment), comment)
    accepted = await streamed_answers(nursery, [(HEAD, *CHUNKS[:1], *[filler] * 20, *CHUNKS[1:], END)] * 2)
    assert len(accepted) == 1  # the second answer came on the first one's connection
    assert events < 20


async def test_the_head_and_the_first_chunks_in_one_write_then_the_rest(nursery: trio.Nursery) -> None:
    """h11 reads what came with the head, and hands over at the first chunk's end."""
    accepted = await streamed_answers(
        nursery,
        [
            (HEAD + CHUNKS[0], CHUNKS[1], CHUNKS[2] + END),
            (HEAD + CHUNKS[0] + CHUNKS[1], CHUNKS[2], END),
            (HEAD + CHUNKS[0][:-1], b"\n" + CHUNKS[1], CHUNKS[2] + END),  # h11 reads the CRLF that came apart
            (HEAD + b"".join(CHUNKS) + END,),
        ],
    )
    assert len(accepted) == 1


def split_at(data: bytes, *cuts: int) -> tuple[bytes, ...]:
    return tuple(data[start:stop] for start, stop in zip((0, *cuts), (*cuts, len(data)), strict=True))


async def test_chunks_split_across_writes_at_awkward_places(nursery: trio.Nursery) -> None:
    body = b"".join(CHUNKS)
    first = len(CHUNKS[0])
    accepted = await streamed_answers(
        nursery,
        [
            (HEAD, *split_at(body, 1, first - 1, first + 2, first + 40, len(body) - 3), END),  # size, CRLF, data
            (HEAD, body + b"0\r", b"\n\r", b"\n"),  # the last chunk and the end, apart
            (HEAD, body, b"0;ext=1\r\nx-trailer:", b" done\r\nx-other: 2\r\n", b"\r\n"),  # extension, trailers
        ],
    )
    assert len(accepted) == 1


async def broken_then_whole(
    nursery: trio.Nursery, broken: tuple[bytes, ...], match: str | None = None
) -> tuple[str, list[trio.SocketStream]]:
    """
    `broken` streamed (a broken stream, `match`ing its message), then a whole answer: the text
    the broken one delivered, and the connections made (two: the broken one was not reused).
    """
    accepted: list[trio.SocketStream] = []
    upstream = http_upstream(await nursery.start(serve_writes, [broken, (HEAD, *CHUNKS, END)], accepted))
    collected = Collected()
    with trio.fail_after(5), pytest.raises(UpstreamBrokenError, match=match):
        await upstream.stream(CHAT, collected)
    delivered = streamed_text(collected)
    whole = Collected()
    with trio.fail_after(5):
        await upstream.stream(CHAT, whole)
    assert streamed_text(whole) == "hello"
    await upstream.aclose()
    return delivered, accepted


async def test_a_body_cut_inside_a_chunk_past_the_head_is_a_broken_stream_on_a_connection_not_reused(
    nursery: trio.Nursery,
) -> None:
    broken = (HEAD, CHUNKS[0], CHUNKS[1], CHUNKS[2][:9], b"")
    delivered, accepted = await broken_then_whole(nursery, broken, match="connection broke")
    assert delivered == "hello"  # what came before the cut was delivered
    assert len(accepted) == 2


@pytest.mark.parametrize(
    "malformed",
    [b"0x10\r\n", b"-1\r\n", b"zz\r\n", CHUNKS[1][:-2] + b"XY", b"0\r\nnot a field\r\n\r\n", b"9" * (70 * 1024)],
)
async def test_a_malformed_chunk_past_the_head_is_a_broken_stream_on_a_connection_not_reused(
    nursery: trio.Nursery, malformed: bytes
) -> None:
    _, accepted = await broken_then_whole(nursery, (HEAD, CHUNKS[0], malformed))
    assert len(accepted) == 2


async def test_bytes_after_the_end_of_a_body_keep_its_connection_out_of_the_pool(nursery: trio.Nursery) -> None:
    """No response was asked for them: the connection's next response could not be told apart."""
    accepted = await streamed_answers(nursery, [(HEAD, *CHUNKS, END + b"HTTP/1.1 200 OK\r\n"), (HEAD, *CHUNKS, END)])
    assert len(accepted) == 2


async def test_a_content_length_body_is_read_whole_and_its_connection_reused(nursery: trio.Nursery) -> None:
    body = b"".join(SSE_CHUNKS)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)
    accepted = await streamed_answers(nursery, [(head, body[:50], body[50:]), (head + body,)])
    assert len(accepted) == 1


async def test_a_compressed_stream_whose_end_after_done_is_corrupt_still_ends_well(nursery: trio.Nursery) -> None:
    """
    The stream was whole at `[DONE]`: what follows is read only to pool the connection, and a
    gzip trailer that does not check out there only means the connection is not reused.
    """
    gzip = zlib.compressobj(wbits=31)
    events = gzip.compress(b"".join(SSE_CHUNKS)) + gzip.flush(zlib.Z_SYNC_FLUSH)  # decodable up to here
    trailer = bytearray(gzip.flush())
    trailer[-5] ^= 0xFF  # its CRC-32 no longer matches
    head = HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n")
    framed = tuple(b"%x\r\n%s\r\n" % (len(part), part) for part in (events, bytes(trailer)))
    accepted: list[trio.SocketStream] = []
    upstream = http_upstream(await nursery.start(serve_writes, [(head, *framed, END), (HEAD, *CHUNKS, END)], accepted))
    collected = Collected()
    with trio.fail_after(5):
        await upstream.stream(CHAT, collected)
    assert streamed_text(collected) == "hello"
    await upstream.aclose()


async def test_a_compressed_stream_corrupt_before_its_end_is_a_malformed_stream(nursery: trio.Nursery) -> None:
    gzip = zlib.compressobj(wbits=31)
    first = gzip.compress(SSE_CHUNKS[0]) + gzip.flush(zlib.Z_SYNC_FLUSH)
    head = HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n")
    framed = tuple(b"%x\r\n%s\r\n" % (len(part), part) for part in (first, b"\xff" * 32))
    accepted: list[trio.SocketStream] = []
    upstream = http_upstream(await nursery.start(serve_writes, [(head, *framed, END)], accepted))
    collected = Collected()
    with trio.fail_after(5), pytest.raises(UpstreamProtocolError, match="could not be decoded"):
        await upstream.stream(CHAT, collected)
    assert streamed_text(collected) == "he"
    await upstream.aclose()
