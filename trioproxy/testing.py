"""
A real, scripted LLM upstream on loopback, for end-to-end tests and benchmarks.

Why this exists: the behaviour that matters most in trioproxy happens at the socket, and a fake
transport such as `httpx.MockTransport` never reaches a socket. It cannot show connection
pooling and keep-alive, chunked framing, a stream that is only half read, a peer that resets
the connection, or how long a closed connection takes to be noticed at the other end. So the
end-to-end tests and the benchmarks point trioproxy at `FakeUpstream` instead. It is a raw trio
TCP server on `127.0.0.1:0` that speaks HTTP/1.1 through `h11` (sans-IO) and streams OpenAI
`chat.completion.chunk`s (`sse_protocol.md` §4.3) or Anthropic Messages events (§5.1-5.2)
exactly as the real APIs do. Each request is answered from a script (`Reply`) that sets the
tokens and their timing, tool calls, error statuses, and faults: reset the connection, stall,
send an in-stream error, or send raw malformed bytes.

It records every request. Above all, it notices within milliseconds when the client (the
proxy) closes its connection, so a test can show that a client disconnect really reached the
upstream. A reader task watches the socket for the whole life of the connection. On EOF it
marks the in-flight request `disconnected` and cancels the writer, and it does so even while
the script is sleeping (headers delay, time to first token, stall).

It deliberately uses none of httpx, quart or hypercorn: a test double must not share code with
the thing it tests. It uses trio, h11, orjson and the standard library only.

Typical use (pytest-trio)::

    async def test_stream(nursery):
        upstream = await open_fake_upstream(nursery, Reply(tokens=("Hi", "!"), interval=0.01))
        ...  # point the proxy at upstream.url
        await upstream.wait_for_requests(1)
        assert upstream.requests[0].json["model"] == "gpt-4o-mini"

Routes (the query string is ignored for routing):

- `POST /v1/chat/completions` and `POST /chat/completions`: OpenAI format.
- `POST /v1/messages`: Anthropic format.
- `POST /v1/responses` and `POST /responses`: OpenAI Responses format (typed events with `sequence_number`).
- `POST /v1/completions` and `POST /completions`: legacy text completions (`text_completion`
  chunks, or one `text_completion` object), `prompt` and `suffix` taken as they come.
- `POST /v1/embeddings` and `POST /embeddings`: one embedding per input (a small vector made
  from the input's length and index), as floats or, when asked, base64 (as the SDKs ask).
- `GET /v1/models`: a static OpenAI models list.
- Any method on `/v1/echo` or a path under it: the request body sent back, its content type
  kept, with `x-echo-method` and `x-echo-target` (the target as received); to a request that
  accepts `text/event-stream`, the `Reply`'s tokens as bare `data:` events instead.
- Anything else: 404, with an OpenAI-shaped error body.

Every route but `/v1/models` takes a `Reply` (from the `push()` queue, else the default). A
body that is not a JSON object gets a 400 in the route's error shape and uses up no `Reply`
(the echo route takes any body).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from typing import Any, Final

import h11
import orjson
import trio

__all__ = [
    "FakeUpstream",
    "RecordedRequest",
    "Reply",
    "ToolCall",
    "open_fake_upstream",
]

logger = logging.getLogger(__name__)

#: Bytes asked of the kernel per read. Request heads are capped separately by h11's own
#: `max_incomplete_event_size` (16 KiB).
MAX_RECEIVE: Final = 64 * 1024
#: A larger request body is answered with 413 and the connection is closed.
MAX_REQUEST_BODY: Final = 8 * 1024 * 1024
#: Bytes a client may pipeline while a response is still in flight. The reader must keep reading
#: during a response (that is how it sees EOF), so this is the cap on what it holds meanwhile.
MAX_PIPELINED: Final = 64 * 1024
#: Number of argument fragments a tool call is streamed in (fewer for very short arguments).
TOOL_ARGUMENT_FRAGMENTS: Final = 3

_SYSTEM_FINGERPRINT: Final = "fp_trioproxy_fake"
_DEFAULT_MODEL: Final = "fake-model"


# --------------------------------------------------------------------------------------------
# Public data model


@dataclass(frozen=True)
class ToolCall:
    """One tool (function) call that the fake model makes after its text."""

    id: str
    name: str
    #: The JSON text of the arguments. It is streamed in several fragments: OpenAI
    #: `function.arguments` pieces, Anthropic `input_json_delta`s.
    arguments: str


@dataclass
class Reply:
    """
    What the upstream does for one request.

    A "token" is one content event: each text token, then each tool-call argument fragment.
    `interval` is slept before every token except the first. The `*_after` faults fire once
    that many tokens have been sent, so 0 means "right after the response headers" (and after
    `ttft`). A count larger than the number of tokens never fires. If several faults share the
    same count, reset wins over stall, and stall wins over error.

    For a non-streaming request, `headers_delay` and then `ttft` pass before the JSON body is
    sent. `reset_after` (any value) aborts the connection instead, `stall_after` (any value)
    never answers, and `error_after` (any value) answers 500 with an error body.

    With `raw_body`, the response uses `status` and the text/event-stream content type, and
    `raw_body` is sent as one write after `ttft`. Then, if `reset_after` is set, the connection
    is reset before the terminating chunk; if `stall_after` is set, the server stalls. This is
    how to produce a truncated stream.
    """

    tokens: Sequence[str] = ("Hello", ",", " world", "!")
    #: Seconds after the response headers before the first token.
    ttft: float = 0.0
    #: Seconds between tokens.
    interval: float = 0.0
    #: Non-2xx: a JSON error body in the route's own error shape, no stream.
    status: int = 200
    error_message: str = "upstream failure"
    #: Extra response headers, e.g. `{"retry-after": "2"}`. They replace defaults of the same name.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds before even the response headers are sent.
    headers_delay: float = 0.0
    #: After N tokens, abort the TCP connection (RST) without finishing the response.
    reset_after: int | None = None
    #: After N tokens, send nothing more and keep the connection open until the client goes away.
    stall_after: int | None = None
    #: After N tokens, send an in-stream error event (OpenAI `data: {"error": ...}`, Anthropic
    #: `event: error` with `overloaded_error`), then end the response cleanly, with no
    #: `[DONE]` and no `message_stop`.
    error_after: int | None = None
    #: Streamed after the text tokens, each one's arguments in several fragments.
    tool_calls: Sequence[ToolCall] = ()
    #: Defaults to "stop", or to "tool_calls" when there are tool calls. The Anthropic route
    #: maps stop, tool_calls and length to end_turn, tool_use and max_tokens, and passes any
    #: other value through unchanged.
    finish_reason: str | None = None
    #: (prompt_tokens, completion_tokens). A completion count of 0 means `len(tokens)`.
    usage: tuple[int, int] = (7, 0)
    #: Of the prompt tokens, how many were read from the upstream's prompt cache: OpenAI's
    #: `prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens` (its
    #: `input_tokens` then counts the rest). 0: not reported at all.
    cached_tokens: int = 0
    #: Send exactly these bytes as the body instead of a generated stream, for malformed
    #: SSE or truncated JSON.
    raw_body: bytes | None = None
    #: OpenAI: leave out `data: [DONE]`. Anthropic: leave out `message_stop`.
    omit_done: bool = False
    #: When the request ends with an assistant message (an Anthropic prefill, or vLLM's
    #: `continue_final_message`), continue it as a model would: stream only what follows its
    #: text in `tokens` (joined), from the token it ends in. A text that `tokens` do not start
    #: with is answered 400.
    continues: bool = False
    #: When the request ends with an assistant message, answer 400 as an upstream that takes
    #: no prefill ("This model does not support assistant message prefill").
    refuse_continuation: bool = False

    def __post_init__(self) -> None:
        for name in ("ttft", "interval", "headers_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"Reply.{name} must be >= 0")
        if not 200 <= self.status <= 599:
            raise ValueError("Reply.status must be a final status code (200-599)")
        for name in ("reset_after", "stall_after", "error_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Reply.{name} must be >= 0 or None")


@dataclass(eq=False)
class RecordedRequest:
    """One request the upstream received, and what became of its response."""

    method: str
    #: The request target as sent, with any query string.
    path: str
    #: Header names are lower-case. Repeated headers are joined with ", ".
    headers: dict[str, str]
    body: bytes
    #: The parsed body, or None if it is empty or not JSON.
    json: Any = None
    #: `trio.current_time()` when the request was complete.
    started: float = 0.0
    #: Set when the client closed the connection (or it broke) before this response was fully sent.
    disconnected: trio.Event = field(default_factory=trio.Event)
    disconnected_at: float | None = None
    #: The whole response was sent, including the terminating chunk.
    completed: bool = False
    #: Tokens (text tokens and tool-argument fragments) written so far.
    tokens_sent: int = 0
    #: Sequence number (from 1) of the TCP connection that carried the request. Two requests
    #: with the same number came over one kept-alive connection.
    connection: int = 0


ReplySource = Callable[[RecordedRequest], Reply] | Reply | None


# --------------------------------------------------------------------------------------------
# The server


class _LoopbackServer:
    """A server on `127.0.0.1` whose port is known once it has started (it sets `_port`)."""

    _port: int | None = None

    @property
    def port(self) -> int:
        """The port the server listens on. Valid once `serve` has started."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} has not started; use `await nursery.start(server.serve)`")
        return self._port

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, the base URL to give the proxy (append `/v1` as needed)."""
        return f"http://127.0.0.1:{self.port}"


class FakeUpstream(_LoopbackServer):
    """
    A scripted OpenAI/Anthropic upstream on `127.0.0.1`, on a port the kernel picks.

    `replies` is a `Reply` used for every request, a callable that gets each
    `RecordedRequest` and returns its `Reply`, or None (every request gets `Reply()`).
    Replies queued with `push()` take precedence, one per request.

    `port` 0 lets the kernel pick. `max_recorded` keeps only the latest requests in
    `requests` (a long-running benchmark upstream must not grow without bound).
    """

    def __init__(self, replies: ReplySource = None, *, port: int = 0, max_recorded: int | None = None) -> None:
        self._replies = replies
        self._queue: collections.deque[Reply] = collections.deque()
        #: Every request (or the latest `max_recorded`), in arrival order (a request too
        #: malformed to parse is answered 400 but not recorded).
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=max_recorded)
        #: How many requests arrived in all.
        self.request_count = 0
        self._bind_port = port
        self._arrived = trio.Event()
        self._serving = False
        self._connection_numbers = itertools.count(1)
        self._response_numbers = itertools.count(1)

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<FakeUpstream {where}, {len(self.requests)} requests>"

    async def serve(self, *, task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED) -> None:
        """
        Bind `127.0.0.1:PORT`, report `self` through `task_status` once listening, and serve
        until cancelled.

        Each connection runs in its own task. A failure on one connection is logged and
        never stops the server.
        """
        if self._serving:
            raise RuntimeError("FakeUpstream.serve() may run only once")
        self._serving = True
        listeners = await trio.open_tcp_listeners(self._bind_port, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            task_status.started(self)

    def push(self, *replies: Reply) -> None:
        """Queue replies that take precedence over the default, used one per request in order."""
        for reply in replies:
            if not isinstance(reply, Reply):
                raise TypeError(f"push() takes Reply objects, not {type(reply).__name__}")
        self._queue.extend(replies)

    async def wait_for_requests(self, n: int) -> None:
        """Return once at least `n` requests have arrived (complete, body included)."""
        await trio.lowlevel.checkpoint()
        while self.request_count < n:
            await self._arrived.wait()

    # -- internals used by _Connection ---------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self.request_count += 1
        # Wake every waiter, then arm a fresh event: a trio.Event cannot be cleared.
        self._arrived.set()
        self._arrived = trio.Event()

    def _reply_for(self, request: RecordedRequest) -> Reply:
        if self._queue:
            return self._queue.popleft()
        if self._replies is None:
            return Reply()
        if isinstance(self._replies, Reply):
            return self._replies
        reply = self._replies(request)
        if not isinstance(reply, Reply):
            raise TypeError(f"the replies callable returned {type(reply).__name__}, not Reply")
        return reply

    def _next_response_number(self) -> int:
        return next(self._response_numbers)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection. No error raised here may reach `serve_listeners`, which would stop the server."""
        connection = _Connection(self, stream, next(self._connection_numbers))
        try:
            await connection.run()
        except* Exception:
            # Cancelled is a BaseException: except* leaves it in the group, which is re-raised.
            logger.exception("fake upstream: connection %d failed", connection.number)


