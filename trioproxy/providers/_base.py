"""
What a provider is: a sans-IO translation between an OpenAI-style chat request and one
upstream protocol.

A translation builds the HTTP request to send and parses what comes back; the shared upstream
layer (`trioproxy._upstream`) does the I/O. Keeping the two apart lets every translation be
tested with plain bytes and dicts, and lets one hardened piece of code own connections,
timeouts and cancellation for every provider.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from .._events import Delta
from .._exceptions import ContextLengthError, RequestError, UpstreamStatusError
from .._request import ChatRequest, DropParams, WireProtocol, drops
from .._sse import ServerSentEvent

__all__ = [
    "CUT_SHORT",
    "NEUTRAL_VALUES",
    "DropParams",
    "StreamParser",
    "Translation",
    "UpstreamRequest",
    "drop_or_refuse",
    "is_count",
    "retry_after_seconds",
    "safe_message",
    "status_error",
]

CUT_SHORT: Final = "the upstream ended the stream before a finish reason"
"""What `StreamParser.end` says of a body that ended cleanly but too early."""


NEUTRAL_VALUES: Final[Mapping[str, object]] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "logprobs": False,
    "modalities": ["text"],
}
"""
Chat Completions fields at the value that asks for nothing (the API's default): clients and
libraries send them so, and an upstream that has no such field answers the same without it.
"""


def drop_or_refuse(chat: ChatRequest, name: str, value: object, drop_params: DropParams, *, upstream: str) -> None:
    """
    A field `name` of `chat`'s common body, set to `value`, that `upstream` (say, "the
    Anthropic Messages API") has no equivalent for: returns when the value asks for nothing
    (`NEUTRAL_VALUES`) or the provider's `drop_params` drops the field, else raises the
    `RequestError` naming it as the client sent it. Dropped silently, it would have the
    upstream answer another question than the one asked.
    """
    if name in NEUTRAL_VALUES and value == NEUTRAL_VALUES[name]:
        return
    client_name = chat.client_name(name)
    if drops(drop_params, name, client_name):
        return
    raise RequestError(
        f"'{client_name}' has no equivalent in {upstream}, which this model's upstream speaks "
        "(an operator may set the provider's drop_params to drop it instead)",
        param=client_name,
    )


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """
    An HTTP POST to make upstream. `url` is absolute; `body` is JSON bytes.

    Its answer is an event stream for the translation's parser, unless `answer` is set: then
    it is one JSON document (an embeddings answer), read whole and bounded, and `answer`
    makes it the one delta of the request (its bytes in `raw`, its usage counted).
    """

    url: str
    headers: Mapping[str, str]
    body: bytes
    answer: Callable[[bytes], Delta] | None = None


class StreamParser(Protocol):
    """Turns one upstream stream's SSE events into deltas; one parser per stream."""

    @property
    def finished(self) -> bool:
        """Whether the protocol's end marker was seen (`[DONE]`, `message_stop`)."""
        ...

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        """
        Parse one event.

        Raises `UpstreamStatusError` for an error the upstream reported in the stream and
        `UpstreamProtocolError` for bytes that are not the protocol.
        """
        ...

    def end(self) -> list[Delta]:
        """
        The body ended cleanly before the end marker: the deltas still owed (usage held for
        the marker), and the stream is finished, when a finish reason was seen; some servers
        never send the marker, and the answer is whole. Without a finish reason the answer was
        cut short: raises `UpstreamProtocolError`.
        """
        ...


class Translation(Protocol):
    protocol: WireProtocol
    """The protocol the upstream speaks."""

    def stream_request(self, chat: ChatRequest) -> UpstreamRequest:
        """The request that asks the upstream to stream `chat` (`chat.upstream_model` set)."""
        ...

    def count_tokens_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        """The request that asks the upstream to count `chat`'s input tokens; `None` if it cannot."""
        ...

    def compact_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        """The request that asks the upstream to compact `chat`'s conversation; `None` if it cannot."""
        ...

    def stream_parser(self, chat: ChatRequest) -> StreamParser:
        """
        A parser for the stream of `chat`; it keeps each event's bytes (`Delta.raw`) only
        when the client speaks the upstream's protocol.
        """
        ...

    def forward_url(self, target: str) -> str:
        """Where a client's request to `target` (a path under `/v1/`, with its query) goes upstream."""
        ...

    def forward_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """A forwarded request's headers: the client's (none of its credentials), with the provider's own added."""
        ...

    def error_from_response(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamStatusError:
        """
        The error an upstream's non-2xx answer means, with a message safe to show a client
        (the upstream's own message, never our credentials).
        """
        ...


_SECRET_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{2})[A-Za-z0-9_\-*]{6,}")
MAX_ERROR_MESSAGE = 500


def safe_message(message: str, *, secret: str | None) -> str:
    """
    An upstream's error message made fit for a client: our credential never appears in it
    (upstreams echo masked or whole keys back in 401s), nor anything key-shaped, and it is
    short.
    """
    if secret:
        message = message.replace(secret, "***")
    message = _SECRET_LIKE.sub(r"\1***", message)
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 1] + "…"
    return message


def is_count(value: object) -> bool:
    """Whether `value` (from an upstream's JSON) is a token count: a whole number, not negative (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """
    `Retry-After` in seconds, when it is given as a number (the form LLM APIs use). The name
    is matched in any case, whatever the mapping (`httpx.Headers` or a plain dict).
    """
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


_CONTEXT_LENGTH = re.compile(
    r"maximum context length|context_length_exceeded|prompt is too long|exceeds the available context size"
    r"|exceeds the context window",
    re.IGNORECASE,
)
"""
How upstreams say a prompt does not fit: OpenAI's code `context_length_exceeded` and its
message ("This model's maximum context length is ... tokens"), vLLM's and SGLang's ("maximum
context length"), Anthropic's ("prompt is too long: ... tokens > ... maximum"), llama.cpp's
("the request exceeds the available context size"), OpenAI Responses' ("Your input exceeds the
context window of this model").
"""


def status_error(
    message: str,
    *,
    status: int,
    type: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> UpstreamStatusError:
    """The error for an upstream's error status (or in-stream error): a `ContextLengthError` when it says so."""
    refused = 400 <= status < 500 and (code == "context_length_exceeded" or _CONTEXT_LENGTH.search(message))
    kind = ContextLengthError if refused else UpstreamStatusError
    return kind(message, status=status, type=type, code=code, retry_after=retry_after)
