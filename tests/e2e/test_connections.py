"""
The proxy's client connections, on raw sockets: what a closed connection leaves behind, and
what the HTTP layer refuses before the app sees it (ambiguous framing, unknown HTTP versions,
a WebSocket handshake nobody answers).
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h11
import httpx
import orjson
import pytest
import trio

from tests.conftest import proxy_config, serve_proxy, wait_until
from trioproxy.testing import FakeUpstream, Reply, open_fake_upstream


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def get_health(stream: trio.SocketStream, host: str) -> int:
    """One keep-alive `GET /health` on `stream`; the response's status."""
    connection = h11.Connection(h11.CLIENT)
    await stream.send_all(connection.send(h11.Request(method="GET", target="/health", headers=[("host", host)])))
    await stream.send_all(connection.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status


async def test_a_connection_its_client_closed_between_requests_ends_at_once(proxy_url: str) -> None:
    """Not after `keep_alive_timeout` (75 s): its socket, tasks and buffers are freed now."""
    address = urlsplit(proxy_url)
    assert address.hostname is not None
    assert address.port is not None
    clients = [await trio.open_tcp_stream(address.hostname, address.port) for _ in range(20)]
    for client in clients:
        assert await get_health(client, address.netloc) == 200
    with_server_ends = open_descriptors()  # both ends of each connection live in this process
    for client in clients:
        await client.aclose()

    await wait_until(lambda: open_descriptors() <= with_server_ends - 2 * len(clients))


async def exchange(proxy_url: str, data: bytes) -> bytes:
    """Send `data` on a new connection and read until the proxy closes it (within 5 s: a kept-alive one fails)."""
    address = urlsplit(proxy_url)
    assert address.hostname is not None
    assert address.port is not None
    stream = await trio.open_tcp_stream(address.hostname, address.port)
    received = b""
    with trio.fail_after(5):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return received


def chat_request(*, framing: bytes, body: bytes, version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/"
        + version
        + b"\r\nhost: proxy\r\ncontent-type: application/json\r\n"
        + framing
        + b"\r\n"
        + body
    )


async def test_a_request_framed_both_by_length_and_by_chunks_is_refused_and_its_connection_closed(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    """RFC 9112 §6.3: no guessing which framing is meant; the request hidden in the body is never served."""
    chat = b'{"model": "up/m", "messages": [{"role": "user", "content": "hi"}]}'
    hidden = chat_request(framing=b"content-length: %d\r\n" % len(chat), body=chat)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chat), chat)
    smuggling = chat_request(
        framing=b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(chunked), body=chunked + hidden
    )

    received = await exchange(proxy_url, smuggling)

    assert received.startswith(b"HTTP/1.1 400 ")
    assert received.count(b"HTTP/1.1 ") == 1
    assert b"Content-Length and Transfer-Encoding" in received
    assert upstream.request_count == 0


async def test_transfer_encoding_in_an_http_1_0_request_is_refused(proxy_url: str, upstream: FakeUpstream) -> None:
    """HTTP/1.0 has no chunked framing (RFC 9112 §6.1): such a request's framing is faulty."""
    chat = b'{"model": "up/m", "messages": [{"role": "user", "content": "hi"}]}'
    request = chat_request(
        framing=b"transfer-encoding: chunked\r\n", body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(chat), chat), version=b"1.0"
    )
    received = await exchange(proxy_url, request)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert upstream.request_count == 0


@pytest.mark.parametrize(
    "line", [b"GET /health HTTP/9.9", b"GET /health HTTP/2.0", b"GET /health HTTP/0.9", b"PRI / HTTP/2.0"]
)
async def test_an_http_version_other_than_1_0_and_1_1_is_refused_with_505(proxy_url: str, line: bytes) -> None:
    """Only `PRI * HTTP/2.0`, HTTP/2's preface, switches to HTTP/2."""
    received = await exchange(proxy_url, line + b"\r\nhost: proxy\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 505 ")
    assert b'"status":"ok"' not in received
    assert b"HTTP/1.0 and HTTP/1.1" in received


