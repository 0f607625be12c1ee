"""
The benchmark upstream behind `trioproxy upstream`: the scripted LLM API `trioproxy bench` streams from.

Why not `trioproxy.testing.FakeUpstream`, which served the benchmark before: it is built to
script faults for tests, with a task per connection that sleeps before every token and frames
every write through h11. That cost about 45 µs of CPU per token, so at 500 concurrent streams
the upstream alone filled its core and the benchmark measured the upstream, not the proxy.
This one sends the same bytes for a few µs per token, on trio's low-level I/O:

- A stream's bytes are rendered once per (API, model, usage option), by the very functions
  FakeUpstream uses, each event one HTTP chunk as h11 frames it; a response only swaps in
  its own id and `created`.
- One scheduler task keeps a heap of (due time, response) and, each time it wakes, writes
  every due write with a non-blocking `send`. Write k of a response is due at
  `start + ttft + k * interval`, however late the one before went out, so a late wake-up
  does not push back every later token. When a client's kernel buffer is full, its bytes
  queue behind what is already waiting and a task of its own waits for the socket to take
  them: nothing is dropped or reordered, and no other stream waits.
- A task per connection reads requests (HTTP/1.1 keep-alive) and goes on reading while its
  response is in flight, so the client's EOF stops the response and closes the connection;
  it is not woken per token, nor when a response ends.

The schedule: the response head as soon as the request is read, the first token `ttft` after
it (with the frames before it), then one token every `interval` (the last with the frames
after it). A non-streaming request gets its whole answer after `ttft`, as from FakeUpstream.

Routes, as FakeUpstream's: `POST /v1/chat/completions` (and `/chat/completions`), streaming or
not, honouring `stream_options.include_usage`; `POST /v1/messages` (Anthropic); `POST
/v1/responses` (and `/responses`: OpenAI Responses); `GET /v1/models`;
404 for anything else; 400 for a body that is not a JSON object, or a malformed request (which
also closes the connection); 413 for a body over `MAX_REQUEST_BODY`.
"""

from __future__ import annotations

import errno
import functools
import heapq
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import orjson
import trio

from ..testing import Reply
from ..testing._server import LoopbackServer
from ..testing._wire import (
    DEFAULT_MODEL,
    ROUTES,
    SSE_HEADERS,
    Api,
    Frame,
    anthropic_frames,
    anthropic_message,
    error_body,
    models_body,
    openai_completion,
    openai_frames,
    reason_phrase,
    response_object,
    responses_frames,
)
from .http1 import Body, Head, ProtocolError, find_head_end, parse_head

__all__ = ["BenchUpstream"]

logger = logging.getLogger(__name__)

_SERVED: Final[dict[str, Api]] = {
    route: api
    for route, api in ROUTES.items()
    if api in (Api.OPENAI, Api.ANTHROPIC, Api.RESPONSES) and not route.startswith("/v1/responses/")
}
"""The streamed generations this upstream serves: FakeUpstream's routes less its other endpoints."""

#: Bytes asked of the kernel per read.
MAX_RECEIVE: Final = 64 * 1024
#: A larger request body is answered with 413 and the connection closed.
MAX_REQUEST_BODY: Final = 8 * 1024 * 1024
#: Rendered scripts kept (see `BenchUpstream._stream`): a client inventing model names costs a
#: render per request, not memory without bound.
MAX_SCRIPTS: Final = 64
#: `accept` failures that mean "out of descriptors or memory": retried after a pause, not in a spin.
_ACCEPT_PAUSE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE: Final = 0.1
#: `accept` failures that mean the client gave up before it was accepted (as `trio.SocketListener` has them).
_ACCEPT_SKIP_ERRORS: Final = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})

