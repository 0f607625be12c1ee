"""
The upstream layer: the one place that does upstream I/O.

`HttpUpstream` runs any translation over one pooled `httpx.AsyncClient` (the only code in
trioproxy that touches httpx); `SimulatedUpstream` plays a simulated script on trio's clock.
Both push the same items into a channel: `OPENED` once the upstream has accepted the request,
then `Delta`s, and they raise a `TrioproxyError` when the upstream fails.

Cancellation is the point of the design: `stream()` keeps `client.stream(...)` open inside
the caller's task, so cancelling the request's session unwinds into httpx's `finally`, which
closes the response and its connection — the upstream sees the client leave at once.

Under the client sits `_PooledTransport`, an httpx transport over httpcore's own HTTP/1.1
connections: a keep-alive pool whose cost per request does not grow with its size, and a trio
network stream that reads without a cancel scope of its own when there is no read timeout
(trioproxy's watchdog is the read timeout). httpx's own transport is kept where it does more
than ours: when the environment names a proxy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final, Protocol, cast

import httpcore
import httpx
import trio

from ._config import ProviderConfig, TargetConfig
from ._events import OPENED
from ._exceptions import (
    NotFoundError,
    RequestError,
    TrioproxyError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from ._forwarding import ForwardRequest, ForwardSink
from ._policy import failure_kind
from ._request import ChatRequest
from ._sse import SSEDecodeError, SSEDecoder
from ._targets import Breakers, BreakerState, LocalBreakers, Target, Verdict, choose
from .pipeline._items import RetryNotice, Sink
from .providers._base import Translation, UpstreamRequest
from .providers.anthropic import AnthropicTranslation
from .providers.openai import OpenAITranslation
from .providers.responses import ResponsesTranslation
from .providers.simulated import SimulatedSettings, Stall, script

__all__ = ["BalancedUpstream", "HttpUpstream", "SimulatedUpstream", "Upstream", "build_upstream"]

logger = logging.getLogger("trioproxy.upstream")

MAX_ERROR_BODY: Final = 64 * 1024
"""How much of an upstream's error body (or other short JSON answer) we read: enough for any, bounded."""

END_OF_BODY_GRACE: Final = 0.1
"""
Seconds we wait, after the stream's end marker, for the end of the HTTP body. Only a response
read to its end leaves its connection in the pool; one closed early costs the next request a
new connection (and, to a real upstream, a TLS handshake). Servers end the body right after
the marker, so this bounds only a misbehaving one, and with it how long the client's own end
of stream may wait.
"""

MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
"""
The longest answer read whole (an embeddings answer, a token count): the largest OpenAI
embeddings answer, 2048 inputs of 3072 dimensions in base64 (what the SDKs ask for), is
about 34 MB.
"""

MAX_TRAILING_BYTES: Final = 64 * 1024
"""How much an upstream may send after its end marker before we stop reading and close."""

IDLE_SWEEP_INTERVAL: Final = 1.0
"""
Seconds between two looks of a pool at its idle connections: how long, at most, an idle
connection outlives its keep-alive expiry, or stays half-closed (CLOSE-WAIT) after its
upstream closed it.
"""


class Upstream(Protocol):
    async def stream(self, chat: ChatRequest, send: Sink) -> None:
        """Send `OPENED`, then every delta of the generation; raise `TrioproxyError` on failure."""
        ...

    async def count_tokens(self, chat: ChatRequest) -> bytes | None:
        """
        The upstream's own answer (JSON) to "how many input tokens is `chat`", `None` when it
        cannot say; raise `TrioproxyError` on failure.
        """
        ...

    async def forward(self, request: ForwardRequest, sink: ForwardSink) -> None:
        """
        Send a request the proxy does not serve itself, as it is, and hand its answer to
        `sink` as it comes, whatever its status; raise `TrioproxyError` only when there is none.
        """
        ...

    async def compact(self, chat: ChatRequest) -> bytes | None:
        """
        The upstream's own compaction (JSON) of `chat`'s conversation (OpenAI Responses'
        `/responses/compact`), `None` when it has none; raise `TrioproxyError` on failure.
        """
        ...

    async def aclose(self) -> None: ...


