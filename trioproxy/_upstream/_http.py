"""
`HttpUpstream`: one translation over one pooled httpx client, the only code in trioproxy that
sends a request through httpx. It keeps the streamed response open inside the caller's task,
so cancelling the session unwinds into the `finally` that closes it: the response and its
connection close and the upstream sees the client leave at once.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
import trio

from .._events import OPENED
from .._exceptions import UpstreamProtocolError
from .._forwarding import ForwardRequest, ForwardSink
from .._request import ChatRequest
from .._sse import SSEDecoder
from ..pipeline._items import RetryNotice, Sink
from ..providers._base import Translation, UpstreamRequest
from ._errors import mapped_httpx_errors
from ._pool import PooledTransport

__all__ = ["END_OF_BODY_GRACE", "MAX_ANSWER_BYTES", "MAX_ERROR_BODY", "MAX_TRAILING_BYTES", "HttpUpstream"]

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
        self._pool: PooledTransport | None = None
        if transport is None and not urllib.request.getproxies():
            transport = self._pool = PooledTransport(limits)
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
        with mapped_httpx_errors():
            outgoing = self._client.build_request("POST", url, headers=headers, content=request.body)
            async with self._streamed(outgoing) as resp:
                await self._raise_for_status(resp)
                await send.send(OPENED)
                encoded = resp.headers.get("content-encoding", "identity") != "identity"
                chunks = resp.aiter_bytes() if encoded else aiter(resp.stream)  # type: ignore[arg-type]
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

    @contextlib.asynccontextmanager
    async def _streamed(self, request: httpx.Request) -> AsyncIterator[httpx.Response]:
        """
        `request`'s response, open for streaming. On our pool it is sent to the transport
        directly: a request the client built whole needs none of the client's `send` (auth,
        redirects, cookies, event hooks, the response's wrapping), 3% of a stream's
        function calls in the upstream layer.
        """
        if self._pool is None:
            response = await self._client.send(request, stream=True)
        else:
            response = await self._pool.handle_async_request(request)
            response.request = request
        try:
            yield response
        finally:
            await response.aclose()

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
        # As the client sent them: a value the server read as Latin-1 goes up as the same bytes
        # (httpx would encode a `str` as ASCII, and fail on any other character).
        headers = httpx.Headers(self.translation.forward_headers(request.headers), encoding="latin-1")
        with mapped_httpx_errors():
            async with self._client.stream(request.method, url, headers=headers, content=request.body) as resp:
                await sink.head(resp.status_code, resp.headers.multi_items())
                async for data in resp.aiter_raw():  # as it came: a compressed body stays compressed
                    await sink.body(data)

    async def _exchange(self, request: UpstreamRequest) -> bytes:
        """A request whose answer is one JSON document: that document, or the error the upstream answered."""
        with mapped_httpx_errors():
            async with self._client.stream("POST", request.url, headers=request.headers, content=request.body) as resp:
                await self._raise_for_status(resp)
                return await _read_answer(resp)

    async def _raise_for_status(self, resp: httpx.Response) -> None:
        """Raise the error an answer of status 300 or more tells (its body read up to `MAX_ERROR_BODY`)."""
        if resp.status_code >= 300:
            body = await _read_bounded(resp)
            raise self.translation.error_from_response(resp.status_code, resp.headers, body)

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
        except (httpx.TransportError, httpx.DecodingError):
            pass  # the connection is closed, not pooled: the stream itself ended well (a corrupt compressed end too)


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
