"""
trioproxy's error tree.

Every failure a client can see is one of these, so the front adapters can render it in the
client's own protocol (OpenAI JSON, Anthropic JSON, a trioproxy `error` event) without knowing
where it came from. Foreign exceptions (httpx, h11, quart) are mapped to these at the edge
that meets them, once.

```
TrioproxyError                 status  type
├── ConfigError                  -      the config file is wrong (start-up only)
├── RequestError                400     invalid_request_error: the client's request is wrong
│   ├── AuthenticationError     401     authentication_error: no valid client key
│   ├── NotFoundError           404     not_found_error: no such stream (or path)
│   │   └── ModelNotFoundError  404     not_found_error: no route for the model
│   ├── ReplayGapError          410     a resumed stream's older events are no longer kept
│   ├── PayloadTooLargeError    413     the request body is over `[limits].max_body_bytes`
│   └── HTTPRefusal             (its)   the HTTP layer refused it (unknown path, wrong method)
├── ValidationError             422     validation_error: a validator stopped the stream
├── StreamCancelled             499     cancelled: the client cancelled a stream (WebSocket `cancel`)
├── RateLimitedError            429     rate_limit_error: this client is over its share (Retry-After)
├── StreamInterrupted           503     server_error: the server ended a stream (shutdown)
│   └── ShuttingDownError       503     server_error: the server is draining (Retry-After)
├── OverloadedError             503     overloaded_error: the server is full (Retry-After)
│   ├── StreamsFullError        503     no room for another resumable stream
│   └── SharedStateError        503     Redis (shared state) failed or was too slow
└── UpstreamError               502     upstream_error: the upstream failed us
    ├── UpstreamConnectError    502     could not reach the upstream
    ├── UpstreamBrokenError     502     the connection broke once made (reset, closed mid-response)
    ├── UpstreamTimeoutError    504     the upstream took too long
    ├── UpstreamStatusError     (its)   the upstream answered with an error status
    │   └── ContextLengthError  (its)   the prompt is longer than the model's context window
    └── UpstreamProtocolError   502     the upstream's bytes made no sense
```

`status` is the HTTP status to answer with while no byte of the response was sent; `type` is
the error type string of OpenAI's error object (Anthropic's renderer maps it to its own).

What any error may carry is on the base class: `retry_after` (seconds, sent as `Retry-After`)
and `characters_delivered` (set when it ends a stream). A caught error is never changed:
`after_delivery` and `with_message` return a new one of the same class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Self

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ContextLengthError",
    "HTTPRefusal",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "ReplayGapError",
    "RequestError",
    "SharedStateError",
    "ShuttingDownError",
    "StreamCancelled",
    "StreamInterrupted",
    "StreamsFullError",
    "TrioproxyError",
    "UpstreamBrokenError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "ValidationError",
    "exception_leaves",
]


class TrioproxyError(Exception):
    """Base of every error trioproxy raises on purpose."""

    status: int = 500
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        characters_delivered: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        """Seconds until asking again could succeed, when known."""
        self.characters_delivered = characters_delivered
        """How many characters of text the client got before this error ended its stream."""

    def with_message(self, message: str) -> Self:
        """This error with another message: a new one, of the same class, caused by this one."""
        return self._copy(message=message)

    def after_delivery(self, characters: int, *, content_delivered: bool) -> Self:
        """
        This error as the last word of a stream that delivered `characters` characters; when
        any content was delivered, the message says so, since it will not be repeated.
        """
        message = self.message
        if content_delivered:
            message += f" (after {characters} characters were delivered; they are not repeated)"
        return self._copy(message=message, characters_delivered=characters)

    def _copy(self, **changes: object) -> Self:
        # Subclasses' constructors take different arguments: copy the state, not the call.
        new = type(self).__new__(type(self))
        Exception.__init__(new, changes.get("message", self.message))
        new.__dict__.update(self.__dict__, **changes)
        new.__cause__ = self
        return new


class ConfigError(TrioproxyError):
    """The config is invalid; `problems` lists every mistake, one clear sentence each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class RequestError(TrioproxyError):
    """The client's request is invalid; `param` names the offending field where there is one."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(RequestError):
    status = 401
    type = "authentication_error"


class NotFoundError(RequestError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="model_not_found", param="model")


class ReplayGapError(RequestError):
    """The events after the asked-for id are no longer all in the replay log (it is bounded)."""

    status = 410


class PayloadTooLargeError(RequestError):
    """The request body is larger than the server accepts; it was not read past the limit."""

    status = 413

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_too_large")


class HTTPRefusal(RequestError):
    """The HTTP layer refused the request before a route saw it; its status is the HTTP layer's."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.type = _type_for_status(status)


class RateLimitedError(TrioproxyError):
    """
    This client (key, or address when keys are off) is over its requests per minute, a token
    budget or its concurrent streams; `retry_after` is the number of seconds until it would be
    admitted (sent as `Retry-After`), `None` when waiting cannot help (a request larger than a
    whole budget).
    """

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, code: str, retry_after: float | None) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class OverloadedError(TrioproxyError):
    """
    The server as a whole has no room for another stream, whoever asks. `retry_after`, when
    known, is sent as `Retry-After`.
    """

    status = 503
    type = "overloaded_error"


class SharedStateError(OverloadedError):
    """
    Redis, where the shared state lives (`_redis.py`), failed, did not answer within
    `[redis] timeout`, or holds what no script of ours wrote: raised by that module only, for
    whatever coredis raised. Admission then falls back to this process's limits, or refuses
    with it (`[redis] on_error`).
    """


class ValidationError(TrioproxyError):
    """A validator stopped the stream; the message says why."""

    status = 422
    type = "validation_error"


class StreamCancelled(TrioproxyError):
    """The client asked to stop a stream (a WebSocket `cancel` message); its last event says so."""

    status = 499
    type = "cancelled"


class StreamInterrupted(TrioproxyError):
    """The server ended a stream before it completed (it is shutting down)."""

    status = 503
    type = "server_error"


class ShuttingDownError(StreamInterrupted):
    """
    The server is shutting down: it refuses new streams, and ends those still running at the
    end of its grace period. `retry_after` (seconds) tells a client when to ask again — behind
    a load balancer, another instance answers.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="server_shutting_down", retry_after=retry_after)


class StreamsFullError(OverloadedError):
    """`max_streams` resumable streams are running: no room for another."""


class UpstreamError(TrioproxyError):
    """The upstream failed; `_policy.failure_kind` says of what kind, and so whether asking again could help."""

    status = 502
    type = "upstream_error"


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamBrokenError(UpstreamError):
    pass


class UpstreamTimeoutError(UpstreamError):
    status = 504
    type = "timeout_error"

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, code=kind)
        self.kind = kind


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error; we answer with the same status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.status = status
        self.type = type or _type_for_status(status)


class ContextLengthError(UpstreamStatusError):
    """
    The upstream refused the prompt as longer than its model's context window: the same
    request would be refused again there, and may fit a larger model (`context_fallbacks`).
    """


class UpstreamProtocolError(UpstreamError):
    pass


def _type_for_status(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "upstream_error"


def exception_leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`, however deeply grouped (trio's nurseries group them); else `exc` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from exception_leaves(inner)
    else:
        yield exc
