"""
The load generator: a process of its own that drives many streams and times every token.

Why not httpx or the openai SDK, nor trio's `SocketStream` with h11, which it used before: at
a thousand concurrent streams (50,000 tokens a second) their cost per chunk, a task switch,
a stream wrapper and h11's events, made the client, not the proxy, the bottleneck, and the
figures described the client. So the path a token takes has no task switch: one task, the
`_Reader`, waits through trio for a selector (epoll, kqueue) that holds the socket of every
response in flight, then reads each socket that has data, stamping each read with the time
its bytes came off the socket. A token costs one `recv`, a chunk header, its SSE lines and
one `orjson.loads`. Everything else (connecting, sending the request, the stream's timeout,
resending on a stale connection) is plain trio code in a task per connection, woken once per
stream.

It stays a real HTTP/1.1 client (`http1`: Content-Length, chunked, read-until-close,
`Connection: close`, keep-alive reuse) with a real SSE parse (`_SSEPayloads`), so it reads any
OpenAI-compatible proxy given to `--compare`, whatever its server and its JSON spacing, and any
Anthropic Messages or OpenAI Responses stream. One
keep-alive connection per concurrent stream is opened before the clock starts, as a client's
pool would be. The Responses front's WebSocket mode (`responses-ws`) is a WebSocket per
concurrent stream instead, opened (handshake included) before the clock starts, with one
`response.create` message per stream, as Codex sends its turns (`websocket`).

Every stream is bounded by its `stream_timeout_s`, every phase by `PhaseSpec.deadline_s`.

Run as `python -m trioproxy._bench.loadgen`; it speaks the protocol in `wire`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio

from .http1 import Body, ProtocolError, UntilCloseBody, find_head_end, parse_head
from .stats import StreamRecord, check_tokens, gaps
from .websocket import (
    CLOSE,
    PING,
    PONG,
    TEXT,
    MessageDecoder,
    WebSocketError,
    accept_key,
    client_frame,
    handshake_request,
    new_key,
)
from .wire import LineReader, PhaseResult, PhaseSpec, send_message

#: Bytes asked of the kernel per read.
RECEIVE_SIZE = 64 * 1024
#: An error response's body is kept up to this many bytes, for the error message.
MAX_ERROR_BODY = 2048
#: Longest NDJSON line accepted (as `SSEDecoder`'s default line bound): a longer one is malformed.
MAX_NDJSON_LINE = 1024 * 1024
#: Longest SSE event accepted (as `SSEDecoder`'s default bound on event data).
MAX_SSE_EVENT = 8 * 1024 * 1024
#: The `anthropic-version` an Anthropic Messages request says it speaks (as the SDKs send it).
ANTHROPIC_VERSION = "2023-06-01"
#: Connections opened at once: a burst of thousands of SYNs would overflow a listen backlog.
CONNECT_PARALLELISM = 64

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class _Endpoint:
    """Where and what to send: the same request, rendered once, for every stream of a phase."""

    host: str
    port: int
    #: The whole request: head and JSON body; in WebSocket mode, the `response.create` message's frame.
    request: bytes
    #: WebSocket mode: the opening handshake's request (its key's own), sent once per connection.
    handshake: bytes | None = None
    handshake_key: bytes = b""

    @classmethod
    def from_spec(cls, spec: PhaseSpec) -> _Endpoint:
        parts = urlsplit(spec.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the load generator speaks plain http:// only, not {spec.url!r}")
        host, port = parts.hostname, parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Proxies that insist on a key (LiteLLM's master key, say) get one to check.
        authorization = "authorization: Bearer sk-trioproxy-bench\r\n"
        if spec.protocol == "responses-ws":
            key = new_key()
            frame = client_frame(TEXT, orjson.dumps({"type": "response.create", **spec.payload}))
            return cls(host, port, frame, handshake_request(host, port, target, key, authorization), key)
        accept = "application/x-ndjson" if spec.protocol == "ndjson" else "text/event-stream"
        version = f"anthropic-version: {ANTHROPIC_VERSION}\r\n" if spec.protocol == "anthropic" else ""
        body = orjson.dumps(spec.payload)
        head = (
            f"POST {target} HTTP/1.1\r\n"
            f"host: {f'[{host}]' if ':' in host else host}:{port}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            f"accept: {accept}\r\n"
            f"{version}"
            f"{authorization}"
            "\r\n"
        )
        return cls(host, port, head.encode("latin-1") + body)


class _Connection:
    """
    One keep-alive HTTP/1.1 connection on a non-blocking socket, reopened when it breaks or the
    server closes it; in WebSocket mode, one WebSocket, upgraded as it opens.
    """

    def __init__(self, endpoint: _Endpoint, connect_timeout: float) -> None:
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self.socket: socket.socket | None = None
        #: A request has been sent on this connection: the server may since have closed it.
        self.used = False
        #: WebSocket mode: the server's messages, read across the connection's streams.
        self.messages: MessageDecoder | None = None

    async def open(self) -> socket.socket:
        if self.socket is None:
            with trio.fail_after(self._connect_timeout):
                sock = await _connect(self._endpoint.host, self._endpoint.port)
                try:
                    if self._endpoint.handshake is not None:
                        self.messages = await _upgrade(sock, self._endpoint)
                except BaseException:
                    sock.close()
                    raise
            self.socket, self.used = sock, False
        return self.socket

    def close(self) -> None:
        if self.socket is not None:
            sock, self.socket = self.socket, None
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def _upgrade(sock: socket.socket, endpoint: _Endpoint) -> MessageDecoder:
    """The opening handshake on a fresh connection; the decoder of the server's messages after it."""
    assert endpoint.handshake is not None
    await _send_all(sock, endpoint.handshake)
    received = b""
    while (end := find_head_end(received)) < 0:
        await trio.lowlevel.wait_readable(sock)
        try:
            data = sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            continue
        if not data:
            raise ProtocolError("the connection ended before the WebSocket handshake's answer")
        received += data
    head = parse_head(received[:end])
    if head.status != 101 or head.headers.get(b"sec-websocket-accept") != accept_key(endpoint.handshake_key):
        raise ProtocolError(f"the WebSocket upgrade was refused: {b' '.join(head.start)[:100]!r}")
    messages = MessageDecoder()
    for opcode, payload in messages.feed(received[end:]):
        if opcode == PING:  # hypercorn pings as soon as it accepts: it may come in the 101's read
            await _send_all(sock, client_frame(PONG, payload))
        elif opcode != PONG:
            raise ProtocolError("the server sent a message before it was asked anything")
    return messages


