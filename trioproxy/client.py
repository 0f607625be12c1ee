"""
Python clients for trioproxy (and any OpenAI-compatible server), built on the project's own
spec-conformant SSE decoder rather than the SDKs' lenient ones.

This is the client-side httpx edge: httpx's exceptions are mapped to trioproxy's here.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import httpx
import orjson
import trio
import trio_websocket

from ._events import StreamEvent
from ._exceptions import (
    RequestError,
    TrioproxyError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from ._sse import ServerSentEvent, SSEDecodeError, SSEDecoder

__all__ = ["ChatResult", "SSEClient", "WebSocketClient", "WebSocketStream", "stream_chat_completion"]


@dataclass(frozen=True, slots=True)
class ChatResult:
    text: str
    ttft: float | None
    """Seconds from sending the request to the first content."""
    duration: float
    chunks: int
    finish_reason: str | None
    usage: dict[str, Any] | None


async def stream_chat_completion(
    base_url: str,
    *,
    model: str,
    messages: Sequence[dict[str, Any]],
    on_text: Callable[[str], None],
    api_key: str | None = None,
    max_tokens: int | None = None,
    read_timeout: float = 300.0,
) -> ChatResult:
    """
    Stream `POST {base_url}/v1/chat/completions`, calling `on_text` with each piece of text
    as it arrives. Raises a `TrioproxyError` for an error status, an in-stream error, a broken
    connection or a stream that ends without `[DONE]`. `read_timeout` bounds the wait for
    each piece of the response (httpx's read timeout).
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/v1/chat/completions"

    collected = _ChatCollector(on_text)
    decoder = SSEDecoder()
    try:
        with _mapped_httpx_errors(url):
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(read_timeout, connect=10.0)) as client,
                client.stream("POST", url, headers=headers, content=orjson.dumps(body)) as response,
            ):
                if response.status_code != 200:
                    raise _status_error(response.status_code, await response.aread())
                async for data in response.aiter_bytes():
                    for event in decoder.feed(data):
                        if event.data.startswith("[DONE]"):
                            return collected.result()
                        chunk = orjson.loads(event.data)
                        if "error" in chunk:
                            raise _status_error(502, event.data.encode())
                        collected.add(chunk)
    except (SSEDecodeError, orjson.JSONDecodeError) as exc:
        raise UpstreamProtocolError(f"malformed stream from {url}: {exc}") from exc
    raise UpstreamProtocolError("the stream ended without [DONE]: the answer may be incomplete")


class _ChatCollector:
    """What a Chat Completions stream has said so far, each piece of text passed on to `on_text`."""

    def __init__(self, on_text: Callable[[str], None]) -> None:
        self.on_text = on_text
        self.started = time.perf_counter()
        self.ttft: float | None = None
        self.parts: list[str] = []
        self.chunks = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            text = (choice.get("delta") or {}).get("content")
            if text:
                if self.ttft is None:
                    self.ttft = time.perf_counter() - self.started
                self.chunks += 1
                self.parts.append(text)
                self.on_text(text)

    def result(self) -> ChatResult:
        duration = time.perf_counter() - self.started
        return ChatResult("".join(self.parts), self.ttft, duration, self.chunks, self.finish_reason, self.usage)


@contextlib.contextmanager
def _mapped_httpx_errors(url: str) -> Iterator[None]:
    """httpx's exceptions become ours here, once (as `trioproxy._upstream` maps them on the server's side)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamConnectError(f"timed out talking to {url}: {exc or type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamConnectError(f"lost the connection to {url}: {exc or type(exc).__name__}") from exc


def _status_error(status: int, body: bytes) -> TrioproxyError:
    try:
        error = orjson.loads(body).get("error") or {}
        message = error.get("message") or body.decode("utf-8", "replace")
    except (orjson.JSONDecodeError, AttributeError):
        message = body.decode("utf-8", "replace")
    return UpstreamStatusError(message[:500], status=status)


WS_STREAM_QUEUE_SIZE: Final = 64
"""Events one stream may hold before the connection's reader waits for its consumer."""
WS_CLOSE_TIMEOUT: Final = 1.0
"""Seconds closing the WebSocket, or telling the server a stream was abandoned, may take."""


