"""
Foreign errors mapped once, where they arise: httpcore's to httpx's inside the transport (as
httpx maps them), httpx's (and a malformed event stream) to trioproxy's at `HttpUpstream`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

import h11
import httpcore
import httpx

from .._exceptions import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from .._sse import SSEDecodeError

__all__ = ["mapped_httpcore_errors", "mapped_httpx_errors"]


@contextlib.contextmanager
def mapped_httpx_errors() -> Iterator[None]:
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
    h11.RemoteProtocolError: httpx.RemoteProtocolError,  # the pool's body reader drives h11 itself
    httpcore.ProtocolError: httpx.ProtocolError,
}
"""httpcore's errors and the httpx errors they become, most specific first (as httpx maps them)."""


@contextlib.contextmanager
def mapped_httpcore_errors() -> Iterator[None]:
    """Inside the transport, httpcore's errors become httpx's, which `mapped_httpx_errors` knows."""
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
