"""
What the generic event endpoints share, over HTTP and WebSocket alike: reading the generic
request body, the renderer interface of the front adapters, and rendering session items (with
what a renderer's refusal of one means for its session: `render_for`).
"""

from __future__ import annotations

from typing import Any, Protocol

from .._events import Delta, Opened
from .._exceptions import RequestError, StreamInterrupted, TrioproxyError
from .._policy import BufferConfig, parse_policy
from .._request import ChatRequest, content_text, parse_chat_request
from ..pipeline import Heartbeat, RetryNotice, SessionItem, StreamSession

__all__ = [
    "Renderer",
    "StreamInterrupted",
    "commits",
    "generic_chat_request",
    "last_word",
    "prompt_chars",
    "render",
    "render_for",
]


class Renderer(Protocol):
    """
    A front adapter: session items as the client's protocol's bytes (`b""`: nothing to send).
    `shows_notices`: whether retries and failovers are shown to the client.
    """

    @property
    def shows_notices(self) -> bool: ...

    def opened(self) -> bytes: ...
    def delta(self, delta: Delta) -> bytes: ...
    def notice(self, notice: RetryNotice) -> bytes: ...
    def heartbeat(self) -> bytes: ...
    def error(self, error: TrioproxyError) -> bytes: ...
    def done(self, session: StreamSession) -> bytes: ...


def render(renderer: Renderer, item: SessionItem) -> bytes:
    """`item` in the renderer's protocol; after a `TrioproxyError` the stream is over."""
    if isinstance(item, Delta):
        return renderer.delta(item)
    if isinstance(item, Heartbeat):
        return renderer.heartbeat()
    if isinstance(item, RetryNotice):
        return renderer.notice(item)
    if isinstance(item, TrioproxyError):
        return renderer.error(item)
    return renderer.opened()


def render_for(session: StreamSession, renderer: Renderer, item: SessionItem) -> bytes:
    """
    `item` of `session` in the renderer's protocol: every front renders a session's items here.
    An item the protocol cannot carry (the renderer raised its `TrioproxyError`: an upstream's
    tool calls interleaved) ends the session with that refusal, rendered as its last word;
    after the last word, nothing.
    """
    if session.failed and not isinstance(item, TrioproxyError):
        return b""  # (a heartbeat, or an item already on its way when a refusal ended the stream)
    try:
        return render(renderer, item)
    except TrioproxyError as refusal:
        return renderer.error(session.refused(refusal))


def commits(item: SessionItem, *, shows_notices: bool) -> bool:
    """
    Whether `item` commits a response to a 200 stream: anything the client must see now, that
    is, more than the preamble of a generation. The upstream's acceptance and content-less
    deltas (the role chunk) can wait for the first token, so that a failure before it is still
    an HTTP status; a heartbeat cannot (an idle load balancer would cut the connection), nor a
    retry notice the client is shown.
    """
    if isinstance(item, Opened):
        return False
    if isinstance(item, Delta):
        return item.has_content or item.finish_reason is not None or item.usage is not None
    if isinstance(item, RetryNotice):
        return shows_notices
    return True


def last_word(renderer: Renderer, session: StreamSession) -> bytes:
    """
    How a stream whose output ended without an error ends: `done` if the session completed,
    else an interruption error, never a `done` that passes a truncated answer off as whole.
    """
    if session.completed:
        return renderer.done(session)
    interrupted = StreamInterrupted("the server ended the stream before it completed")
    return renderer.error(session.ended_with(interrupted))


def generic_chat_request(body: dict[str, Any]) -> tuple[ChatRequest, str | None, BufferConfig | None]:
    """The generic body `{provider, model, messages, max_tokens, buffer_config, ...}`."""
    provider = body.get("provider")
    if provider is not None and (not isinstance(provider, str) or not provider):
        raise RequestError("'provider' must be a non-empty string", param="provider")
    buffer = None
    if body.get("buffer_config") is not None:
        problems: list[str] = []
        buffer = parse_policy(BufferConfig(), body["buffer_config"], where="buffer_config", problems=problems)
        if problems:
            raise RequestError(problems[0], param="buffer_config")
    chat_body = {k: v for k, v in body.items() if k not in ("provider", "buffer_config")}
    chat_body["stream"] = True
    return parse_chat_request(chat_body), provider, buffer


def prompt_chars(chat: ChatRequest) -> int:
    return sum(len(content_text(m.get("content"))) for m in chat.messages)