async def _connect(host: str, port: int) -> socket.socket:
    """
    A connected non-blocking TCP socket to the first address of `host` that takes it (the
    targets are local: no happy eyeballs).
    """
    failure: OSError | None = None
    for family, kind, proto, _, address in await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"cannot connect to {host}:{port}: {os.strerror(code)}")
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure or OSError(f"no address for {host}")


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


class _MalformedStream(Exception):
    """What the server sent is not the protocol the stream asked for."""


class _StaleConnection(Exception):
    """A kept-alive connection was closed by the server before this request: resend it on a new one."""


class _Body:
    """What one stream's response delivered, whatever the protocol."""

    def __init__(self) -> None:
        self.sent_at = 0.0
        self.ended_at: float | None = None
        self.status: int | None = None
        self.pieces: list[tuple[str, float]] = []
        self.done = False
        self.error: str | None = None
        self.buffer_latency: dict[str, float] | None = None
        self._error_body = bytearray()

    def parse(self, data: bytes, now: float) -> None:
        """Take the next piece of a 200 response's body, read at `now`."""
        raise NotImplementedError

    def keep_error(self, data: bytes, now: float) -> None:
        """Take the next piece of an error response's body: its start goes in the error message."""
        self._error_body += data[: MAX_ERROR_BODY - len(self._error_body)]

    def fail(self, reason: str) -> None:
        self.error = self.error or reason

    def record(self, expected_tokens: int) -> StreamRecord:
        check = check_tokens(self.pieces, expected_tokens)
        error = self.error
        if error is None and self.status != 200:
            error = f"HTTP {self.status}: {self._error_body.decode('utf-8', 'replace')[:200]}"
        elif error is None and not self.done:
            error = "the stream ended without its end marker"
        elif error is None and check.unexpected:
            error = "unexpected text in the stream"
        complete = error is None
        return StreamRecord(
            error=error,
            ttft_s=check.arrivals[0] - self.sent_at if check.arrivals else None,
            duration_s=self.ended_at - self.sent_at if self.ended_at is not None else None,
            gaps_us=[round(gap * 1e6) for gap in gaps(check.arrivals)],
            tokens=len(check.indices),
            chunks=len(self.pieces),
            lost=check.lost if complete else 0,
            duplicated=check.duplicated if complete else 0,
            reordered=check.reordered if complete else 0,
            buffer_latency_ms=self.buffer_latency,
        )


