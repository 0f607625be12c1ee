"""trioproxy: a streaming reverse proxy for LLM APIs, built on trio."""

from ._config import Config, ProviderConfig, ServerConfig, load_config, parse_config
from ._events import Delta, EventType, StreamEvent, ToolCallDelta, Usage
from ._exceptions import (
    ConfigError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestError,
    ShuttingDownError,
    StreamCancelled,
    StreamInterrupted,
    TrioproxyError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from ._router import Route, Router
from ._sse import ServerSentEvent, SSEDecodeError, SSEDecoder, encode_comment, encode_event
from ._version import __version__
from .server import create_app, serve

__all__ = [
    "Config",
    "ConfigError",
    "Delta",
    "EventType",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ProviderConfig",
    "RateLimitedError",
    "RequestError",
    "Route",
    "Router",
    "SSEDecodeError",
    "SSEDecoder",
    "ServerConfig",
    "ServerSentEvent",
    "ShuttingDownError",
    "StreamCancelled",
    "StreamEvent",
    "StreamInterrupted",
    "ToolCallDelta",
    "TrioproxyError",
    "UpstreamBrokenError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "Usage",
    "__version__",
    "create_app",
    "encode_comment",
    "encode_event",
    "load_config",
    "parse_config",
    "serve",
]
