"""
`PooledTransport`: the httpx transport under `HttpUpstream`, httpcore's HTTP/1.1 connections
in a keep-alive pool whose cost per request does not grow with its size, expired on its own
timer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final, Protocol, cast

import h11
import httpcore
import httpx
import trio
from h11._readers import ChunkedReader

from ._backend import TrioBackend
from ._chunked import ChunkedDecodeError, ChunkedDecoder
from ._errors import mapped_httpcore_errors

__all__ = ["IDLE_SWEEP_INTERVAL", "READ_SIZE", "PooledTransport"]

IDLE_SWEEP_INTERVAL: Final = 1.0
"""
Seconds between two looks of a pool at its idle connections: how long, at most, an idle
connection outlives its keep-alive expiry, or stays half-closed (CLOSE-WAIT) after its
upstream closed it.
"""

READ_SIZE: Final = 64 * 1024
"""The most bytes one read of a response body takes from its socket (httpcore's own figure)."""


class PooledTransport(httpx.AsyncBaseTransport):
    """
    httpx's transport, HTTP/1.1 only, with a keep-alive pool that is O(1) per request.

    httpcore's pool rescans all its connections on every request and every release, and
    quadratically while many are idle: at a few hundred pooled connections that scan costs
    more than the streams. Here a request takes the most recently used idle connection to its
    origin (or opens one), and gives it back when its response is closed; at most
    `max_connections` requests are in flight, and a request waits up to httpx's pool timeout
    for a slot. An idle connection expires after the limits' `keepalive_expiry` (httpx's 5 s
    by default), on trio's clock, or when its server closed it; it is checked before reuse,
    and `expire_idle_connections` closes it even if no request comes.
    """

    def __init__(self, limits: httpx.Limits) -> None:
        assert limits.max_connections is not None
        self._slots = trio.Semaphore(limits.max_connections)
        self._keepalive_expiry = math.inf if limits.keepalive_expiry is None else limits.keepalive_expiry
        self._idle: dict[tuple[bytes, bytes, int], deque[tuple[httpcore.AsyncHTTPConnection, float]]] = {}
        """Each origin's idle connections, with the time each expires, the most recently used last."""
        self._ssl_context = httpx.create_ssl_context()
        self._backend = TrioBackend()
        self._closed = trio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = httpcore.Origin(url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        pool_timeout = request.extensions.get("timeout", {}).get("pool")
        try:
            with trio.fail_after(math.inf if pool_timeout is None else pool_timeout):
                await self._slots.acquire()
        except trio.TooSlowError:
            raise httpx.PoolTimeout("no upstream connection became free within the pool timeout") from None
        try:
            while True:
                connection = await self._idle_connection(origin) or httpcore.AsyncHTTPConnection(
                    origin,
                    ssl_context=self._ssl_context,
                    keepalive_expiry=None,  # the pool expires it, on trio's clock
                    network_backend=self._backend,
                )
                try:
                    with mapped_httpcore_errors():
                        response = await connection.handle_async_request(core_request)
                    break
                except httpcore.ConnectionNotAvailable:
                    continue  # it was no longer usable: the next one, or a new one
        except BaseException:
            self._slots.release()
            raise
        stream = _PooledResponseStream(cast(_AsyncBody, response.stream), self, connection, origin)
        return httpx.Response(response.status, headers=response.headers, stream=stream, extensions=response.extensions)

    async def _idle_connection(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection | None:
        idle = self._idle.get((origin.scheme, origin.host, origin.port))
        now = trio.current_time()
        while idle:
            connection, expiry = idle.pop()
            if _usable(connection, expiry, now):
                return connection
            await connection.aclose()
        return None

    async def release(self, connection: httpcore.AsyncHTTPConnection, origin: httpcore.Origin) -> None:
        """A response is closed: its connection goes back to the pool if it can serve another request."""
        self._slots.release()
        if self._closed.is_set():
            await connection.aclose()  # the pool is gone: nobody would ever close it there
            return
        if not connection.is_idle():
            return
        now = trio.current_time()
        idle = self._idle.setdefault((origin.scheme, origin.host, origin.port), deque())
        idle.append((connection, now + self._keepalive_expiry))
        while len(idle) > 1 and idle[0][1] <= now:  # the longest idle, oldest first
            await idle.popleft()[0].aclose()

    async def expire_idle_connections(self) -> None:
        """
        Until the pool is closed: every `IDLE_SWEEP_INTERVAL`, close the idle connections that
        expired or that their server closed. Without it, an idle connection is only looked at
        when the next request to its origin comes: after a burst, every one of its sockets
        stays open, and half-closed once the upstream gives up on it.
        """
        while not self._closed.is_set():
            with trio.move_on_after(IDLE_SWEEP_INTERVAL):
                await self._closed.wait()
            now = trio.current_time()
            stale = []
            for idle in self._idle.values():  # sorted out at once: the closes below let requests in
                entries = list(idle)
                idle.clear()
                for connection, expiry in entries:
                    if _usable(connection, expiry, now):
                        idle.append((connection, expiry))
                    else:
                        stale.append(connection)
            # Closing does no network I/O; shielded, a cancel cannot leave one open and out of the pool.
            with trio.CancelScope(shield=True):
                for connection in stale:
                    await connection.aclose()

    async def aclose(self) -> None:
        """Close the idle connections now, and each one in use when its response is closed."""
        self._closed.set()
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _ in connections:
                await connection.aclose()


def _usable(connection: httpcore.AsyncHTTPConnection, expiry: float, now: float) -> bool:
    """Whether an idle connection may serve another request: not expired, and not closed by its server."""
    return now < expiry and connection.is_idle() and not connection.has_expired()


class _AsyncBody(AsyncIterable[bytes], Protocol):
    """What an httpcore async connection's response body is (its type says only `Iterable | AsyncIterable`)."""

    async def aclose(self) -> None: ...


class _PooledResponseStream(httpx.AsyncByteStream):
    """
    A response body on a pooled connection; closing it gives the connection back.

    It reads the body itself, from the connection's h11 state and network stream, rather
    than through httpcore's two generators and their trace contexts: one layer from the socket
    to the SSE decoder where there were four (httpx's and httpcore's). A chunked body (a
    stream's) h11 reads only up to a chunk's end with nothing after it buffered, usually the
    head's end or the first chunk's, and `ChunkedDecoder` the rest (h11's event machinery, once
    per token, was 9-10% of the proxy's busy CPU at 200 concurrent streams). h11 is then
    given the body's end, so that it, and so httpcore, sees the response whole: closing goes
    through httpcore's stream as before, and the connection is pooled only when the body was
    read to its end with nothing after it. A malformed body, or one cut short, is httpcore's
    `RemoteProtocolError`, as it was h11's.
    """

    def __init__(
        self,
        stream: _AsyncBody,
        pool: PooledTransport,
        connection: httpcore.AsyncHTTPConnection,
        origin: httpcore.Origin,
    ) -> None:
        self._stream = stream
        self._pool: PooledTransport | None = pool
        self._connection = connection
        self._origin = origin

    async def __aiter__(self) -> AsyncIterator[bytes]:
        http11 = self._stream._connection  # type: ignore[attr-defined]  # httpcore's HTTP/1.1 connection
        state: h11.Connection = http11._h11_state
        network: httpcore.AsyncNetworkStream = http11._network_stream
        chunked = isinstance(state._reader, ChunkedReader)  # h11's framing of this response (h11 0.16's names)
        with mapped_httpcore_errors():
            at_chunk_boundary = chunked and not state.trailing_data[0]  # nothing read past the head
            while not at_chunk_boundary:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    state.receive_data(await network.read(READ_SIZE))  # b"" at its end: h11 tells a cut body
                elif type(event) is h11.Data:
                    yield bytes(event.data)
                    if chunked and event.chunk_end and state.trailing_data[0] == b"\r\n":
                        # It reads the CRLF, finds nothing more, and waits for the next chunk's size.
                        at_chunk_boundary = state.next_event() is h11.NEED_DATA
                elif type(event) is h11.EndOfMessage:
                    return
            decoder = ChunkedDecoder()
            while not decoder.ended:
                try:
                    pieces = decoder.feed(await network.read(READ_SIZE))  # b"" at its end: a cut body
                except ChunkedDecodeError as exc:
                    raise httpcore.RemoteProtocolError(str(exc)) from exc
                for piece in pieces:
                    yield piece
            if not decoder.trailing:  # bytes after it: h11 never sees the end, httpcore closes the connection
                state.receive_data(b"0\r\n\r\n")
                state.next_event()  # h11's EndOfMessage

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Closing does no network I/O (an unfinished response just closes its socket, an
        # expired idle one too), so the shield cannot hang; without it a cancelled close
        # could leak the socket or the pool's slot.
        with trio.CancelScope(shield=True):
            try:
                with mapped_httpcore_errors():
                    await self._stream.aclose()
            finally:
                await pool.release(self._connection, self._origin)