async def open_fake_upstream(nursery: trio.Nursery, replies: ReplySource = None) -> FakeUpstream:
    """Start a `FakeUpstream` in `nursery` and return it once it is listening."""
    upstream = FakeUpstream(replies)
    await nursery.start(upstream.serve)
    return upstream


# --------------------------------------------------------------------------------------------
# One connection: a reader task (parsing and disconnect watch) and the responder (this task)


class _ClientGoneError(Exception):
    """A write failed because the client closed or reset the connection."""


class _ResetError(Exception):
    """The script asks for the connection to be aborted (`reset_after`)."""


class _Outcome(Enum):
    DONE = "done"  # the response was sent; the connection may serve another request
    GONE = "gone"  # the client went away mid-response
    RESET = "reset"  # the script asked for a TCP reset


@dataclass(frozen=True)
class _Rejection:
    """A request that could not be parsed: answer it with an error status, then close."""

    status: int
    message: str


@dataclass(eq=False)
class _InFlight:
    """The request being answered, and the scope that a disconnect cancels."""

    request: RecordedRequest
    # Created by the reader, so a disconnect that arrives before the responder enters the
    # scope still counts: a scope cancelled before it is entered cancels at once.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


_Item = RecordedRequest | _Rejection


class _Connection:
    """
    One HTTP/1.1 connection, keep-alive included.

    Two tasks share one `h11.Connection`. They never conflict, because every h11 call is
    synchronous and trio switches tasks only at an `await`:

    - the *reader* owns the receive side. It feeds h11, turns complete requests into
      `RecordedRequest`s and passes them over an unbuffered channel. It also keeps reading
      while a response is in flight, so EOF is seen at once and cancels that response.
    - the *responder* (the task that runs `run`) owns the send side. It answers one request
      at a time, then calls `start_next_cycle` for the next one.
    """

    def __init__(self, server: FakeUpstream, stream: trio.SocketStream, number: int) -> None:
        self.number = number
        self._server = server
        self._stream = stream
        self._h11 = h11.Connection(h11.SERVER)
        self._inflight: _InFlight | None = None
        self._head: h11.Request | None = None
        self._body = bytearray()
        """The request being read: its head and the body so far."""
        self._pause: trio.CancelScope | None = None
        self._pipelined = 0

    async def run(self) -> None:
        reset = False
        send_channel, receive_channel = trio.open_memory_channel[_Item](0)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, send_channel)
                reset = await self._respond_loop(receive_channel)
                nursery.cancel_scope.cancel()
        finally:
            if reset:
                # SO_LINGER (on, 0 s): close() sends RST and drops unsent data, which is what
                # an upstream that crashes mid-stream looks like to the proxy.
                with contextlib.suppress(OSError):  # already broken: a plain close does the job
                    self._stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(self._stream)

    # -- reader ----------------------------------------------------------------------------------

    async def _read_loop(self, requests: trio.MemorySendChannel[_Item]) -> None:
        async with requests:
            while True:
                try:
                    event = self._h11.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse_garbage(requests, exc)
                    return
                if isinstance(event, h11.Event):
                    if not await self._take(event, requests):
                        return
                elif not await self._receive(paused=event is h11.PAUSED):  # or NEED_DATA
                    return

    async def _take(self, event: h11.Event, requests: trio.MemorySendChannel[_Item]) -> bool:
        """One event of a request (its head, body or end); False once the connection is done."""
        if isinstance(event, h11.Request):
            self._head, self._body = event, bytearray()
            return await self._continue_if_asked()
        if isinstance(event, h11.Data):
            self._body += event.data
            return await self._body_within_limit(requests)
        if isinstance(event, h11.EndOfMessage):
            assert self._head is not None
            request = self._make_request(self._head, bytes(self._body))
            self._head, self._body = None, bytearray()
            self._server._record(request)
            self._inflight = _InFlight(request)
            await requests.send(request)
        elif isinstance(event, h11.ConnectionClosed):
            self._client_gone()
            return False
        return True

    async def _refuse_garbage(self, requests: trio.MemorySendChannel[_Item], exc: h11.RemoteProtocolError) -> None:
        """A request that is not HTTP gets its 4xx; garbage while a request is answered drops the connection."""
        if self._inflight is not None:
            # Garbage after a complete request, while we answer it: nobody can be told, so
            # drop the connection (the failure is logged).
            raise exc
        await requests.send(_Rejection(exc.error_status_hint, str(exc)))

    async def _body_within_limit(self, requests: trio.MemorySendChannel[_Item]) -> bool:
        """Whether the body read so far is within `MAX_REQUEST_BODY`; one over it gets a 413."""
        if len(self._body) <= MAX_REQUEST_BODY:
            return True
        await requests.send(_Rejection(413, f"request body exceeds {MAX_REQUEST_BODY} bytes"))
        return False

    async def _continue_if_asked(self) -> bool:
        """Answer `Expect: 100-continue`, if the request asks; False once the client has gone."""
        if self._h11.they_are_waiting_for_100_continue:
            try:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            except _ClientGoneError:
                return False
        return True

    async def _receive(self, *, paused: bool) -> bool:
        """
        Read once from the socket into h11. Return False once the client has gone.

        h11 reports `PAUSED` when the client pipelined bytes after a request that is still
        being answered. The read then runs in a cancel scope, which the responder cancels when
        it starts the next cycle, so the buffered request gets parsed without waiting for
        more bytes. Cancelling a trio socket read loses no data.
        """
        with trio.CancelScope() as scope:
            if paused:
                self._pause = scope
            try:
                data = await self._stream.receive_some(MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self._pause = None
        if scope.cancelled_caught:
            return True
        if not data:
            self._client_gone()
            return False
        if self._inflight is not None:
            self._pipelined += len(data)
            if self._pipelined > MAX_PIPELINED:
                raise RuntimeError(f"client pipelined more than {MAX_PIPELINED} bytes during a response")
        self._h11.receive_data(data)
        return True

    def _make_request(self, head: h11.Request, body: bytes) -> RecordedRequest:
        headers: dict[str, str] = {}
        for raw_name, raw_value in head.headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        try:
            parsed: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        return RecordedRequest(
            method=head.method.decode("ascii", "replace"),
            path=head.target.decode("latin-1"),
            headers=headers,
            body=body,
            json=parsed,
            started=trio.current_time(),
            connection=self.number,
        )

    def _client_gone(self) -> None:
        """The client closed or broke the connection: mark the in-flight request, stop its writer."""
        inflight = self._inflight
        if inflight is None:
            return
        request = inflight.request
        if request.completed or request.disconnected.is_set():
            return
        request.disconnected_at = trio.current_time()
        request.disconnected.set()
        inflight.scope.cancel()

    # -- responder -------------------------------------------------------------------------------

    async def _respond_loop(self, requests: trio.MemoryReceiveChannel[_Item]) -> bool:
        """Answer requests one at a time. Return True if the connection must be reset."""
        async with requests:
            async for item in requests:
                if isinstance(item, _Rejection):
                    await self._reject(item)
                    return False
                inflight = self._inflight
                assert inflight is not None
                assert inflight.request is item
                outcome = await self._answer(inflight)
                if outcome is _Outcome.RESET:
                    return True
                if outcome is _Outcome.GONE:
                    return False
                if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                    return False  # Connection: close, or the client closed after a complete response
                self._h11.start_next_cycle()
                self._inflight = None
                self._pipelined = 0
                if self._pause is not None:
                    self._pause.cancel()
        return False

    async def _answer(self, inflight: _InFlight) -> _Outcome:
        outcome = _Outcome.DONE
        with inflight.scope:
            try:
                await self._dispatch(inflight.request)
            except _ClientGoneError:
                self._client_gone()
                outcome = _Outcome.GONE
            except _ResetError:
                outcome = _Outcome.RESET
        if inflight.scope.cancelled_caught:
            return _Outcome.GONE
        return outcome

    async def _dispatch(self, request: RecordedRequest) -> None:
        method, route = request.method, request.path.partition("?")[0]
        if method == "GET" and route == "/v1/models":
            await self._send_json(request, 200, _models_body())
            return
        if route == "/v1/echo" or route.startswith("/v1/echo/"):
            await self._play_echo(request, self._server._reply_for(request))
            return
        api = _ROUTES.get(route) if method == "POST" else None
        if api is None:
            await self._send_json(request, 404, _error_body(_Api.OPENAI, 404, f"no route for {method} {route}"))
            return
        if not isinstance(request.json, dict):
            await self._send_json(request, 400, _error_body(api, 400, "the request body must be a JSON object"))
            return
        try:
            reply = self._server._reply_for(request)
        except Exception:
            logger.exception("fake upstream: choosing a reply failed")
            await self._send_json(request, 500, _error_body(api, 500, "the fake upstream's replies callable failed"))
            return
        await self._play(api, request, request.json, reply)

    async def _play(self, api: _Api, request: RecordedRequest, body: dict[str, object], reply: Reply) -> None:
        """Run one `Reply` script: delays, then an error, a raw body, a JSON body or a stream."""
        await _sleep(reply.headers_delay)
        prefix = _assistant_prefix(body)
        if prefix is not None and (reply.refuse_continuation or reply.continues):
            rest = _continued(reply.tokens, prefix) if reply.continues else None
            if rest is None:
                message = (
                    "This model does not support assistant message prefill"
                    if reply.refuse_continuation
                    else f"the assistant message {prefix[:40]!r} does not begin this reply"
                )
                await self._send_json(request, 400, _error_body(api, 400, message), reply.headers)
                return
            reply = dataclasses.replace(reply, tokens=rest)
        if reply.raw_body is not None:
            await self._play_raw(request, reply, reply.raw_body)
        elif not 200 <= reply.status <= 299:
            error = _error_body(api, reply.status, reply.error_message)
            await self._send_json(request, reply.status, error, reply.headers)
        else:
            model = body.get("model")
            if not isinstance(model, str):
                model = _DEFAULT_MODEL
            number = self._server._next_response_number()
            if api is _Api.EMBEDDINGS:
                await _sleep(reply.ttft)
                await self._send_json(request, 200, _embeddings(body, model, reply), reply.headers)
            elif body.get("stream") is True:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self._play_stream(api, request, reply, model, number, include_usage=include_usage)
            else:
                await self._play_complete(api, request, reply, model, number)

    async def _play_echo(self, request: RecordedRequest, reply: Reply) -> None:
        """The echo route: the body back as it came, or the reply's tokens as bare `data:` events."""
        await _sleep(reply.headers_delay)
        echo = [("x-echo-method", request.method), ("x-echo-target", request.path)]
        if "text/event-stream" not in request.headers.get("accept", ""):
            content_type = request.headers.get("content-type", "application/octet-stream")
            headers = [("content-type", content_type), ("content-length", str(len(request.body))), *echo]
            head = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
            await self._send_last(request, head, h11.Data(data=request.body))
            return
        frames = [_Frame(b"data: " + token.encode() + b"\n\n", token=True) for token in reply.tokens]
        await self._send_frames(request, reply, [("content-type", "text/event-stream"), *echo], frames, b"")

    async def _play_raw(self, request: RecordedRequest, reply: Reply, raw_body: bytes) -> None:
        await self._send_head(reply.status, _merge_headers(_SSE_HEADERS, reply.headers))
        await _sleep(reply.ttft)
        await self._send_data(raw_body)
        if reply.reset_after is not None:
            raise _ResetError
        if reply.stall_after is not None:
            await trio.sleep_forever()
        await self._finish(request)

    async def _play_complete(self, api: _Api, request: RecordedRequest, reply: Reply, model: str, number: int) -> None:
        await _sleep(reply.ttft)
        if reply.reset_after is not None:
            raise _ResetError
        if reply.stall_after is not None:
            await trio.sleep_forever()
        if reply.error_after is not None:
            await self._send_json(request, 500, _error_body(api, 500, reply.error_message), reply.headers)
            return
        complete = {
            _Api.OPENAI: _openai_completion,
            _Api.ANTHROPIC: _anthropic_message,
            _Api.RESPONSES: _response,
            _Api.COMPLETIONS: _text_completion,
        }[api]
        await self._send_json(request, 200, complete(reply, model, number), reply.headers)

    async def _play_stream(
        self, api: _Api, request: RecordedRequest, reply: Reply, model: str, number: int, *, include_usage: bool
    ) -> None:
        if api is _Api.OPENAI:
            frames = _openai_frames(reply, model, number, include_usage=include_usage)
            error_frame = _openai_stream_error(reply.error_message)
        elif api is _Api.COMPLETIONS:
            frames = _text_completion_frames(reply, model, number, include_usage=include_usage)
            error_frame = _openai_stream_error(reply.error_message)
        elif api is _Api.RESPONSES:
            frames = _responses_frames(reply, model, number)
            error_frame = _responses_stream_error(reply.error_message, len(frames))
        else:
            frames = _anthropic_frames(reply, model, number)
            error_frame = _anthropic_stream_error(reply.error_message)
        await self._send_frames(request, reply, list(_SSE_HEADERS), frames, error_frame)

    async def _send_frames(
        self,
        request: RecordedRequest,
        reply: Reply,
        headers: list[tuple[str, str]],
        frames: list[_Frame],
        error_frame: bytes,
    ) -> None:
        """A stream's frames, timed and faulted as `reply` says."""
        await self._send_head(reply.status, _merge_headers(headers, reply.headers))
        await _sleep(reply.ttft)
        sent = 0
        for frame in frames:
            if sent == reply.reset_after:
                raise _ResetError
            if sent == reply.stall_after:
                await trio.sleep_forever()
            if sent == reply.error_after:
                await self._send_data(error_frame)
                break
            if frame.token:
                if sent:
                    await _sleep(reply.interval)
                # Count before the write, for the reason given in `_send_last`.
                request.tokens_sent = sent + 1
                try:
                    await self._send_data(frame.data)
                except _ClientGoneError:
                    request.tokens_sent = sent
                    raise
                sent += 1
            else:
                await self._send_data(frame.data)
        await self._finish(request)

    async def _reject(self, rejection: _Rejection) -> None:
        """Best effort: answer an unparseable request with an error status before closing."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = orjson.dumps(_error_body(_Api.OPENAI, rejection.status, rejection.message))
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
        head = h11.Response(status_code=rejection.status, headers=headers, reason=_reason(rejection.status))
        with contextlib.suppress(_ClientGoneError):
            await self._send(head, h11.Data(data=body), h11.EndOfMessage())

    # -- writing ---------------------------------------------------------------------------------

    async def _send(self, *events: h11.Event) -> None:
        """Write h11 events as one `send_all`, at once. A failed send means the client is gone."""
        data = b"".join(self._h11.send(event) or b"" for event in events)
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGoneError from exc

    async def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))

    async def _send_data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def _send_last(self, request: RecordedRequest, *events: h11.Event) -> None:
        """Write the events that end the response (the last is `EndOfMessage`) and mark it `completed`."""
        # Set before the write: the bytes reach the kernel before `send_all` yields, so a
        # client that has read the whole response may look before this task resumes.
        request.completed = True
        try:
            await self._send(*events, h11.EndOfMessage())
        except _ClientGoneError:
            request.completed = False
            raise

    async def _finish(self, request: RecordedRequest) -> None:
        await self._send_last(request)

    async def _send_json(
        self,
        request: RecordedRequest,
        status: int,
        payload: object,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """A complete JSON response, head and body in one write."""
        body = orjson.dumps(payload)
        base = [("content-type", "application/json"), ("content-length", str(len(body)))]
        headers = _merge_headers(base, extra_headers or {})
        head = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        await self._send_last(request, head, h11.Data(data=body))


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)


# --------------------------------------------------------------------------------------------
# Sans-IO rendering of the two APIs


class _Api(Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    RESPONSES = "responses"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


_ROUTES: Final[Mapping[str, _Api]] = {
    "/v1/chat/completions": _Api.OPENAI,
    "/chat/completions": _Api.OPENAI,
    "/v1/messages": _Api.ANTHROPIC,
    "/v1/responses": _Api.RESPONSES,
    "/responses": _Api.RESPONSES,
    "/v1/completions": _Api.COMPLETIONS,
    "/completions": _Api.COMPLETIONS,
    "/v1/embeddings": _Api.EMBEDDINGS,
    "/embeddings": _Api.EMBEDDINGS,
    # Answered with a `Reply`'s `raw_body` (their JSON), or else as `/v1/responses` is.
    "/v1/responses/input_tokens": _Api.RESPONSES,
    "/v1/responses/compact": _Api.RESPONSES,
}

_SSE_HEADERS: Final = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))

_ANTHROPIC_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_STOP_REASONS: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
}


@dataclass(frozen=True)
class _Frame:
    """One write of a stream. A token frame counts toward `tokens_sent` and the `*_after` faults."""

    data: bytes
    token: bool = False


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Overloaded" if status == 529 else b""


def _merge_headers(base: Sequence[tuple[str, str]], extra: Mapping[str, str]) -> list[tuple[str, str]]:
    """`base` headers, with any of the same (case-insensitive) name replaced by `extra`."""
    overridden = {name.lower() for name in extra}
    return [(name, value) for name, value in base if name not in overridden] + list(extra.items())


def _fragments(text: str) -> list[str]:
    """Split a tool call's argument text into up to `TOOL_ARGUMENT_FRAGMENTS` pieces."""
    if not text:
        return []
    size = -(-len(text) // TOOL_ARGUMENT_FRAGMENTS)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _assistant_prefix(body: dict[str, object]) -> str | None:
    """The text of the request's final assistant message, if it ends with one (to be continued)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content if isinstance(content, str) else None


def _continued(tokens: Sequence[str], prefix: str) -> list[str] | None:
    """
    What follows `prefix` in the joined `tokens`, from the token `prefix` ends in; None if
    they do not start with it.
    """
    if not "".join(tokens).startswith(prefix):
        return None
    rest: list[str] = []
    at = 0
    for token in tokens:
        end = at + len(token)
        if end > len(prefix):
            rest.append(token[max(len(prefix) - at, 0) :])
        at = end
    return rest


def _finish_reason(reply: Reply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _usage(reply: Reply) -> tuple[int, int]:
    prompt, completion = reply.usage
    return prompt, completion or len(reply.tokens)


def _openai_usage(reply: Reply) -> dict[str, object]:
    prompt, completion = _usage(reply)
    usage: dict[str, object] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reply.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
    return usage


def _anthropic_input(reply: Reply) -> dict[str, int]:
    """The input part of an Anthropic usage: uncached input, and what was read from the cache."""
    prompt, _ = _usage(reply)
    if not reply.cached_tokens:
        return {"input_tokens": prompt}
    return {"input_tokens": prompt - reply.cached_tokens, "cache_read_input_tokens": reply.cached_tokens}


def _error_body(api: _Api, status: int, message: str) -> dict[str, object]:
    if api is _Api.ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _models_body() -> dict[str, object]:
    return {
        "object": "list",
        "data": [{"id": _DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "trioproxy-testing"}],
    }


def _data_line(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _openai_frames(
    reply: Reply, model: str, number: int, *, include_usage: bool, created: int | None = None
) -> list[_Frame]:
    """The `chat.completion.chunk` stream of sse_protocol.md §4.3, one frame per event (`created`: now)."""
    chat_id = f"chatcmpl-fake{number}"
    created = int(time.time()) if created is None else created

    def chunk(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        payload: dict[str, object] = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return _data_line(payload)

    frames = [_Frame(chunk({"role": "assistant", "content": ""}))]
    frames += [_Frame(chunk({"content": token}), token=True) for token in reply.tokens]
    for index, call in enumerate(reply.tool_calls):
        opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        frames.append(_Frame(chunk({"tool_calls": [opening]})))
        frames += [
            _Frame(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}), token=True)
            for piece in _fragments(call.arguments)
        ]
    frames.append(_Frame(chunk({}, _finish_reason(reply))))
    if include_usage:
        usage_chunk = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
            "choices": [],
            "usage": _openai_usage(reply),
        }
        frames.append(_Frame(_data_line(usage_chunk)))
    if not reply.omit_done:
        frames.append(_Frame(b"data: [DONE]\n\n"))
    return frames


def _openai_stream_error(message: str) -> bytes:
    return _data_line({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def _responses_frames(reply: Reply, model: str, number: int, *, created: int | None = None) -> list[_Frame]:
    """
    An OpenAI Responses stream (`responses_protocol.md` §2.5, §2.6): a message item with the
    text tokens, then a function_call item per tool call, then `response.completed` (or
    `response.incomplete` for the finish reasons `length` and `content_filter`); `created`:
    its `created_at` (now).
    """
    events: list[tuple[dict[str, object], bool]] = []
    output: list[dict[str, object]] = []

    def add(payload: dict[str, object], *, token: bool = False) -> None:
        events.append((payload, token))

    response = _response(reply, model, number, status="in_progress", created=created)
    add({"type": "response.created", "response": response})
    add({"type": "response.in_progress", "response": response})
    if reply.tokens:
        item_id, text = f"msg_fake{number}", "".join(reply.tokens)
        where = {"item_id": item_id, "output_index": len(output)}
        message = {"id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
        add({"type": "response.output_item.added", "output_index": len(output), "item": message})
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        add({"type": "response.content_part.added", **where, "content_index": 0, "part": part})
        for token in reply.tokens:
            add(
                {"type": "response.output_text.delta", **where, "content_index": 0, "delta": token, "logprobs": []},
                token=True,
            )
        add({"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []})
        add({"type": "response.content_part.done", **where, "content_index": 0, "part": {**part, "text": text}})
        done = _response_output(reply, number)[0]
        add({"type": "response.output_item.done", "output_index": len(output), "item": done})
        output.append(done)
    for call, done in zip(reply.tool_calls, _response_output(reply, number)[len(output) :], strict=True):
        where = {"item_id": done["id"], "output_index": len(output)}
        add(
            {
                "type": "response.output_item.added",
                "output_index": len(output),
                "item": {**done, "status": "in_progress", "arguments": ""},
            }
        )
        for piece in _fragments(call.arguments):
            add({"type": "response.function_call_arguments.delta", **where, "delta": piece}, token=True)
        add({"type": "response.function_call_arguments.done", **where, "arguments": call.arguments})
        add({"type": "response.output_item.done", "output_index": len(output), "item": done})
        output.append(done)
    final = _response(reply, model, number, created=created)
    if not reply.omit_done:
        add({"type": f"response.{final['status']}", "response": final})
    return [
        _Frame(
            b"event: "
            + str(payload["type"]).encode()
            + b"\ndata: "
            + orjson.dumps({**payload, "sequence_number": i})
            + b"\n\n",
            token=token,
        )
        for i, (payload, token) in enumerate(events)
    ]


def _response_output(reply: Reply, number: int) -> list[dict[str, object]]:
    """The output items of a finished response: the message (if any text), then each function call."""
    output: list[dict[str, object]] = []
    if reply.tokens:
        text = {"type": "output_text", "annotations": [], "logprobs": [], "text": "".join(reply.tokens)}
        output.append(
            {
                "id": f"msg_fake{number}",
                "type": "message",
                "status": "completed",
                "content": [text],
                "role": "assistant",
            }
        )
    output += [
        {
            "id": f"fc_fake{number}_{i}",
            "type": "function_call",
            "status": "completed",
            "arguments": call.arguments,
            "call_id": call.id,
            "name": call.name,
        }
        for i, call in enumerate(reply.tool_calls)
    ]
    return output


def _response(
    reply: Reply, model: str, number: int, *, status: str | None = None, created: int | None = None
) -> dict[str, object]:
    """A Response object: in progress (empty), or finished with its output and usage (`created`: now)."""
    prompt, completion = _usage(reply)
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(_finish_reason(reply))
    finished = status is None
    return {
        "id": f"resp_fake{number}",
        "object": "response",
        "created_at": int(time.time()) if created is None else created,
        "status": status or ("incomplete" if reason else "completed"),
        "error": None,
        "incomplete_details": {"reason": reason} if finished and reason else None,
        "model": model,
        "output": _response_output(reply, number) if finished else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        if finished
        else None,
    }


def _responses_stream_error(message: str, sequence_number: int) -> bytes:
    """OpenAI's in-stream failure: a nested `error` event, then `response.failed` (§2.7)."""
    error = {"type": "server_error", "code": "server_error", "message": message, "param": None}
    failed = {
        "id": "resp_failed",
        "object": "response",
        "status": "failed",
        "output": [],
        "error": {"code": "server_error", "message": message},
    }
    return (
        b"event: error\ndata: "
        + orjson.dumps({"type": "error", "sequence_number": sequence_number, "error": error})
        + b"\n\n"
        b"event: response.failed\ndata: "
        + orjson.dumps({"type": "response.failed", "sequence_number": sequence_number + 1, "response": failed})
        + b"\n\n"
    )


def _openai_completion(reply: Reply, model: str, number: int) -> dict[str, object]:
    message: dict[str, object] = {
        "role": "assistant",
        "content": "".join(reply.tokens) if reply.tokens else None,
        "refusal": None,
    }
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(reply)}],
        "usage": _openai_usage(reply),
    }


