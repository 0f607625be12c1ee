"""
trioproxy: a streaming reverse proxy for LLM APIs, built on trio.

The sans-IO names (events, the SSE codec, errors) are imported with the package. The others
(the config, which builds pipeline stages; the router; the server) are imported on first use
(PEP 562), so that importing `trioproxy._sse` or a provider loads neither trio, httpx nor quart.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Final

from ._events import Delta, EventType, StreamEvent, ToolCallDelta, Usage
from ._exceptions import (
    AuthenticationError,
    ConfigError,
    ContextLengthError,
    HTTPRefusal,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
    ReplayGapError,
    RequestError,
    SharedStateError,
    ShuttingDownError,
    StreamCancelled,
    StreamInterrupted,
    StreamsFullError,
    TrioproxyError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    ValidationError,
)
from ._sse import ServerSentEvent, SSEDecodeError, SSEDecoder, encode_comment, encode_event
from ._version import __version__

if TYPE_CHECKING:
    from ._config import Config, ProviderConfig, ServerConfig, load_config, parse_config
    from ._router import Route, Router
    from .server import create_app, serve

__all__ = [
    "AuthenticationError",
    "Config",
    "ConfigError",
    "ContextLengthError",
    "Delta",
    "EventType",
    "HTTPRefusal",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ProviderConfig",
    "RateLimitedError",
    "ReplayGapError",
    "RequestError",
    "Route",
    "Router",
    "SSEDecodeError",
    "SSEDecoder",
    "ServerConfig",
    "ServerSentEvent",
    "SharedStateError",
    "ShuttingDownError",
    "StreamCancelled",
    "StreamEvent",
    "StreamInterrupted",
    "StreamsFullError",
    "ToolCallDelta",
    "TrioproxyError",
    "UpstreamBrokenError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "Usage",
    "ValidationError",
    "__version__",
    "create_app",
    "encode_comment",
    "encode_event",
    "load_config",
    "parse_config",
    "serve",
]

#: The exports imported on first use, and the module of each.
_LAZY: Final = {
    "Config": "._config",
    "ProviderConfig": "._config",
    "ServerConfig": "._config",
    "load_config": "._config",
    "parse_config": "._config",
    "Route": "._router",
    "Router": "._router",
    "create_app": ".server",
    "serve": ".server",
}


def _present(value: object) -> None:
    """Show a class or function as `trioproxy.X` in reprs and tracebacks, where users find it (as httpx does)."""
    if inspect.isclass(value) or inspect.isfunction(value):
        value.__module__ = __name__


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    _present(value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


for _name in __all__:
    if _name not in _LAZY:
        _present(globals()[_name])
del _name