# Where a response's own values go in a rendered script. Each is anchored on its key and quotes,
# so no text inside a JSON string (a model name, say) can match: a quote in a string is escaped.
_OPENAI_ID: Final = b'"id":"chatcmpl-fake%b"'
_ANTHROPIC_ID: Final = b'"id":"msg_fake%b"'
_CREATED: Final = b'"created":%b,'
_RESPONSE_ID: Final = b'"id":"resp_fake%b"'
_RESPONSE_CREATED: Final = b'"created_at":%b,'
#: A Responses stream's message item: its id, and the events that name it.
_RESPONSE_ITEM_IDS: Final = (b'"id":"msg_fake%b"', b'"item_id":"msg_fake%b"')
#: Each API's places for a response's own values in its stream, as (format, which value: 0 the
#: response's number, 1 the time).
_SWAPPED: Final[dict[Api, tuple[tuple[bytes, int], ...]]] = {
    Api.OPENAI: ((_OPENAI_ID, 0), (_CREATED, 1)),
    Api.ANTHROPIC: ((_ANTHROPIC_ID, 0),),
    Api.RESPONSES: ((_RESPONSE_ID, 0), *((item_id, 0) for item_id in _RESPONSE_ITEM_IDS), (_RESPONSE_CREATED, 1)),
}
#: Each API's whole (`stream` not true) answer.
_WHOLE_ANSWERS: Final[dict[Api, Callable[[Reply, str, int], dict[str, object]]]] = {
    Api.OPENAI: openai_completion,
    Api.ANTHROPIC: anthropic_message,
    Api.RESPONSES: response_object,
}

#: A response's writes, ready for the wire: `writes[k]` is sent when token k is due.
_Writes = tuple[bytes, ...]
#: (placeholder, value) pairs a response swaps into its writes.
_Substitutions = tuple[tuple[bytes, bytes], ...]


