"""
Forwarding the requests the proxy does not serve itself: which provider takes a path, and
which headers cross, each way (`server/fronts/forwarding.py` does the rest).

A path is forwarded only to a provider that lists one of its prefixes in `forward_paths`: an
operator decides what the gateway exposes. The client's credentials never reach the upstream
(the provider's own are added by its translation), and neither do the headers that describe
one hop of the connection rather than the request (RFC 9110 §7.6.1).

Sans-IO.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:  # the config module loads the pipeline, and with it trio
    from ._config import ProviderConfig

__all__ = ["ForwardRequest", "ForwardSink", "allows", "provider_for_path", "request_headers", "response_headers"]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers of one connection, not of the request (and any that `Connection` names)."""

CLIENT_CREDENTIALS: Final = frozenset({"authorization", "x-api-key", "api-key", "cookie"})
"""What proves who the client is to the proxy: never the upstream's business."""

FRAMING: Final = frozenset({"host", "content-length"})
"""Set again for the upstream's own connection and for the body as it is sent."""


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """
    A client's request, to forward: `target` its path under `/v1/` with its query, as the
    client sent them; `headers` the client's that may go upstream; `body` whole or streamed.
    """

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes | AsyncIterable[bytes]


class ForwardSink(Protocol):
    """Where a forwarded request's answer goes: its head once, then each piece of its body as it comes."""

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    async def body(self, data: bytes) -> None: ...


def allows(prefixes: Iterable[str], path: str) -> bool:
    """Whether `path` is one of `prefixes` or under one (`/v1/files` allows `/v1/files/f-1`, not `/v1/filesX`)."""
    return _longest(prefixes, path) > 0


def provider_for_path(providers: Iterable[ProviderConfig], path: str) -> ProviderConfig | None:
    """The provider with the longest prefix that allows `path`; of two with the same, the first in the config."""
    best, best_length = None, 0
    for provider in providers:
        length = _longest(provider.forward_paths, path)
        if length > best_length:
            best, best_length = provider, length
    return best


def _longest(prefixes: Iterable[str], path: str) -> int:
    """The length of the longest of `prefixes` that allows `path`; 0 if none does."""
    return max((len(prefix) for prefix in prefixes if path == prefix or path.startswith(prefix + "/")), default=0)


def request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client's headers that may go upstream, names lower-cased (repeated ones joined)."""
    return _joined(headers, HOP_BY_HOP | CLIENT_CREDENTIALS | FRAMING)


def response_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """
    The upstream's headers that may go to the client: not its hop-by-hop ones, nor its length
    (the proxy frames the body it relays), nor its cookies (the proxy keeps none for anyone).
    """
    return _joined(headers, HOP_BY_HOP | FRAMING | {"set-cookie"})


def _joined(headers: Iterable[tuple[str, str]], dropped: frozenset[str]) -> dict[str, str]:
    pairs: Sequence[tuple[str, str]] = [(name.lower(), value) for name, value in headers]
    named = {token.strip().lower() for name, value in pairs if name == "connection" for token in value.split(",")}
    kept: dict[str, str] = {}
    for name, value in pairs:
        if name not in dropped and name not in named:
            kept[name] = f"{kept[name]}, {value}" if name in kept else value
    return kept