def _text_completion_chunk(
    completion_id: str, created: int, model: str, choices: list[dict[str, object]], usage: object = None
) -> dict[str, object]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }


def _text_completion_frames(reply: Reply, model: str, number: int, *, include_usage: bool) -> list[_Frame]:
    """A legacy completions stream: one `text_completion` chunk per token, as OpenAI and vLLM send it."""
    completion_id, created = f"cmpl-fake{number}", int(time.time())

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return _data_line(_text_completion_chunk(completion_id, created, model, [choice]))

    frames = [_Frame(chunk(token), token=True) for token in reply.tokens]
    frames.append(_Frame(chunk("", _finish_reason(reply))))
    if include_usage:
        prompt, completion = _usage(reply)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        frames.append(_Frame(_data_line(_text_completion_chunk(completion_id, created, model, [], usage))))
    if not reply.omit_done:
        frames.append(_Frame(b"data: [DONE]\n\n"))
    return frames


def _text_completion(reply: Reply, model: str, number: int) -> dict[str, object]:
    prompt, completion = _usage(reply)
    choice = {"index": 0, "text": "".join(reply.tokens), "logprobs": None, "finish_reason": _finish_reason(reply)}
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return _text_completion_chunk(f"cmpl-fake{number}", int(time.time()), model, [choice], usage)