class BenchUpstream(LoopbackServer):
    """
    The benchmark upstream on `127.0.0.1:port` (0: the kernel picks): every answer is `tokens`
    tokens, " tok0" … " tok{tokens-1}", the first `ttft` seconds after the request, then one
    every `interval` seconds.
    """

    def __init__(self, *, tokens: int = 64, ttft: float = 0.05, interval: float = 0.02, port: int = 0) -> None:
        if tokens < 0 or ttft < 0 or interval < 0:
            raise ValueError("tokens, ttft and interval must be >= 0")
        self._reply = Reply(tokens=tuple(f" tok{index}" for index in range(tokens)))
        self._ttft = ttft
        self._interval = interval
        self._bind_port = port
        self._scripts: dict[tuple[object, ...], _Writes] = {}
        self._numbers = itertools.count(1)
        #: Connections accepted so far, and those still open.
        self.connections_accepted = 0
        self.open_connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[BenchUpstream] = trio.TASK_STATUS_IGNORED) -> None:
        """
        Listen, report `self` through `task_status`, and serve until cancelled; every socket is
        closed on the way out.
        """
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self._bind_port))
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
            self._port = listener.getsockname()[1]
            async with trio.open_nursery() as nursery:
                scheduler = _Scheduler(self._ttft, self._interval)
                nursery.start_soon(scheduler.run)
                task_status.started(self)
                await self._accept(listener, nursery, scheduler)
        finally:
            listener.close()

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery, scheduler: _Scheduler) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:  # every connection waiting, before waiting again
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIP_ERRORS:
                        continue
                    if exc.errno not in _ACCEPT_PAUSE_ERRORS:
                        raise
                    logger.warning("benchmark upstream: cannot accept (%s), pausing", exc)
                    await trio.sleep(_ACCEPT_PAUSE)
                    break
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connections_accepted += 1
                nursery.start_soon(self._serve_connection, _Connection(client, nursery), scheduler)

    async def _serve_connection(self, connection: _Connection, scheduler: _Scheduler) -> None:
        """
        Answer requests one after another until the client leaves or either side asks to close.

        The task goes back to reading as soon as a response is scheduled, so the client's EOF
        stops that response at once; a request that arrives before the response ended (a
        pipelining client) waits for it.
        """
        self.open_connections += 1
        try:
            while True:
                try:
                    request = await connection.read_request()
                except _BadRequest as exc:
                    await connection.wait_ended()
                    body = error_body(Api.OPENAI, exc.status, str(exc))
                    connection.answer(_json_response(exc.status, body, close=True))
                    await connection.wait_ended()
                    return
                if request is None:
                    return
                await connection.wait_ended()
                if connection.broken:
                    return
                self._respond(connection, request, scheduler)
                if request.close:
                    await connection.wait_ended()
                    return
        except Exception:
            # One connection's failure must never stop the server (Cancelled is not an Exception).
            logger.exception("benchmark upstream: a connection failed")
        finally:
            self.open_connections -= 1
            connection.close()

    def _respond(self, connection: _Connection, request: _Request, scheduler: _Scheduler) -> None:
        """Write the answer's head now and schedule its body; a quick answer is written whole."""
        method = request.head.start[0].decode("latin-1")
        route = request.head.start[1].partition(b"?")[0].decode("latin-1")
        if method == "GET" and route == "/v1/models":
            connection.answer(_json_response(200, models_body(), close=request.close))
            return
        api = _SERVED.get(route) if method == "POST" else None
        if api is None:
            body = error_body(Api.OPENAI, 404, f"no route for {method} {route}")
            connection.answer(_json_response(404, body, close=request.close))
            return
        try:
            payload = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            body = error_body(api, 400, "the request body must be a JSON object")
            connection.answer(_json_response(400, body, close=request.close))
            return
        model = payload.get("model")
        if not isinstance(model, str):
            model = DEFAULT_MODEL
        number = next(self._numbers)
        connection.begin_response()
        if payload.get("stream") is True:
            options = payload.get("stream_options")
            include_usage = api is Api.OPENAI and isinstance(options, dict) and options.get("include_usage") is True
            connection.write(_stream_head(chunked=request.chunked, close=request.close))
            writes, substitutions = self._stream(api, model, include_usage, request.chunked, number)
            scheduled = _Scheduled(connection, writes, substitutions, request.started)
        else:
            answer = _json_response(200, _WHOLE_ANSWERS[api](self._reply, model, number), close=request.close)
            scheduled = _Scheduled(connection, (answer,), (), request.started)
        scheduler.add(scheduled)

    def _stream(
        self, api: Api, model: str, include_usage: bool, chunked: bool, number: int
    ) -> tuple[_Writes, _Substitutions]:
        """
        A stream's writes and what this response swaps into them: its number (the ids) and, for
        OpenAI and Responses, when it was created.

        The writes come from a script rendered once per (API, model, usage option, framing)
        and per length of those two values: rendered with placeholders as long as the values,
        each write is ready for the wire, chunk sizes included, so a response costs a
        `bytes.replace` per value and write.
        """
        values = (b"%d" % number, b"%d" % int(time.time()))
        placeholders = tuple(b"1".ljust(len(value), b"0") for value in values)
        key = (api, model, include_usage, chunked, *map(len, values))
        writes = self._scripts.get(key)
        if writes is None:
            if len(self._scripts) >= MAX_SCRIPTS:
                self._scripts.clear()
            number_placeholder, created_placeholder = map(int, placeholders)
            if api is Api.OPENAI:
                frames = openai_frames(
                    self._reply, model, number_placeholder, include_usage=include_usage, created=created_placeholder
                )
            elif api is Api.RESPONSES:
                frames = responses_frames(self._reply, model, number_placeholder, created=created_placeholder)
            else:
                frames = anthropic_frames(self._reply, model, number_placeholder)
            writes = self._scripts[key] = _render_writes(frames, chunked=chunked)
        substitutions = tuple((format % placeholders[which], format % values[which]) for format, which in _SWAPPED[api])
        return writes, substitutions


def _render_writes(frames: Sequence[Frame], *, chunked: bool) -> _Writes:
    """
    One write per token, with the frames before it; the frames after the last token join it.
    Each frame is one HTTP chunk (as h11 frames each write); the last write ends the body.
    """
    groups: list[list[bytes]] = []
    waiting: list[bytes] = []
    for frame in frames:
        waiting.append(b"%x\r\n%b\r\n" % (len(frame.data), frame.data) if chunked else frame.data)
        if frame.token:
            groups.append(waiting)
            waiting = []
    if waiting and groups:
        groups[-1] += waiting
    elif waiting or not groups:
        groups.append(waiting)
    if chunked:
        groups[-1].append(b"0\r\n\r\n")
    return tuple(b"".join(group) for group in groups)