def _one_event_payload(chunk: bytes) -> bytes | None:
    """
    The payload when `chunk` is exactly one event of one `data: ` line (OpenAI's), or of an
    `event: ` line and a `data: ` line (Anthropic's): the read a streaming server sends most.
    """
    if not chunk.endswith(b"\n\n") or b"\r" in chunk:
        return None
    if chunk.startswith(b"data: ") and chunk.find(b"\n") == len(chunk) - 2:
        return chunk[6:-2]
    data = chunk.find(b"\n") + 1
    if chunk.startswith(b"event: ") and chunk.startswith(b"data: ", data) and chunk.find(b"\n", data) == len(chunk) - 2:
        return chunk[data + 6 : -2]
    return None


class _SSEPayloads:
    """
    The data of each server-sent event in a stream's bytes, by the rules of WHATWG HTML §9.2.6
    that the data depends on: a line ends with CRLF, LF or CR (a CRLF split across two reads
    included), a blank line ends an event, its `data` lines join with LF, an event without
    data is none, a leading BOM is dropped, comments and the other fields are skipped.

    Why not trioproxy's own `SSEDecoder`: it decodes text and builds a `ServerSentEvent` with
    every field, about 2.3 µs an event against 0.4 µs here for the usual read (one event of one
    `data: ` line), which at 50,000 events a second is a tenth of the load generator's core.
    Other reads are cut into events first, and only an unusual event is read line by line.
    """

    __slots__ = ("_event", "_skip_lf", "_started")

    def __init__(self) -> None:
        #: The event not yet ended by a blank line.
        self._event = b""
        #: The last read ended with CR: an LF at the start of the next one completes a CRLF.
        self._skip_lf = False
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events that `chunk` completes, in order."""
        if self._started and not self._event and (payload := _one_event_payload(chunk)) is not None:
            self._skip_lf = False
            return [payload]
        if not self._started:
            chunk = self._event + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._event = chunk  # perhaps the start of a BOM split across reads
                return []
            self._started, self._event = True, b""
            chunk = chunk.removeprefix(_BOM)
        if self._skip_lf:
            self._skip_lf = False
            chunk = chunk.removeprefix(b"\n")
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = (self._event + chunk if self._event else chunk).split(b"\n\n")
        self._event = events.pop()
        if len(self._event) > MAX_SSE_EVENT:
            raise _MalformedStream(f"an SSE event longer than {MAX_SSE_EVENT} bytes")
        payloads = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                payloads.append(event[6:])
            elif data := [line.partition(b":")[2].removeprefix(b" ") for line in event.split(b"\n") if _is_data(line)]:
                payloads.append(b"\n".join(data))
        return payloads


def _is_data(line: bytes) -> bool:
    """An SSE `data` field line: `data`, then a colon or nothing (a line without a colon is a field without value)."""
    return line.startswith(b"data") and (len(line) == 4 or line[4] == 0x3A)


class _OpenAIBody(_Body):
    """`chat.completion.chunk`s over SSE, ended by `data: [DONE]`."""

    def __init__(self) -> None:
        super().__init__()
        self._events = _SSEPayloads()

    def parse(self, data: bytes, now: float) -> None:
        for payload in self._events.feed(data):
            if payload == b"[DONE]":
                self.done = True
                continue
            chunk = orjson.loads(payload)
            if "error" in chunk:
                self.fail(f"in-stream error: {str(chunk['error'])[:200]}")
                continue
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    self.pieces.append((content, now))


class _AnthropicBody(_Body):
    """
    Anthropic Messages events over SSE (`sse_protocol.md` §5): text in `text_delta`s, ended by
    `message_stop`; `event: error` is a failure. The event's kind is read from its data's
    `type`, which the API always sends equal to the `event:` name.
    """

    def __init__(self) -> None:
        super().__init__()
        self._events = _SSEPayloads()

    def parse(self, data: bytes, now: float) -> None:
        for payload in self._events.feed(data):
            event = orjson.loads(payload)
            kind = event.get("type")
            if kind == "content_block_delta":
                delta = event.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    self.pieces.append((delta["text"], now))
            elif kind == "message_stop":
                self.done = True
            elif kind == "error":
                self.fail(f"in-stream error: {str(event.get('error'))[:200]}")


class _ResponsesBody(_Body):
    """
    OpenAI Responses events, over SSE or as WebSocket messages: text in
    `response.output_text.delta`s, ended by `response.completed`; `response.incomplete`,
    `response.failed` and `error` are failures.
    """

    def __init__(self) -> None:
        super().__init__()
        self._events = _SSEPayloads()

    def parse(self, data: bytes, now: float) -> None:
        for payload in self._events.feed(data):
            self.event(payload, now)

    def event(self, payload: bytes, now: float) -> None:
        event = orjson.loads(payload)
        kind = event.get("type")
        if kind == "response.output_text.delta":
            if event["delta"]:
                self.pieces.append((event["delta"], now))
        elif kind == "response.completed":
            self.done = True
        elif kind == "error":
            self.fail(f"in-stream error: {str(event.get('error'))[:200]}")
        elif kind in ("response.failed", "response.incomplete"):
            response = event.get("response") or {}
            reason = response.get("error") or response.get("incomplete_details")
            self.fail(f"{kind}: {str(reason)[:200]}")


class _NDJSONBody(_Body):
    """trioproxy's generic events, one JSON object a line, ended by a `done` event."""

    def __init__(self) -> None:
        super().__init__()
        self._partial = b""

    def parse(self, data: bytes, now: float) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._event(orjson.loads(line), now)
        if len(self._partial) > MAX_NDJSON_LINE:
            raise _MalformedStream(f"an NDJSON line longer than {MAX_NDJSON_LINE} bytes")

    def _event(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("type")
        if kind in ("token", "chunk"):
            self.pieces.append((event["data"], now))
        elif kind == "done":
            self.done = True
            self.buffer_latency = event.get("metadata", {}).get("buffer_latency_ms")
        elif kind == "error":
            self.fail(f"in-stream error: {str(event.get('data'))[:200]}")


_BODIES: dict[str, type[_Body]] = {
    "openai": _OpenAIBody,
    "anthropic": _AnthropicBody,
    "responses": _ResponsesBody,
    "responses-ws": _ResponsesBody,
    "ndjson": _NDJSONBody,
}


def _new_body(spec: PhaseSpec) -> _Body:
    return _BODIES[spec.protocol]()


class _Response:
    """
    One response as its reads arrive: the head, then the body's framing, then the stream's own
    parser (`_Body`). `ended` is set once it is complete or has failed (`failure`).
    """

    __slots__ = ("_framing", "_head", "_reused", "_sink", "body", "ended", "failure", "keep_alive")

    def __init__(self, body: _Body, *, reused: bool) -> None:
        self.body = body
        self.ended = trio.Event()
        self.failure: Exception | None = None
        #: The connection may carry the next request.
        self.keep_alive = False
        self._reused = reused
        self._head = b""
        self._framing: Body | None = None
        #: Where the body's pieces go: the stream's parser, or the error message.
        self._sink = body.keep_error

    def feed(self, data: bytes, now: float) -> bool:
        """Take the next read (`b""`: the connection ended), stamped `now`; True once the response is complete."""
        framing = self._framing
        if framing is None:
            started = self._start(data)
            if started is None:
                return False
            framing, data = started
            if not data and not framing.done:
                return False
        if not framing.done:
            piece = framing.feed(data)
            if piece:
                self._sink(piece, now)
            data = framing.trailing
        if not framing.done:
            return False
        self.body.ended_at = now
        if data or isinstance(framing, UntilCloseBody):
            self.keep_alive = False  # bytes after the response, or a body the connection's end delimits
        return True

    def _start(self, data: bytes) -> tuple[Body, bytes] | None:
        """Gather the head; once it is whole, the body's framing and the bytes after the head."""
        if not data:
            if self._reused and not self._head:
                raise _StaleConnection
            raise ProtocolError("the connection ended before the response head")
        buffer = self._head + data
        while True:
            end = find_head_end(buffer)
            if end < 0:
                self._head = buffer
                return None
            head = parse_head(buffer[:end])
            if not head.start[0].startswith(b"HTTP/1."):
                raise ProtocolError(f"not a status line: {b' '.join(head.start)[:100]!r}")
            buffer = buffer[end:]
            if head.status >= 200:
                break  # an interim response (100 Continue, 103 Early Hints) is skipped
        self._framing = framing = head.response_body()
        self.body.status = head.status
        if head.status == 200:
            self._sink = self.body.parse
        self.keep_alive = head.keep_alive
        return framing, buffer


class _WebSocketResponse:
    """
    One response in WebSocket mode: the server's messages on the connection until the
    response ends (`response.completed`, or a failure). A ping is answered at once.
    """

    __slots__ = ("_messages", "_reused", "_socket", "_started", "body", "ended", "failure", "keep_alive")

    def __init__(self, body: _ResponsesBody, sock: socket.socket, messages: MessageDecoder, *, reused: bool) -> None:
        self.body = body
        body.status = 200  # the upgrade was accepted as the connection opened: a message has no status
        self.ended = trio.Event()
        self.failure: Exception | None = None
        self.keep_alive = True
        self._socket = sock
        self._messages = messages
        self._reused = reused
        self._started = False

    def feed(self, data: bytes, now: float) -> bool:
        """As `_Response.feed`: True once the response has ended."""
        if not data:
            if self._reused and not self._started:
                raise _StaleConnection
            raise ProtocolError("the connection ended in the middle of a response")
        for opcode, payload in self._messages.feed(data):
            self._started = True
            if opcode == TEXT:
                self.body.event(payload, now)
            elif opcode == PING:
                self._pong(payload)
            elif opcode == CLOSE:
                raise ProtocolError(f"the server closed the WebSocket: {payload[2:200]!r}")
        if self.body.done or self.body.error is not None:
            self.body.ended_at = now
            self.keep_alive = self.body.error is None
            return True
        return False

    def _pong(self, payload: bytes) -> None:
        """
        Answer a ping without waiting (the reader serves every socket), whole or not at all: a
        pong the send buffer cannot take whole fails the connection, since a pong cut short
        would corrupt every frame after it, and one left out may get the WebSocket closed.
        """
        frame = client_frame(PONG, payload)
        try:
            sent = self._socket.send(frame)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            raise ProtocolError(
                f"a pong could not be written whole ({sent} of {len(frame)} bytes): the socket's send buffer "
                "is full, the server is not reading"
            )


class _Reader:
    """
    The one task that reads every response in flight: it waits, through trio, for a selector
    holding their sockets to become readable, then reads every socket that is, each read
    stamped with `perf_counter()` as it returns.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        if not hasattr(self._selector, "fileno"):
            raise RuntimeError("the load generator needs epoll or kqueue (a selector trio can wait for)")

    async def receive(self, sock: socket.socket, response: _Response | _WebSocketResponse) -> None:
        """Read `response` from `sock` to its end; raise what reading it raised."""
        self._selector.register(sock, selectors.EVENT_READ, response)
        try:
            await response.ended.wait()
        finally:
            if not response.ended.is_set():  # cancelled (the stream's timeout): the reader still holds the socket
                self._selector.unregister(sock)
        if response.failure is not None:
            raise response.failure

    async def run(self) -> None:
        selector = self._selector
        selector_fd = selector.fileno()
        while True:
            await trio.lowlevel.wait_readable(selector_fd)
            for key, _ in selector.select(0):
                self._read(key.fileobj, key.data)  # type: ignore[arg-type]  # registered as a socket in `receive`

    def _read(self, sock: socket.socket, response: _Response | _WebSocketResponse) -> None:
        try:
            data = sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # a reset ends the response as EOF does
        now = time.perf_counter()
        try:
            ended = response.feed(data, now)
        except Exception as exc:  # every failure belongs to its stream: `receive` raises it there
            response.failure = exc
            ended = True
        if ended:
            self._selector.unregister(sock)
            response.ended.set()

    def close(self) -> None:
        self._selector.close()


async def _exchange(connection: _Connection, endpoint: _Endpoint, body: _Body, reader: _Reader) -> None:
    """Send the request and read the whole response into `body`."""
    sock = await connection.open()
    reused, connection.used = connection.used, True
    body.sent_at = time.perf_counter()
    try:
        await _send_all(sock, endpoint.request)
    except (BrokenPipeError, ConnectionResetError):
        if reused:
            raise _StaleConnection from None
        raise
    response: _Response | _WebSocketResponse
    if connection.messages is not None:
        assert isinstance(body, _ResponsesBody)
        response = _WebSocketResponse(body, sock, connection.messages, reused=reused)
    else:
        response = _Response(body, reused=reused)
    await reader.receive(sock, response)
    if not response.keep_alive:
        connection.close()


async def _run_stream(connection: _Connection, endpoint: _Endpoint, spec: PhaseSpec, reader: _Reader) -> StreamRecord:
    """One stream, start to end, within its timeout; every failure ends up in the record."""
    body = _new_body(spec)
    with trio.move_on_after(spec.stream_timeout_s) as scope:
        try:
            try:
                await _exchange(connection, endpoint, body, reader)
            except _StaleConnection:
                connection.close()
                body = _new_body(spec)
                await _exchange(connection, endpoint, body, reader)
        except (OSError, trio.TooSlowError, ProtocolError, _StaleConnection) as exc:
            body.fail(f"connection: {type(exc).__name__}: {exc}"[:200])
        except (_MalformedStream, WebSocketError, orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            body.fail(f"malformed stream: {type(exc).__name__}: {exc}"[:200])
    if scope.cancelled_caught:
        body.fail(f"no end within the stream timeout ({spec.stream_timeout_s:g} s)")
    if body.error is not None:
        connection.close()
    return body.record(spec.tokens)


async def _connect_all(connections: list[_Connection]) -> None:
    """Open every connection, a bounded number at a time; a failure leaves that one closed (retried per stream)."""
    limiter = trio.CapacityLimiter(CONNECT_PARALLELISM)

    async def connect(connection: _Connection) -> None:
        # A failure is not fatal here: its streams will try again and record the failure.
        async with limiter:
            with contextlib.suppress(OSError, trio.TooSlowError, ProtocolError):
                await connection.open()

    async with trio.open_nursery() as nursery:
        for connection in connections:
            nursery.start_soon(connect, connection)


async def _run_rounds(
    connections: list[_Connection],
    endpoint: _Endpoint,
    spec: PhaseSpec,
    reader: _Reader,
    rounds: int,
    records: list[StreamRecord],
) -> None:
    """Every connection runs `rounds` streams back to back; they start together, or staggered (`stagger_s`)."""

    async def drive(connection: _Connection, start_after: float) -> None:
        await trio.sleep(start_after)
        for _ in range(rounds):
            records.append(await _run_stream(connection, endpoint, spec, reader))

    async with trio.open_nursery() as nursery:
        for index, connection in enumerate(connections):
            nursery.start_soon(drive, connection, spec.stagger_s * index / len(connections))


async def run_phase(spec: PhaseSpec, wait_for_go: Callable[[], Awaitable[None]]) -> PhaseResult:
    """
    Connect, warm up, wait for `wait_for_go`, then run and time the measured rounds.

    Streams still running at the phase deadline leave no record; the runner counts them as
    errors from the number expected.
    """
    endpoint = _Endpoint.from_spec(spec)
    connections = [_Connection(endpoint, spec.connect_timeout_s) for _ in range(spec.concurrency)]
    reader = _Reader()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            with trio.move_on_after(spec.deadline_s):
                await _connect_all(connections)
                await _run_rounds(connections, endpoint, spec, reader, spec.warmup_rounds, [])
            await wait_for_go()
            records: list[StreamRecord] = []
            cpu_before, started = time.process_time(), time.perf_counter()
            with trio.move_on_after(spec.deadline_s):
                await _run_rounds(connections, endpoint, spec, reader, spec.rounds, records)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_before
            nursery.cancel_scope.cancel()
    finally:
        for connection in connections:
            connection.close()
        reader.close()
    return PhaseResult(records=records, wall_s=wall, cpu_s=cpu)


async def serve_commands(stdin: trio.abc.ReceiveStream, stdout: trio.abc.SendStream) -> None:
    """Announce readiness, then run each phase the runner sends until it closes the pipe."""
    reader = LineReader(stdin)
    await send_message(stdout, b'{"loadgen": "ready"}')
    while True:
        try:
            message = await reader.read_message()
        except EOFError:
            return
        spec = PhaseSpec.from_message(message["phase"])

        async def wait_for_go() -> None:
            await send_message(stdout, b'{"ready": true}')
            if not (await reader.read_message()).get("go"):
                raise ValueError("expected {'go': true}")

        result = await run_phase(spec, wait_for_go)
        await send_message(stdout, result.to_message())


def main() -> None:
    """Entry point of the load-generator process: the protocol runs on its stdin and stdout."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    trio.run(serve_commands, stdin, stdout)


if __name__ == "__main__":
    main()