def _embeddings(body: dict[str, object], model: str, reply: Reply) -> dict[str, object]:
    """One vector per input, `[len(input), index, 0.5]`; base64 little-endian float32s when asked."""
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, item in enumerate(inputs):
        vector = [float(len(item) if isinstance(item, (str, list)) else 0), float(index), 0.5]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt = reply.usage[0]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def _event(payload: dict[str, object], *, token: bool = False) -> _Frame:
    """An Anthropic event: the SSE event name always equals the data's `type`."""
    return _Frame(b"event: " + str(payload["type"]).encode() + b"\n" + _data_line(payload), token=token)


def _anthropic_frames(reply: Reply, model: str, number: int) -> list[_Frame]:
    """The Messages stream of sse_protocol.md §5.1-5.2, one frame per event."""
    _, completion = _usage(reply)
    frames = [
        _event(
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_fake{number}",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**_anthropic_input(reply), "output_tokens": 1},
                },
            }
        )
    ]
    ping = _event({"type": "ping"})
    pinged = False

    def open_block(index: int, block: dict[str, object]) -> None:
        nonlocal pinged
        frames.append(_event({"type": "content_block_start", "index": index, "content_block": block}))
        if not pinged:  # where the recorded stream has it: right after the first block start
            frames.append(ping)
            pinged = True

    def delta(index: int, body: dict[str, object], *, token: bool) -> _Frame:
        return _event({"type": "content_block_delta", "index": index, "delta": body}, token=token)

    index = 0
    if reply.tokens:
        open_block(index, {"type": "text", "text": ""})
        frames += [delta(index, {"type": "text_delta", "text": token}, token=True) for token in reply.tokens]
        frames.append(_event({"type": "content_block_stop", "index": index}))
        index += 1
    for call in reply.tool_calls:
        open_block(index, {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        frames.append(delta(index, {"type": "input_json_delta", "partial_json": ""}, token=False))
        frames += [
            delta(index, {"type": "input_json_delta", "partial_json": piece}, token=True)
            for piece in _fragments(call.arguments)
        ]
        frames.append(_event({"type": "content_block_stop", "index": index}))
        index += 1
    if not pinged:
        frames.append(ping)
    finish = _finish_reason(reply)
    frames.append(
        _event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _ANTHROPIC_STOP_REASONS.get(finish, finish), "stop_sequence": None},
                "usage": {"output_tokens": completion},
            }
        )
    )
    if not reply.omit_done:
        frames.append(_event({"type": "message_stop"}))
    return frames


def _anthropic_stream_error(message: str) -> bytes:
    return _event({"type": "error", "error": {"type": "overloaded_error", "message": message}}).data


def _anthropic_message(reply: Reply, model: str, number: int) -> dict[str, object]:
    _, completion = _usage(reply)
    content: list[dict[str, object]] = []
    if reply.tokens:
        content.append({"type": "text", "text": "".join(reply.tokens)})
    for call in reply.tool_calls:
        try:
            arguments: Any = orjson.loads(call.arguments) if call.arguments else {}
        except orjson.JSONDecodeError:
            arguments = call.arguments  # keep malformed arguments visible rather than hide them
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    finish = _finish_reason(reply)
    return {
        "id": f"msg_fake{number}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _ANTHROPIC_STOP_REASONS.get(finish, finish),
        "stop_sequence": None,
        "usage": {**_anthropic_input(reply), "output_tokens": completion},
    }