def _head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
    return b"".join(lines) + b"\r\n"


@functools.cache
def _stream_head(*, chunked: bool, close: bool) -> bytes:
    headers = list(SSE_HEADERS)
    if chunked:
        headers.append(("transfer-encoding", "chunked"))
    if close:
        headers.append(("connection", "close"))
    return _head(200, headers)


def _json_response(status: int, payload: object, *, close: bool) -> bytes:
    body = orjson.dumps(payload)
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    return _head(status, headers) + body


# --------------------------------------------------------------------------------------------
# Writing on the clock


class _Scheduled:
    """A response on the scheduler's clock: its write k is due at `start + ttft + k * interval`."""

    __slots__ = ("connection", "next", "start", "substitutions", "writes")

    def __init__(self, connection: _Connection, writes: _Writes, substitutions: _Substitutions, start: float) -> None:
        self.connection = connection
        self.writes = writes
        self.substitutions = substitutions
        self.start = start
        self.next = 0

    def render(self, index: int) -> bytes:
        """Write `index`, with this response's own values swapped in."""
        data = self.writes[index]
        for placeholder, value in self.substitutions:
            data = data.replace(placeholder, value)
        return data


class _Scheduler:
    """
    The one task that writes every response body: a heap of (due time, order, response), each
    response in it once, at its next write. It sleeps until the earliest is due; a response
    added with an earlier first write moves that wake-up forward.
    """

    def __init__(self, ttft: float, interval: float) -> None:
        self._ttft = ttft
        self._interval = interval
        self._heap: list[tuple[float, int, _Scheduled]] = []
        self._order = itertools.count()
        self._sleep = trio.CancelScope()

    def add(self, scheduled: _Scheduled) -> None:
        due = scheduled.start + self._ttft
        heapq.heappush(self._heap, (due, next(self._order), scheduled))
        self._sleep.deadline = min(self._sleep.deadline, due)

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._write_due(trio.current_time())

    def _write_due(self, now: float) -> None:
        heap, first, interval, order = self._heap, self._ttft, self._interval, self._order
        while heap and heap[0][0] <= now:
            scheduled = heap[0][2]
            connection = scheduled.connection
            index = scheduled.next
            if not connection.broken:
                connection.write(scheduled.render(index))
            index += 1
            if index < len(scheduled.writes) and not connection.broken:
                scheduled.next = index
                heapq.heapreplace(heap, (scheduled.start + first + index * interval, next(order), scheduled))
            else:
                heapq.heappop(heap)
                connection.end_response()


# --------------------------------------------------------------------------------------------
# One connection