class HttpUpstream:
    def __init__(
        self,
        translation: Translation,
        *,
        name: str = "",
        skip_malformed_events: bool = False,
        connect_timeout: float = 10.0,
        max_connections: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.translation = translation
        self.name = name
        """The provider's name, for the notices it sends."""
        self.skip_malformed_events = skip_malformed_events
        """An event the translation cannot read is passed over (with a notice), not the end of the stream."""
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._pool: _PooledTransport | None = None
        if transport is None and not urllib.request.getproxies():
            transport = self._pool = _PooledTransport(limits)
        self._urls: dict[str, httpx.URL] = {}
        """Each translation's URLs, parsed once (the config bounds them)."""
        self._client = _CookielessClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout),
            limits=limits,  # for httpx's own transport; ours is handed them above
            transport=transport,
            # A compressed event stream only delays tokens; asking for none also lets us read raw bytes.
            headers={"accept-encoding": "identity"},
        )

    async def stream(self, chat: ChatRequest, send: Sink) -> None:
        request = self.translation.stream_request(chat)
        if request.answer is not None:
            answer = await self._exchange(request)
            await send.send(OPENED)
            await send.send(request.answer(answer))
            return
        parser = self.translation.stream_parser(chat)
        decoder = SSEDecoder()
        url = self._urls.get(request.url) or self._urls.setdefault(request.url, httpx.URL(request.url))
        headers = request.headers if chat.trace is None else chat.trace.headers(request.headers)
        with _mapped_httpx_errors():
            async with self._client.stream("POST", url, headers=headers, content=request.body) as resp:
                if resp.status_code >= 300:
                    body = await _read_bounded(resp)
                    raise self.translation.error_from_response(resp.status_code, resp.headers, body)
                await send.send(OPENED)
                encoded = resp.headers.get("content-encoding", "identity") != "identity"
                chunks = resp.aiter_bytes() if encoded else resp.aiter_raw()
                async for data in chunks:
                    for event in decoder.feed(data):
                        try:
                            deltas = parser.feed(event)
                        except UpstreamProtocolError as exc:
                            if not self.skip_malformed_events:
                                raise
                            await send.send(_skipped(exc, self.name, chat))
                            continue
                        for delta in deltas:
                            await send.send(delta)
                    if parser.finished:
                        await _read_to_end(chunks)
                        return
                for delta in parser.end():
                    await send.send(delta)

    async def expire_idle_connections(self) -> None:
        """Expire idle connections on the pool's own timer until `aclose`; httpx's pool (behind a proxy) has none."""
        if self._pool is not None:
            await self._pool.expire_idle_connections()

    async def count_tokens(self, chat: ChatRequest) -> bytes | None:
        return await self._answer(self.translation.count_tokens_request(chat))

    async def compact(self, chat: ChatRequest) -> bytes | None:
        return await self._answer(self.translation.compact_request(chat))

    async def _answer(self, request: UpstreamRequest | None) -> bytes | None:
        """The JSON body the upstream answers a non-streaming `request` with; `None` for no request."""
        if request is None:
            return None
        return await self._exchange(request)

    async def forward(self, request: ForwardRequest, sink: ForwardSink) -> None:
        url = self.translation.forward_url(request.target)
        headers = self.translation.forward_headers(request.headers)
        with _mapped_httpx_errors():
            async with self._client.stream(request.method, url, headers=headers, content=request.body) as resp:
                await sink.head(resp.status_code, resp.headers.multi_items())
                async for data in resp.aiter_raw():  # as it came: a compressed body stays compressed
                    await sink.body(data)

    async def _exchange(self, request: UpstreamRequest) -> bytes:
        """A request whose answer is one JSON document: that document, or the error the upstream answered."""
        with _mapped_httpx_errors():
            async with self._client.stream("POST", request.url, headers=request.headers, content=request.body) as resp:
                if resp.status_code >= 300:
                    body = await _read_bounded(resp)
                    raise self.translation.error_from_response(resp.status_code, resp.headers, body)
                return await _read_answer(resp)

    async def aclose(self) -> None:
        await self._client.aclose()


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES: Final = _NoCookies()