class WebSocketClient:
    """
    A client of trioproxy's WebSocket endpoints (`/v1/chat/ws`, `/v1/stream/ws/{client_id}`):
    many concurrent streams over one connection.

    ```python
    async with WebSocketClient.connect("ws://127.0.0.1:8000/v1/chat/ws") as client:
        async for event in client.stream({"model": "sim/echo", "messages": [...]}):
            ...
    ```

    One reader task (in the nursery `connect` owns) dispatches the server's messages by `id`
    to one bounded channel per stream; a stream only reads its channel, so no async generator
    here yields inside a nursery or a cancel scope. A stream yields the server's events up to
    and including its `done` or `error` event. If the connection breaks (or is closed) first,
    every waiting stream raises `UpstreamConnectError` — never a hang.
    """

    def __init__(self, url: str, connection: trio_websocket.WebSocketConnection) -> None:
        self.url = url
        self._ws = connection
        self._streams: dict[str, trio.MemorySendChannel[StreamEvent]] = {}
        self._ids = itertools.count(1)
        self._error: TrioproxyError | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, *, connect_timeout: float = 10.0) -> AsyncIterator[WebSocketClient]:
        """Open a connection to `url` (`ws://…/v1/chat/ws`); it is closed when the block ends."""
        # Nothing may raise inside the nursery: the block's own exception and a failure to
        # connect leave unwrapped, never inside an exception group (as trio-websocket does).
        async with _unwrapped_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    connection = await trio_websocket.connect_websocket_url(nursery, url)
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                raise UpstreamConnectError(f"cannot open a WebSocket to {url}: {exc or type(exc).__name__}") from exc
            client = cls(url, connection)
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                await client.close()

    async def close(self) -> None:
        """Close the connection; streams still running raise `UpstreamConnectError`."""
        self._fail(UpstreamConnectError(f"the WebSocket to {self.url} was closed by the client"))
        with trio.move_on_after(WS_CLOSE_TIMEOUT, shield=True):
            await self._ws.aclose()

    def stream(self, request: dict[str, Any]) -> WebSocketStream:
        """
        Start a stream for `request` (the generic body: `model`, `messages`, …) when iterated.
        Its `id` is `request["id"]` or one made up here; `cancel(stream.id)` stops it.
        """
        request_id = str(request.get("id") or f"ws-{next(self._ids)}")
        return WebSocketStream(self, {**request, "id": request_id})

    async def cancel(self, request_id: str) -> None:
        """Ask the server to stop a stream; it then ends with an `error` event of type `cancelled`."""
        await self._send({"type": "cancel", "id": request_id})

    async def _send(self, message: dict[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        try:
            await self._ws.send_message(orjson.dumps(message).decode())
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed(exc) from exc

    def _open(self, request_id: str) -> trio.MemoryReceiveChannel[StreamEvent]:
        if self._error is not None:
            raise self._error
        if request_id in self._streams:
            raise RequestError(f"stream {request_id!r} is already running on this connection", param="id")
        send, receive = trio.open_memory_channel[StreamEvent](WS_STREAM_QUEUE_SIZE)
        self._streams[request_id] = send
        return receive

    def _forget(self, request_id: str) -> None:
        channel = self._streams.pop(request_id, None)
        if channel is not None:
            channel.close()

    async def _read(self) -> None:
        """The reader task: every message to its stream, until the connection ends."""
        try:
            while True:
                message = await self._ws.get_message()
                try:
                    obj = orjson.loads(message)
                    event = StreamEvent.from_dict(obj)
                except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as exc:
                    self._fail(UpstreamProtocolError(f"malformed message from {self.url}: {exc}"))
                    return
                request_id = obj.get("id")
                channel = self._streams.get(str(request_id)) if request_id is not None else None
                if channel is None:
                    continue  # a stream its consumer left, or an error about no stream
                with contextlib.suppress(trio.BrokenResourceError):  # its consumer stopped iterating
                    await channel.send(event)
                if event.type in ("done", "error"):
                    self._forget(str(request_id))
        except trio_websocket.ConnectionClosed as exc:
            self._fail(self._closed(exc))

    def _closed(self, exc: trio_websocket.ConnectionClosed) -> TrioproxyError:
        if self._error is not None:
            return self._error
        reason = exc.reason
        detail = f"{reason.code} {reason.name}" if reason else "no close frame"
        return UpstreamConnectError(f"the WebSocket to {self.url} closed mid-stream ({detail})")

    def _fail(self, error: TrioproxyError) -> None:
        """The connection is over: every stream still waiting ends with `error`."""
        if self._error is None:
            self._error = error
        for request_id in list(self._streams):
            self._forget(request_id)


class WebSocketStream:
    """One stream of a `WebSocketClient`: iterate it (once) for its `StreamEvent`s."""

    def __init__(self, client: WebSocketClient, request: dict[str, Any]) -> None:
        self.client = client
        self.request = request
        self.id: str = request["id"]

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        receive = self.client._open(self.id)
        finished = False
        try:
            await self.client._send(self.request)
            async for event in receive:
                yield event
                if event.type in ("done", "error"):
                    finished = True
                    return
            raise self.client._error or UpstreamProtocolError("the stream ended without a done or error event")
        finally:
            receive.close()
            self.client._forget(self.id)
            if not finished and self.client._error is None:
                # The consumer left early: stop the server's work too (best effort).
                # If the connection is already gone, the server has dropped the stream itself.
                with trio.move_on_after(WS_CLOSE_TIMEOUT, shield=True), contextlib.suppress(TrioproxyError):
                    await self.client.cancel(self.id)


# --------------------------------------------------------------------------------------------
# SSEClient (issue 4)

SSE_CLIENT_QUEUE_SIZE: Final = 64
"""Events the reader task may hold before it waits for the consumer."""


class SSEClient:
    """
    A client of trioproxy's generic SSE endpoints: `POST` a request (`json=`) to
    `/v1/chat/stream` or `/v1/stream/sse`, or `GET` a stream (`/v1/streams/{id}`), and read
    its `StreamEvent`s (each with its SSE `id`) up to and including `done` or `error`.

    ```python
    async with SSEClient(url + "/v1/chat/stream", json={"model": "sim/echo", "messages": [...]}) as events:
        async for event in events:
            ...
    ```

    If the connection drops (or goes silent for `timeout` s) before the stream ended, and the
    server said the stream is resumable (`x-stream-id`, or `stream_id` in `stream_start`),
    the client reconnects to `GET /v1/streams/{id}` with `Last-Event-ID`, at most
    `max_reconnects` times in a row, waiting `backoff` s doubled each time (up to
    `max_backoff`): the events continue with no gap and no duplicate, and the upstream is not
    asked again. A first request that fails is never repeated (that would start a second
    generation).

    A reader task, in the nursery this context owns, feeds a bounded channel; iteration only
    reads that channel, so nothing here yields inside a nursery or a cancel scope. Failures
    surface as `TrioproxyError`s when iterating (`UpstreamStatusError` for an error status,
    `UpstreamConnectError` for a connection that cannot be resumed, `UpstreamProtocolError`
    for a malformed stream or one that ends without `done`/`error`) — never as an exception
    group.
    """

    def __init__(
        self,
        url: str,
        *,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_reconnects: int = 5,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
    ) -> None:
        self.url = url
        self.json = json
        self.headers = {"accept": "text/event-stream", **(headers or {})}
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.max_reconnects = max_reconnects
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stream_id: str | None = None
        """The server's id of the stream, once known: what makes it resumable."""
        self.last_event_id = ""
        """The id of the last event received (sent back as `Last-Event-ID` on reconnect)."""
        self.reconnects = 0
        """How many times the connection was resumed."""
        self._http = http
        self._error: TrioproxyError | None = None
        self._receive: trio.MemoryReceiveChannel[StreamEvent] | None = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self._running())
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._receive is None:
            raise RuntimeError("use SSEClient as `async with SSEClient(...) as events`")
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._error is not None:
                raise self._error from self._error.__cause__
            raise StopAsyncIteration from None

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if self._http is None:
                self._http = await stack.enter_async_context(httpx.AsyncClient(timeout=self.timeout))
            send, self._receive = trio.open_memory_channel[StreamEvent](SSE_CLIENT_QUEUE_SIZE)
            async with _unwrapped_nursery() as nursery:
                nursery.start_soon(self._reader, send)
                try:
                    yield
                finally:
                    self._receive.close()

    async def _reader(self, send: trio.MemorySendChannel[StreamEvent]) -> None:
        async with send:
            try:
                await self._read_all(send)
            except TrioproxyError as exc:
                self._error = exc
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer left

    def _resume_url(self, stream_id: str) -> str:
        url = httpx.URL(self.url)
        index = url.path.find("/v1/")
        prefix = url.path[:index] if index >= 0 else ""
        return str(url.copy_with(path=f"{prefix}/v1/streams/{stream_id}", query=None))

    def _request_headers(self, method: str) -> dict[str, str]:
        """A resuming GET names the last event seen; the first request, a POST, sends JSON."""
        headers = dict(self.headers)
        if method == "GET" and self.last_event_id:
            headers["last-event-id"] = self.last_event_id
        if method == "POST":
            headers["content-type"] = "application/json"
        return headers

    def _event(self, sse: ServerSentEvent) -> StreamEvent:
        """The event `sse` carries; its id is the one to resume after, and a `metadata` event names the stream."""
        event = StreamEvent.from_json(sse.data, id=sse.id or None)
        self.last_event_id = sse.id
        if event.type == "metadata" and isinstance(event.metadata.get("stream_id"), str):
            self.stream_id = self.stream_id or event.metadata["stream_id"]
        return event

    async def _read_all(self, send: trio.MemorySendChannel[StreamEvent]) -> None:
        assert self._http is not None
        method = "GET" if self.json is None else "POST"
        url = self.url
        failures = 0
        while True:
            content = orjson.dumps(self.json) if method == "POST" else None
            headers = self._request_headers(method)
            try:
                with _mapped_httpx_errors(url):
                    async with self._http.stream(
                        method, url, headers=headers, content=content, timeout=self.timeout
                    ) as response:
                        if response.status_code != 200:
                            raise _event_status_error(response.status_code, await response.aread())
                        self.stream_id = response.headers.get("x-stream-id") or self.stream_id
                        decoder = SSEDecoder()
                        async for data in response.aiter_bytes():
                            for sse in decoder.feed(data):
                                event = self._event(sse)
                                failures = 0
                                await send.send(event)
                                if event.type in ("done", "error"):
                                    return
                failure: TrioproxyError = UpstreamProtocolError(
                    f"the stream from {url} ended without a done or error event"
                )
            except UpstreamConnectError as exc:
                failure = exc
            except (SSEDecodeError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise UpstreamProtocolError(f"malformed stream from {url}: {exc}") from exc
            if self.stream_id is None or failures >= self.max_reconnects:
                raise failure
            await trio.sleep(min(self.max_backoff, self.backoff * 2**failures) if self.backoff else 0)
            failures += 1
            self.reconnects += 1
            method, url = "GET", self._resume_url(self.stream_id)


def _event_status_error(status: int, body: bytes) -> TrioproxyError:
    """An error status from a generic endpoint: its body is one SSE `error` event."""
    try:
        events = SSEDecoder().feed(body)
        data = StreamEvent.from_json(events[0].data).data if events else None
        message = data["message"] if isinstance(data, dict) else body.decode("utf-8", "replace")
    except (SSEDecodeError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        message = body.decode("utf-8", "replace")
    return UpstreamStatusError(str(message)[:500], status=status)


@asynccontextmanager
async def _unwrapped_nursery() -> AsyncIterator[trio.Nursery]:
    """
    A nursery for a client's background task, whose block's own exception leaves as itself
    rather than inside an ExceptionGroup (as trio-websocket does for its users). The
    background tasks are cancelled when the block ends; if one of them failed as well, the
    two errors leave together in a group, so neither is lost.
    """
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:  # re-raised below, outside the nursery: never swallowed
                raised = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # a background task failed too: both errors leave, together
        if raised is None or isinstance(raised, trio.Cancelled):
            raise  # the block was only cancelled, by that failure (or from outside: trio cancels again)
        raise BaseExceptionGroup(group.message, [raised, *group.exceptions]) from None
    if raised is not None:
        raise raised
