"""
The upstream layer: the one place that does upstream I/O.

`HttpUpstream` runs any translation over one pooled `httpx.AsyncClient` (the only code in
trioproxy that touches httpx); `SimulatedUpstream` plays a simulated script on trio's clock.
Both push the same items into a channel: `OPENED` once the upstream has accepted the request,
then `Delta`s, and they raise a `TrioproxyError` when the upstream fails.

Cancellation is the point of the design: `stream()` keeps `client.stream(...)` open inside
the caller's task, so cancelling the request's session unwinds into httpx's `finally`, which
closes the response and its connection — the upstream sees the client leave at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final, Protocol

import httpx
import trio

from ._config import ProviderConfig
from ._events import OPENED, Delta, Opened
from ._exceptions import (
    RequestError,
    TrioproxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from ._request import ChatRequest
from ._sse import SSEDecodeError, SSEDecoder
from .providers._base import Translation
from .providers.anthropic import AnthropicTranslation
from .providers.openai import OpenAITranslation
from .providers.simulated import SimulatedSettings, Stall, script

__all__ = ["HttpUpstream", "ItemSink", "SimulatedUpstream", "Upstream", "UpstreamItem", "build_upstream"]

UpstreamItem = Opened | Delta

MAX_ERROR_BODY: Final = 64 * 1024
"""How much of an upstream's error body we read: enough for any error JSON, bounded."""


class ItemSink(Protocol):
    """Where an upstream puts its items (a channel, or the pipeline's next stage)."""

    async def send(self, item: UpstreamItem, /) -> None: ...


class Upstream(Protocol):
    async def stream(self, chat: ChatRequest, send: ItemSink) -> None:
        """Send `OPENED`, then every delta of the generation; raise `TrioproxyError` on failure."""
        ...

    async def aclose(self) -> None: ...


class HttpUpstream:
    def __init__(
        self,
        translation: Translation,
        *,
        connect_timeout: float = 10.0,
        max_connections: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.translation = translation
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            # A compressed event stream only delays tokens; asking for none also lets us read raw bytes.
            headers={"accept-encoding": "identity"},
        )

    async def stream(self, chat: ChatRequest, send: ItemSink) -> None:
        request = self.translation.stream_request(chat)
        parser = self.translation.stream_parser()
        decoder = SSEDecoder()
        with _mapped_httpx_errors():
            async with self._client.stream("POST", request.url, headers=request.headers, content=request.body) as resp:
                if resp.status_code >= 300:
                    body = await _read_bounded(resp)
                    raise self.translation.error_from_response(resp.status_code, resp.headers, body)
                await send.send(OPENED)
                encoded = resp.headers.get("content-encoding", "identity") != "identity"
                async for data in resp.aiter_bytes() if encoded else resp.aiter_raw():
                    for event in decoder.feed(data):
                        for delta in parser.feed(event):
                            await send.send(delta)
                    if parser.finished:
                        return
        if not parser.finished:
            raise UpstreamProtocolError("the upstream closed the stream before its end marker")

    async def aclose(self) -> None:
        await self._client.aclose()


class SimulatedUpstream:
    """Plays `providers.simulated.script()` in real (or mock) time."""

    def __init__(self, settings: SimulatedSettings) -> None:
        self.settings = settings

    async def stream(self, chat: ChatRequest, send: ItemSink) -> None:
        settings = self.settings
        overrides = chat.body.get("simulate")
        if overrides is not None:
            if not isinstance(overrides, dict):
                raise RequestError("'simulate' must be an object", param="simulate")
            settings = settings.overridden(overrides, where="simulate")
        opened = False
        for delay, step in script(chat, settings):
            if delay > 0:
                await trio.sleep(delay)
            if isinstance(step, TrioproxyError):
                raise step
            if not opened:
                await send.send(OPENED)
                opened = True
            if isinstance(step, Stall):
                await trio.sleep_forever()
            await send.send(step)

    async def aclose(self) -> None:
        pass


def build_upstream(provider: ProviderConfig) -> Upstream:
    """The upstream a `[providers.NAME]` table describes."""
    translation: Translation
    if provider.type == "simulated":
        return SimulatedUpstream(provider.simulated)
    if provider.type == "openai":
        translation = OpenAITranslation(
            base_url=provider.base_url,
            api_key=provider.api_key,
            extra_headers=provider.headers,
            request_usage=provider.request_usage,
        )
    elif provider.type == "anthropic":
        translation = AnthropicTranslation(
            base_url=provider.base_url,
            api_key=provider.api_key,
            version=provider.anthropic_version,
            default_max_tokens=provider.default_max_tokens,
            extra_headers=provider.headers,
        )
    else:  # the config loader admits no other type
        raise ValueError(f"unknown provider type {provider.type!r}")
    return HttpUpstream(translation, connect_timeout=provider.connect_timeout, max_connections=provider.max_connections)


async def _read_bounded(resp: httpx.Response) -> bytes:
    body = bytearray()
    async for data in resp.aiter_bytes():
        body += data
        if len(body) >= MAX_ERROR_BODY:
            break
    return bytes(body[:MAX_ERROR_BODY])


@contextlib.contextmanager
def _mapped_httpx_errors() -> Iterator[None]:
    """httpx's exceptions become ours here, once (as httpx maps httpcore's)."""
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
        raise UpstreamConnectError(f"the upstream connection broke: {_reason(exc)}") from exc
    except httpx.DecodingError as exc:
        raise UpstreamProtocolError(f"the upstream's body could not be decoded: {_reason(exc)}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream request failed: {_reason(exc)}") from exc
    except SSEDecodeError as exc:
        raise UpstreamProtocolError(f"the upstream's event stream is malformed: {exc}") from exc


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
