"""
The upstream layer: the one place that does upstream I/O.

`HttpUpstream` runs any translation over one pooled `httpx.AsyncClient` (the only code in
trioproxy that touches httpx); `SimulatedUpstream` plays a simulated script on trio's clock;
`BalancedUpstream` spreads a provider's requests over its targets, each an `HttpUpstream`
behind a circuit breaker. They push the same items into a channel: `OPENED` once the upstream
has accepted the request, then `Delta`s, and they raise a `TrioproxyError` when the upstream
fails.

Cancellation is the point of the design: `stream()` keeps its response open inside the
caller's task, so cancelling the request's session unwinds into the `finally` that closes the
response and its connection — the upstream sees the client leave at once.

Under the client sits `PooledTransport`, an httpx transport over httpcore's own HTTP/1.1
connections: a keep-alive pool whose cost per request does not grow with its size, a response
body read from the connection's h11 state and socket in one generator, and a trio network
stream that reads without a cancel scope of its own when there is no read timeout
(trioproxy's watchdog is the read timeout). A stream's request, built by the client, goes to
the pool directly. httpx's own transport is kept where it does more
than ours: when the environment names a proxy.

One job a module: `_http` (HttpUpstream), `_pool` (the keep-alive pool), `_backend` (httpcore
on trio), `_errors` (foreign errors mapped once), `_simulated` (SimulatedUpstream),
`_balanced` (BalancedUpstream); here, the `Upstream` interface and `build_upstream`, which
builds a provider's.
"""

from __future__ import annotations

from typing import Protocol

from .._config import ProviderConfig, TargetConfig
from .._forwarding import ForwardRequest, ForwardSink
from .._redis import RedisState, SharedBreakers
from .._request import ChatRequest
from .._targets import Breakers, LocalBreakers
from ..pipeline._items import Sink
from ..providers._base import Translation
from ..providers.anthropic import AnthropicTranslation
from ..providers.openai import OpenAITranslation
from ..providers.responses import ResponsesTranslation
from ._balanced import BalancedUpstream
from ._http import HttpUpstream
from ._simulated import SimulatedUpstream

__all__ = ["BalancedUpstream", "HttpUpstream", "SimulatedUpstream", "Upstream", "build_upstream"]


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


def build_upstream(provider: ProviderConfig, *, shared: RedisState | None = None) -> Upstream:
    """
    The upstream a `[providers.NAME]` table describes: its targets, balanced and
    circuit-broken; the breakers shared on Redis when `shared` is given (`[redis]`), else this
    process's own.
    """
    if provider.type == "simulated":
        return SimulatedUpstream(provider.simulated)
    targets = provider.targets or (TargetConfig(provider.base_url),)
    breakers: Breakers = (
        LocalBreakers(provider.breaker) if shared is None else SharedBreakers(shared, provider.name, provider.breaker)
    )
    return BalancedUpstream(
        provider.name,
        [(target.base_url, target.weight, _http_upstream(provider, target.base_url)) for target in targets],
        breakers,
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