class _CookielessClient(httpx.AsyncClient):
    """
    An httpx client that keeps no cookie from the upstream's responses. One jar for the whole
    proxy would carry a cookie set in answer to one client's request into every other client's
    requests; and httpx's jar costs every response a trip through `http.cookiejar`.
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("the upstream client keeps no cookies")


class _PooledTransport(httpx.AsyncBaseTransport):
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
        self._backend = _TrioBackend()
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
                    with _mapped_httpcore_errors():
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
    """A response body on a pooled connection; closing it gives the connection back."""

    def __init__(
        self,
        stream: _AsyncBody,
        pool: _PooledTransport,
        connection: httpcore.AsyncHTTPConnection,
        origin: httpcore.Origin,
    ) -> None:
        self._stream = stream
        self._pool: _PooledTransport | None = pool
        self._connection = connection
        self._origin = origin

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_httpcore_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Closing does no network I/O (an unfinished response just closes its socket, an
        # expired idle one too), so the shield cannot hang; without it a cancelled close
        # could leak the socket or the pool's slot.
        with trio.CancelScope(shield=True):
            try:
                with _mapped_httpcore_errors():
                    await self._stream.aclose()
            finally:
                await pool.release(self._connection, self._origin)


class _TrioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, with streams that read without a cancel scope of their own."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                stream = await trio.open_tcp_stream(host, port, local_address=local_address)  # TCP_NODELAY is on
        except trio.TooSlowError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            stream.setsockopt(*option)
        return _TrioStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("trioproxy reaches upstreams over TCP only")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


async def _read_when_readable(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Up to `max_bytes` from non-blocking `sock` once it is readable; `b""` at its end."""
    while True:
        try:
            await trio.lowlevel.wait_readable(sock)
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            continue  # woken, but another reader was first
        except (OSError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc


class _TrioStream(httpcore.AsyncNetworkStream):
    """
    A trio stream (TCP or TLS) as httpcore's network stream.

    httpcore's own opens a cancel scope and an exception-mapping context for every read, even
    with no read timeout, which is always our case: trioproxy's watchdog bounds the silence.
    Here a read without a timeout from a plain TCP socket waits until the socket is readable
    and reads it: a token arrives long after the previous read, so waiting first spares the
    failed attempt, and the stream wrapper's checks and its extra trip through the scheduler
    (CPU per stream −3% at 200 streams).
    """

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if timeout is None and isinstance(self._stream, trio.SocketStream):
            return await _read_when_readable(self._stream.socket, max_bytes)
        try:
            if timeout is None:
                data = await self._stream.receive_some(max_bytes)
            else:
                with trio.fail_after(timeout):
                    data = await self._stream.receive_some(max_bytes)
        except trio.TooSlowError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc
        return data if isinstance(data, bytes) else bytes(data)  # trio types TLS reads `bytes | bytearray`

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await self._stream.send_all(buffer)
        except trio.TooSlowError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        if not isinstance(self._stream, trio.SocketStream):
            raise httpcore.UnsupportedProtocol("TLS inside TLS (an HTTPS proxy) is not supported")
        ssl_stream = trio.SSLStream(
            self._stream, ssl_context=ssl_context, server_hostname=server_hostname, https_compatible=True
        )
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await ssl_stream.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(self._stream)
            if isinstance(exc, trio.TooSlowError):
                raise httpcore.ConnectTimeout(str(exc)) from exc
            if isinstance(exc, trio.BrokenResourceError):
                raise httpcore.ConnectError(str(exc)) from exc
            raise
        return _TrioStream(ssl_stream)

    def get_extra_info(self, info: str) -> Any:
        socket_stream = self._socket_stream()
        if info == "is_readable":
            return socket_stream.socket.is_readable()
        if info == "socket":
            return socket_stream.socket
        if info == "client_addr":
            return socket_stream.socket.getsockname()
        if info == "server_addr":
            return socket_stream.socket.getpeername()
        return None  # "ssl_object": None, so httpcore never assumes an HTTP/2 upstream

    def _socket_stream(self) -> trio.SocketStream:
        stream = self._stream
        return stream.transport_stream if isinstance(stream, trio.SSLStream) else stream


class SimulatedUpstream:
    """
    Plays `providers.simulated.script()` in real (or mock) time, making each step only when
    it is due. Every step is a checkpoint, a zero delay included: a script with no delays
    still lets the other tasks run between its tokens.
    """

    def __init__(self, settings: SimulatedSettings) -> None:
        self.settings = settings

    async def stream(self, chat: ChatRequest, send: Sink) -> None:
        settings = self.settings
        overrides = chat.common_body().get("simulate")
        if overrides is not None:
            if not isinstance(overrides, dict):
                raise RequestError("'simulate' must be an object", param="simulate")
            settings = settings.overridden(overrides, where="simulate")
        opened = False
        for delay, step in script(chat, settings):
            await trio.sleep(delay)
            if isinstance(step, TrioproxyError):
                raise step
            if not opened:
                await send.send(OPENED)
                opened = True
            if isinstance(step, Stall):
                await trio.sleep_forever()
            await send.send(step)

    async def count_tokens(self, chat: ChatRequest) -> None:
        return None  # a script has no tokenizer

    async def forward(self, request: ForwardRequest, sink: ForwardSink) -> None:
        raise NotFoundError("a simulated provider has no other paths to forward to")  # the config gives it none

    async def compact(self, chat: ChatRequest) -> None:
        return None

    async def aclose(self) -> None:
        pass


class BalancedUpstream:
    """
    A provider's targets (replicas), each an `HttpUpstream` with its own pool, behind a circuit
    breaker (`_targets`, its state in `breakers`): a request goes to the available target with
    the fewest outstanding requests per weight; when none is available it fails at once, as no
    connection (the reader fails over without a connect timeout spent). A failure that says
    the target is unwell (no connection, a broken one, a 5xx) counts against it; a change of
    its breaker is told to the request that caused it (a `breaker` notice) and counted in
    `transitions`.
    """

    def __init__(self, name: str, targets: list[tuple[str, float, HttpUpstream]], breakers: Breakers) -> None:
        self.name = name
        self.targets = [Target(url, breakers, weight) for url, weight, _ in targets]
        self._upstreams = {url: upstream for url, _, upstream in targets}
        self._breakers = breakers
        self.transitions: dict[tuple[str, BreakerState], int] = {}
        """How many times each target's breaker went to each state."""
        self._turn = 0

    async def stream(self, chat: ChatRequest, send: Sink) -> None:
        model = chat.upstream_model or chat.model

        async def tell(reason: str) -> None:
            await send.send(RetryNotice("breaker", 0, self.name, model, 0.0, reason))

        async def attempt(url: str, upstream: HttpUpstream) -> None:
            if chat.trace is not None:
                chat.trace.target(url)
            await upstream.stream(chat, send)

        await self._balanced(attempt, tell)

    async def forward(self, request: ForwardRequest, sink: ForwardSink) -> None:
        """
        Forwarded to a target taken as a stream's is; its answer's 5xx counts against it as a
        stream's failure does.
        """
        status = _StatusSeen(sink)  # a forwarded answer has no notices: the log and the metrics tell of the breaker
        await self._balanced(lambda _url, upstream: upstream.forward(request, status), None, status)

    async def _balanced(
        self,
        attempt: Callable[[str, HttpUpstream], Awaitable[None]],
        tell: Callable[[str], Awaitable[None]] | None,
        status: _StatusSeen | None = None,
    ) -> None:
        """
        `attempt` on the target whose turn it is (given its url and upstream), and again on the
        next while no connection could be made; its outcome (with a forwarded answer's `status`)
        judges the target, and a change of its breaker is counted, logged and, given `tell`, told
        to the request.
        """
        tried: list[Target] = []
        taken = await self._take(tried)
        if taken is None:
            raise UpstreamConnectError(
                f"every target of provider {self.name!r} is skipped for now: its circuit breaker is open"
            )
        while True:
            target, probe = taken
            try:
                await attempt(target.url, self._upstreams[target.url])
            except UpstreamError as exc:
                kind = failure_kind(exc)
                if kind not in _TARGET_FAULTS:
                    await self._settle(target, "released", probe)
                    raise
                change = await self._settle(target, "failed", probe)
                await self._judged(target, change, f": {exc.message}", tell)
                tried.append(target)
                if kind == "connect":
                    taken = await self._take(tried)
                    if taken is not None:
                        continue  # nothing was sent: another target takes the request at once
                raise
            except BaseException:
                await self._settle(target, "released", probe)
                raise
            if status is not None and status.code >= 500:
                change = await self._settle(target, "failed", probe)
                why = f": status {status.code}"
            else:
                change, why = await self._settle(target, "succeeded", probe), ""
            await self._judged(target, change, why, tell)
            return

    async def count_tokens(self, chat: ChatRequest) -> bytes | None:
        return await self._ask_one(lambda upstream: upstream.count_tokens(chat))

    async def compact(self, chat: ChatRequest) -> bytes | None:
        return await self._ask_one(lambda upstream: upstream.compact(chat))

    async def _ask_one(self, ask: Callable[[HttpUpstream], Awaitable[bytes | None]]) -> bytes | None:
        """A question other than a generation, to one target: no failover, the breaker not told."""
        taken = await self._take([])
        if taken is None:
            raise UpstreamConnectError(
                f"every target of provider {self.name!r} is skipped for now: its circuit breaker is open"
            )
        target, probe = taken
        try:
            return await ask(self._upstreams[target.url])
        finally:
            await self._settle(target, "released", probe)

    async def _take(self, tried: list[Target]) -> tuple[Target, bool] | None:
        """
        A target not tried yet, its request counted (`_targets.choose`), starting from the next
        in turn: equals take requests in turn.
        """
        self._turn = (self._turn + 1) % len(self.targets)
        rotated = self.targets[self._turn :] + self.targets[: self._turn]
        return await choose([target for target in rotated if target not in tried], trio.current_time())

    async def _settle(self, target: Target, verdict: Verdict, probe: bool) -> BreakerState | None:
        """
        Its request ended: no longer outstanding, and its verdict told to the breaker, shielded
        (a cancelled request frees the probe it held too).
        """
        target.outstanding -= 1
        with trio.CancelScope(shield=True):
            state = await self._breakers.settle(target.url, verdict, probe=probe, now=trio.current_time())
        return state

    async def _judged(
        self, target: Target, state: BreakerState | None, why: str, tell: Callable[[str], Awaitable[None]] | None
    ) -> None:
        """A change of a target's breaker (`state`, if any), counted, logged, and told to the request that caused it."""
        if state is None:
            return
        key = (target.url, state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        logger.warning("circuit breaker of %s target %s: %s%s", self.name, target.url, state, why)
        if tell is not None:
            await tell(f"the circuit breaker of {target.url} is {state.replace('_', '-')}{why}")

    async def expire_idle_connections(self) -> None:
        async with trio.open_nursery() as nursery:
            for upstream in self._upstreams.values():
                nursery.start_soon(upstream.expire_idle_connections)

    async def aclose(self) -> None:
        async with trio.open_nursery() as nursery:
            for upstream in self._upstreams.values():
                nursery.start_soon(upstream.aclose)


_TARGET_FAULTS: Final = frozenset({"connect", "connection_broken", "server_error"})
"""Failures that say the target itself is unwell, and count against its breaker."""


class _StatusSeen:
    """A forwarded answer's sink that keeps the answer's status, for the target's breaker."""

    def __init__(self, sink: ForwardSink) -> None:
        self._sink = sink
        self.code = 0

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.code = status
        await self._sink.head(status, headers)

    async def body(self, data: bytes) -> None:
        await self._sink.body(data)


def build_upstream(provider: ProviderConfig) -> Upstream:
    """The upstream a `[providers.NAME]` table describes: its targets, balanced and circuit-broken."""
    if provider.type == "simulated":
        return SimulatedUpstream(provider.simulated)
    targets = provider.targets or (TargetConfig(provider.base_url),)
    return BalancedUpstream(
        provider.name,
        [(target.base_url, target.weight, _http_upstream(provider, target.base_url)) for target in targets],
        LocalBreakers(provider.breaker),
    )


def _http_upstream(provider: ProviderConfig, base_url: str) -> HttpUpstream:
    translation: Translation
    if provider.type == "openai":
        translation = OpenAITranslation(
            base_url=base_url,
            api_key=provider.api_key,
            extra_headers=provider.headers,
            request_usage=provider.request_usage,
        )
    elif provider.type == "openai_responses":
        translation = ResponsesTranslation(base_url=base_url, api_key=provider.api_key, extra_headers=provider.headers)
    elif provider.type == "anthropic":
        translation = AnthropicTranslation(
            base_url=base_url,
            api_key=provider.api_key,
            version=provider.anthropic_version,
            default_max_tokens=provider.default_max_tokens,
            extra_headers=provider.headers,
        )
    else:  # the config loader admits no other type
        raise ValueError(f"unknown provider type {provider.type!r}")
    return HttpUpstream(
        translation,
        name=provider.name,
        skip_malformed_events=provider.skip_malformed_events,
        connect_timeout=provider.connect_timeout,
        max_connections=provider.max_connections,
    )


def _skipped(error: UpstreamProtocolError, provider: str, chat: ChatRequest) -> RetryNotice:
    return RetryNotice(
        kind="skipped_event",
        attempt=0,
        provider=provider,
        model=chat.upstream_model or chat.model,
        delay=0.0,
        reason=error.message,
        error=error,
    )


async def _read_to_end(chunks: AsyncIterator[bytes]) -> None:
    """
    Read what follows the end marker (normally nothing but the body's end), so that httpx
    returns the connection to the pool; bounded in time and size, else the connection closes.

    The stream is already complete, so nothing here may fail it: the wait is shielded from the
    watchdog and the session (the grace bounds it), and a connection that breaks now only
    means it is not reused.
    """
    trailing = 0
    with trio.move_on_after(END_OF_BODY_GRACE, shield=True):
        try:
            async for data in chunks:
                trailing += len(data)
                if trailing > MAX_TRAILING_BYTES:
                    break
        except httpx.TransportError:
            pass  # the connection is closed, not pooled: the stream itself ended well


async def _read_answer(resp: httpx.Response) -> bytes:
    """A whole answer, up to `MAX_ANSWER_BYTES`: a longer one is refused, never cut short."""
    body = bytearray()
    async for data in resp.aiter_bytes():
        body += data
        if len(body) > MAX_ANSWER_BYTES:
            raise UpstreamProtocolError(f"the upstream's answer is longer than {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


async def _read_bounded(resp: httpx.Response) -> bytes:
    body = bytearray()
    async for data in resp.aiter_bytes():
        body += data
        if len(body) >= MAX_ERROR_BODY:
            break
    return bytes(body[:MAX_ERROR_BODY])


@contextlib.contextmanager
def _mapped_httpx_errors() -> Iterator[None]:
    """
    httpx's exceptions become ours here, once (as httpx maps httpcore's). A connection that
    cannot be made and one that breaks once made are different failures (a down upstream, a
    crashed or cut one), counted apart in the metrics.
    """
    try:
        yield
    except httpx.TimeoutException as exc:
        kind = {
            httpx.ConnectTimeout: "connect_timeout",
            httpx.PoolTimeout: "pool_timeout",
            httpx.ReadTimeout: "read_timeout",
            httpx.WriteTimeout: "write_timeout",
        }.get(type(exc), "timeout")
        raise UpstreamTimeoutError(f"upstream {kind.replace('_', ' ')}", kind=kind) from exc
    except httpx.ConnectError as exc:
        raise UpstreamConnectError(f"cannot connect to the upstream: {_reason(exc)}") from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError) as exc:
        raise UpstreamBrokenError(f"the upstream connection broke: {_reason(exc)}") from exc
    except httpx.DecodingError as exc:
        raise UpstreamProtocolError(f"the upstream's body could not be decoded: {_reason(exc)}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream request failed: {_reason(exc)}") from exc
    except SSEDecodeError as exc:
        raise UpstreamProtocolError(f"the upstream's event stream is malformed: {exc}") from exc


_HTTPCORE_ERRORS: Final[dict[type[Exception], type[httpx.HTTPError]]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
}
"""httpcore's errors and the httpx errors they become, most specific first (as httpx maps them)."""


@contextlib.contextmanager
def _mapped_httpcore_errors() -> Iterator[None]:
    """Inside the transport, httpcore's errors become httpx's, which `_mapped_httpx_errors` knows."""
    try:
        yield
    except httpcore.ConnectionNotAvailable:
        raise
    except Exception as exc:
        for core, mapped in _HTTPCORE_ERRORS.items():
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