async def test_http2_is_no_way_around_the_framing_rules(proxy_url: str, upstream: FakeUpstream) -> None:
    """Over cleartext HTTP/2 (prior knowledge), a request with Transfer-Encoding is malformed: never served."""
    address = urlsplit(proxy_url)
    assert address.hostname is not None
    assert address.port is not None
    stream = await trio.open_tcp_stream(address.hostname, address.port)
    # A client that sends what h2 would strip or refuse, as an attacker's would.
    config = h2.config.H2Configuration(validate_outbound_headers=False, normalize_outbound_headers=False)
    connection = h2.connection.H2Connection(config)
    connection.initiate_connection()
    chat = b'{"model": "up/m", "messages": [{"role": "user", "content": "hi"}]}'
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", address.netloc),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("content-length", str(len(chat))),
        ("transfer-encoding", "chunked"),
    ]
    connection.send_headers(1, headers)
    connection.send_data(1, chat, end_stream=True)
    await stream.send_all(connection.data_to_send())
    outcome: list[object] = []
    with trio.fail_after(5):
        while not outcome:
            data = await stream.receive_some(65536)
            if not data:
                outcome.append("closed")
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    outcome.append(dict(event.headers)[b":status"])
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    outcome.append(type(event).__name__)
            await stream.send_all(connection.data_to_send())
    await stream.aclose()
    assert outcome[0] in ("StreamReset", "ConnectionTerminated", "closed", b"400")  # h2 refuses it as malformed
    assert upstream.request_count == 0