class _BadRequest(Exception):
    """A request that cannot be answered normally: answer `status`, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Request:
    head: Head
    body: bytes
    #: `trio.current_time()` when the request was complete: the clock of its answer starts here.
    started: float

    @property
    def close(self) -> bool:
        """The connection closes after this answer: the client asked to, or speaks HTTP/1.0."""
        return not self.head.keep_alive or not self.chunked

    @property
    def chunked(self) -> bool:
        """A stream can be framed in chunks (HTTP/1.1); otherwise it ends when the connection does."""
        return self.head.version == b"HTTP/1.1"


class _Connection:
    """
    One client connection: a non-blocking socket, the bytes read but not yet parsed, and
    whether a response is in flight (between `begin_response` and its last byte reaching the
    kernel).
    """

    def __init__(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        self.socket = sock
        #: The client left, or its socket failed: nothing more is written, the connection closes.
        self.broken = False
        self.in_flight = False
        self._nursery = nursery
        self._received = b""
        #: Bytes the kernel did not take yet, in order; a `_flush` task is writing them.
        self._pending = bytearray()
        #: The response's last bytes are queued in `_pending`: it ends when the queue is empty.
        self._ending = False
        #: Set when the response in flight ends; made only when a task waits for that.
        self._ended: trio.Event | None = None

    async def read_request(self) -> _Request | None:
        """The next whole request, or None once the client has left (which stops a response in flight)."""
        read = await self._read_head()
        if read is None:
            return None
        head, framing = read
        if not framing.done and b"100-continue" in head.tokens(b"expect"):
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await self._read_body(framing)
        if body is None:
            return None
        return _Request(head, body, trio.current_time())

    async def _read_head(self) -> tuple[Head, Body] | None:
        """
        The next request's head and its body's framing, the head's bytes taken from
        `_received`; None once the client has left.
        """
        try:
            while (end := find_head_end(self._received)) < 0:
                if not await self._receive():
                    return None
            head = parse_head(self._received[:end])
            if not head.start[2].startswith(b"HTTP/1."):
                raise ProtocolError(f"not a request line: {b' '.join(head.start)[:100]!r}")
            framing = head.request_body()
        except ProtocolError as exc:
            raise _BadRequest(400, str(exc)) from None
        self._received = self._received[end:]
        return head, framing

    async def _read_body(self, framing: Body) -> bytes | None:
        """The body `framing` delimits, at most `MAX_REQUEST_BODY`; what follows it stays in `_received`."""
        data, self._received = self._received, b""
        body = bytearray()
        while not framing.done:
            if not data:
                if not await self._receive():
                    return None
                data, self._received = self._received, b""
            try:
                body += framing.feed(data)
            except ProtocolError as exc:
                raise _BadRequest(400, str(exc)) from None
            data = framing.trailing
            if len(body) > MAX_REQUEST_BODY:
                raise _BadRequest(413, f"request body exceeds {MAX_REQUEST_BODY} bytes")
        self._received = data
        return bytes(body)

    async def _receive(self) -> bool:
        """
        Read once into `_received`. False once the client has closed (or reset) the
        connection: the response in flight, if any, stops there.
        """
        while True:
            # Wait first: a request never waits in the socket, the client sends it after the last response.
            await trio.lowlevel.wait_readable(self.socket)
            try:
                data = self.socket.recv(MAX_RECEIVE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.abort()
                return False
            self._received += data
            return True

    def begin_response(self) -> None:
        self.in_flight = True
        self._ending = False

    def answer(self, response: bytes) -> None:
        """A whole response at once."""
        self.begin_response()
        self.write(response)
        self.end_response()

    def write(self, data: bytes) -> None:
        """
        Hand `data` to the kernel now, or queue it behind bytes still waiting: never blocking,
        never reordering. A failed send means the client is gone.
        """
        if self.broken:
            return
        if self._pending:
            self._pending += data
            return
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self._pending += data[sent:]
            self._nursery.start_soon(self._flush)

    def end_response(self) -> None:
        """The response's last bytes are written or queued: it ends when the queue is empty."""
        if self._pending:
            self._ending = True
        else:
            self._finish()

    async def wait_ended(self) -> None:
        """Wait until no response is in flight (at once if none is)."""
        if self.in_flight:
            if self._ended is None:
                self._ended = trio.Event()
            await self._ended.wait()

    def _finish(self) -> None:
        self.in_flight = False
        if self._ended is not None:
            self._ended.set()
            self._ended = None

    async def _flush(self) -> None:
        """Write the queued bytes as the socket takes them; end the response if it was waiting for that."""
        try:
            while self._pending:
                await trio.lowlevel.wait_writable(self.socket)
                try:
                    sent = self.socket.send(self._pending)
                except BlockingIOError:
                    continue
                del self._pending[:sent]
        except (OSError, trio.ClosedResourceError):
            self.abort()
            return
        if self._ending:
            self._finish()

    def abort(self) -> None:
        """Stop the response in flight (the scheduler drops it at its next write) and let the connection close."""
        self.broken = True
        self._pending.clear()
        self._finish()

    def close(self) -> None:
        self.abort()
        trio.lowlevel.notify_closing(self.socket)  # wakes a `_flush` waiting on it
        self.socket.close()
