"""
`FakeUpstream`: a raw trio TCP server on `127.0.0.1` that answers HTTP/1.1 (through h11,
sans-IO) from `Reply` scripts, records every request, and watches each connection for the
client's close for as long as it is open.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

import h11
import orjson
import trio

from ._script import Reply
from ._wire import (
    DEFAULT_MODEL,
    ROUTES,
    SSE_HEADERS,
    Api,
    Frame,
    anthropic_frames,
    anthropic_message,
    anthropic_stream_error,
    assistant_prefix,
    continued,
    embeddings_body,
    error_body,
    merge_headers,
    models_body,
    openai_completion,
    openai_frames,
    openai_stream_error,
    reason_phrase,
    response_object,
    responses_frames,
    responses_stream_error,
    text_completion,
    text_completion_frames,
)

__all__ = ["FakeUpstream", "LoopbackServer", "RecordedRequest", "ReplySource", "open_fake_upstream"]

# The package's name, as the log records carried when it was one module.
logger = logging.getLogger("trioproxy.testing")

#: Bytes asked of the kernel per read. Request heads are capped separately by h11's own
#: `max_incomplete_event_size` (16 KiB).
MAX_RECEIVE: Final = 64 * 1024
#: A larger request body is answered with 413 and the connection is closed.
MAX_REQUEST_BODY: Final = 8 * 1024 * 1024
#: Bytes a client may pipeline while a response is still in flight. The reader must keep reading
#: during a response (that is how it sees EOF), so this is the cap on what it holds meanwhile.
MAX_PIPELINED: Final = 64 * 1024


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


class LoopbackServer:
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


class FakeUpstream(LoopbackServer):
    """
    A scripted OpenAI/Anthropic upstream on `127.0.0.1`, on a port the kernel picks.

    `replies` is a `Reply` used for every request, a callable that gets each
    `RecordedRequest` and returns its `Reply`, or None (every request gets `Reply()`).
    Replies queued with `push()` take precedence, one per request. `replies` may be set again
    while serving (an upstream that goes down, then comes back): the next request gets the new.

    `port` 0 lets the kernel pick. `max_recorded` keeps only the latest requests in
    `requests` (a long-running benchmark upstream must not grow without bound).
    """

    def __init__(self, replies: ReplySource = None, *, port: int = 0, max_recorded: int | None = None) -> None:
        self.replies = replies
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
        if self.replies is None:
            return Reply()
        if isinstance(self.replies, Reply):
            return self.replies
        reply = self.replies(request)
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
            await self._send_json(request, 200, models_body())
            return
        if route == "/v1/echo" or route.startswith("/v1/echo/"):
            await self._play_echo(request, self._server._reply_for(request))
            return
        api = ROUTES.get(route) if method == "POST" else None
        if api is None:
            await self._send_json(request, 404, error_body(Api.OPENAI, 404, f"no route for {method} {route}"))
            return
        if not isinstance(request.json, dict):
            await self._send_json(request, 400, error_body(api, 400, "the request body must be a JSON object"))
            return
        try:
            reply = self._server._reply_for(request)
        except Exception:
            logger.exception("fake upstream: choosing a reply failed")
            await self._send_json(request, 500, error_body(api, 500, "the fake upstream's replies callable failed"))
            return
        await self._play(api, request, request.json, reply)

    async def _play(self, api: Api, request: RecordedRequest, body: dict[str, Any], reply: Reply) -> None:
        """Run one `Reply` script: delays, then an error, a raw body, a JSON body or a stream."""
        await _sleep(reply.headers_delay)
        prefix = assistant_prefix(body)
        if prefix is not None and (reply.refuse_continuation or reply.continues):
            rest = continued(reply.tokens, prefix) if reply.continues else None
            if rest is None:
                message = (
                    "This model does not support assistant message prefill"
                    if reply.refuse_continuation
                    else f"the assistant message {prefix[:40]!r} does not begin this reply"
                )
                await self._send_json(request, 400, error_body(api, 400, message), reply.headers)
                return
            reply = dataclasses.replace(reply, tokens=rest)
        if reply.raw_body is not None:
            await self._play_raw(request, reply, reply.raw_body)
        elif not 200 <= reply.status <= 299:
            error = error_body(api, reply.status, reply.error_message)
            await self._send_json(request, reply.status, error, reply.headers)
        else:
            model = body.get("model")
            if not isinstance(model, str):
                model = DEFAULT_MODEL
            number = self._server._next_response_number()
            if api is Api.EMBEDDINGS:
                await _sleep(reply.ttft)
                await self._send_json(request, 200, embeddings_body(body, model, reply), reply.headers)
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
            head = h11.Response(status_code=reply.status, headers=headers, reason=reason_phrase(reply.status))
            await self._send_last(request, head, h11.Data(data=request.body))
            return
        frames = [Frame(b"data: " + token.encode() + b"\n\n", token=True) for token in reply.tokens]
        await self._send_frames(request, reply, [("content-type", "text/event-stream"), *echo], frames, b"")

    async def _play_raw(self, request: RecordedRequest, reply: Reply, raw_body: bytes) -> None:
        await self._send_head(reply.status, merge_headers(SSE_HEADERS, reply.headers))
        await _sleep(reply.ttft)
        await self._send_data(raw_body)
        if reply.reset_after is not None:
            raise _ResetError
        if reply.stall_after is not None:
            await trio.sleep_forever()
        await self._finish(request)

    async def _play_complete(self, api: Api, request: RecordedRequest, reply: Reply, model: str, number: int) -> None:
        await _sleep(reply.ttft)
        if reply.reset_after is not None:
            raise _ResetError
        if reply.stall_after is not None:
            await trio.sleep_forever()
        if reply.error_after is not None:
            await self._send_json(request, 500, error_body(api, 500, reply.error_message), reply.headers)
            return
        complete = {
            Api.OPENAI: openai_completion,
            Api.ANTHROPIC: anthropic_message,
            Api.RESPONSES: response_object,
            Api.COMPLETIONS: text_completion,
        }[api]
        await self._send_json(request, 200, complete(reply, model, number), reply.headers)

    async def _play_stream(
        self, api: Api, request: RecordedRequest, reply: Reply, model: str, number: int, *, include_usage: bool
    ) -> None:
        if api is Api.OPENAI:
            frames = openai_frames(reply, model, number, include_usage=include_usage)
            error_frame = openai_stream_error(reply.error_message)
        elif api is Api.COMPLETIONS:
            frames = text_completion_frames(reply, model, number, include_usage=include_usage)
            error_frame = openai_stream_error(reply.error_message)
        elif api is Api.RESPONSES:
            frames = responses_frames(reply, model, number)
            error_frame = responses_stream_error(reply.error_message, len(frames))
        else:
            frames = anthropic_frames(reply, model, number)
            error_frame = anthropic_stream_error(reply.error_message)
        await self._send_frames(request, reply, list(SSE_HEADERS), frames, error_frame)

    async def _send_frames(
        self,
        request: RecordedRequest,
        reply: Reply,
        headers: list[tuple[str, str]],
        frames: list[Frame],
        error_frame: bytes,
    ) -> None:
        """A stream's frames, timed and faulted as `reply` says."""
        await self._send_head(reply.status, merge_headers(headers, reply.headers))
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
        body = orjson.dumps(error_body(Api.OPENAI, rejection.status, rejection.message))
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
        head = h11.Response(status_code=rejection.status, headers=headers, reason=reason_phrase(rejection.status))
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
        await self._send(h11.Response(status_code=status, headers=headers, reason=reason_phrase(status)))

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
        headers = merge_headers(base, extra_headers or {})
        head = h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
        await self._send_last(request, head, h11.Data(data=body))


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)