def websocket_handshake(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nhost: proxy\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions"])  # no route; an HTTP-only route
async def test_a_websocket_handshake_on_an_unknown_path_is_a_404_in_openais_shape(
    proxy_url: str, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A client that tries a WebSocket where there is none: a plain refusal, nothing logged as a failure."""
    received = await exchange(proxy_url, websocket_handshake(path))
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    error = orjson.loads(body)["error"]
    assert error["type"] == "not_found_error"
    assert error["message"] == f"no WebSocket endpoint at {path}"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_an_unknown_path_and_a_plain_get_on_a_websocket_route_are_explained_in_our_words(
    proxy_url: str,
) -> None:
    async with httpx.AsyncClient() as http:
        unknown = await http.post(proxy_url + "/v1/no/such/route", json={})
        plain = await http.get(proxy_url + "/v1/chat/ws")
        wrong_method = await http.delete(proxy_url + "/v1/chat/completions")
    assert unknown.status_code == 404
    assert (
        unknown.json()["error"]["message"]
        == "no endpoint at POST /v1/no/such/route (a provider's forward_paths can forward it)"
    )
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["message"] == (
        "DELETE is not allowed on /v1/chat/completions (allowed: OPTIONS, POST)"
    )
    assert plain.status_code == 400
    assert plain.json()["error"]["message"] == (
        "/v1/chat/ws is a WebSocket endpoint: open it with a WebSocket handshake (GET with Upgrade: websocket)"
    )


def half_closed_to(port: int) -> int:
    """This process's TCP connections to 127.0.0.1:`port` that the peer closed and we did not (CLOSE-WAIT)."""
    remote = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[2] == remote and row[3] == "08")


async def test_idle_upstream_connections_the_upstream_closed_are_closed_without_new_traffic(
    nursery: trio.Nursery,
) -> None:
    """They were left half-closed until the next request to that upstream (or forever)."""
    async with trio.open_nursery() as upstream_nursery:
        upstream = await open_fake_upstream(upstream_nursery, Reply(tokens=("a", "b", "c")))
        proxy = await serve_proxy(nursery, proxy_config(upstream))
        all_open = trio.Event()
        opened = 0

        async def one_stream(http: httpx.AsyncClient) -> None:
            nonlocal opened
            body = {"model": "up/m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            async with http.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
                opened += 1
                if opened == 20:
                    all_open.set()
                await all_open.wait()  # so that each has its own upstream connection
                await response.aread()

        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as http, trio.open_nursery() as streams:
            for _ in range(20):
                streams.start_soon(one_stream, http)
        port = upstream.port
        upstream_nursery.cancel_scope.cancel()  # the upstream goes away, closing its side of each connection

    await wait_until(lambda: half_closed_to(port) == 0)


async def test_a_stream_its_client_reads_slower_than_it_comes_arrives_whole_and_in_order(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    """
    With a 4 KB receive window, hardly a write of a 64 KB token goes out whole: what the
    socket does not take at once is sent after what it took, before the next token.
    """
    tokens = tuple(f"<{index:03d}>" + "y" * 65_000 for index in range(40))
    upstream.push(Reply(tokens=tokens))
    address = urlsplit(proxy_url)
    assert address.hostname is not None
    assert address.port is not None
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)  # before connect: the window is small
    await sock.connect((address.hostname, address.port))
    stream = trio.SocketStream(sock)
    body = orjson.dumps({"model": "up/m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    connection = h11.Connection(h11.CLIENT)
    headers = [("host", address.netloc), ("content-type", "application/json"), ("content-length", str(len(body)))]
    await stream.send_all(connection.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers)))
    await stream.send_all(connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
    received = bytearray()
    with trio.fail_after(10):
        while not isinstance(event := connection.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Data):
                received += event.data
    await stream.aclose()

    events = [line.removeprefix(b"data: ") for line in bytes(received).split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    text = "".join(orjson.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1])
    assert text == "".join(tokens)


def sse_text(body: bytes) -> str:
    """The text of a Chat Completions event stream's body."""
    events = [event.removeprefix(b"data: ") for event in body.split(b"\n\n") if event]
    assert events[-1] == b"[DONE]"
    return "".join(orjson.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1])


async def test_a_streamed_body_is_one_chunk_per_event_and_its_connection_serves_the_next_request(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    """
    The tokens bypass hypercorn and h11 (`_serve._ChunkedBodyLane`): framed as h11 frames them,
    one chunk per event, and h11 still ends the body, so the kept-alive connection goes on.
    """
    tokens = ("Hello", ", ", "world", "!")
    upstream.push(Reply(tokens=tokens))
    chat = b'{"model": "up/m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    address = urlsplit(proxy_url)
    assert address.hostname is not None
    assert address.port is not None
    stream = await trio.open_tcp_stream(address.hostname, address.port)
    await stream.send_all(chat_request(framing=b"content-length: %d\r\n" % len(chat), body=chat))
    raw = b""
    with trio.fail_after(5):
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            raw += await stream.receive_some(65536)
        assert await get_health(stream, address.netloc) == 200  # the same connection, kept alive
    await stream.aclose()

    head, _, framed = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = []
    while framed != b"0\r\n\r\n":
        size, _, rest = framed.partition(b"\r\n")
        chunk, crlf, framed = rest[: int(size, 16)], rest[int(size, 16) : int(size, 16) + 2], rest[int(size, 16) + 2 :]
        assert crlf == b"\r\n"
        chunks.append(chunk)
    # The head's chunk holds the role and the first token (the response commits on it); then
    # each token is a chunk of its own, none held back for the next, then the finish and `[DONE]`.
    assert len(chunks) == len(tokens) + 2
    assert all(chunk.startswith(b"data: ") and chunk.count(b"\n\n") == 1 for chunk in chunks[1:])
    assert sse_text(b"".join(chunks)) == "".join(tokens)


async def test_a_stream_to_an_http_1_0_client_is_unframed_and_ends_with_its_connection(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    """HTTP/1.0 has no chunked framing: the body is the events as they are, and the connection's close ends it."""
    tokens = ("Hello", ", ", "world", "!")
    upstream.push(Reply(tokens=tokens))
    chat = b'{"model": "up/m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'

    received = await exchange(
        proxy_url, chat_request(framing=b"content-length: %d\r\n" % len(chat), body=chat, version=b"1.0")
    )

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body.startswith(b"data: ")
    assert sse_text(body) == "".join(tokens)
