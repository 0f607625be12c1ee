"""
The front adapter of trioproxy's own event endpoints: session items rendered as
`StreamEvent`s, framed as SSE or as NDJSON.

A stream opens with a `metadata` event naming its provider and model, carries text as
`token` events (or `chunk` events when a buffer merges tokens), tool-call fragments and
retries as `metadata` events, and ends with exactly one `done` (finish reason, usage,
characters delivered) or one `error`.

Sans-IO.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .._events import Delta, StreamEvent
from .._exceptions import TrioproxyError

if TYPE_CHECKING:
    from ..pipeline import RetryNotice, StreamSession

__all__ = ["EventRenderer", "error_event", "ndjson_frame", "sse_frame"]

SSE_KEEP_ALIVE: Final = b": keep-alive\n\n"


def sse_frame(event: StreamEvent) -> bytes:
    return event.to_sse().encode()


def ndjson_frame(event: StreamEvent) -> bytes:
    return (event.to_json() + "\n").encode()


def latency_summary(waits: list[float]) -> dict[str, float | int]:
    """p50, p99 and max of `waits` (seconds) in milliseconds, and how many there were."""
    if not waits:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "chunks": 0}
    ordered = sorted(waits)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1] * 1000, 3), "chunks": len(ordered)}


def error_event(error: TrioproxyError, **extra: Any) -> StreamEvent:
    """The `error` event; `retry_after` (whole seconds) when the error says when to ask again."""
    data = {"message": error.message, "type": error.type, "code": error.code, "status": error.status, **extra}
    if error.retry_after is not None:
        data["retry_after"] = math.ceil(error.retry_after)
    return StreamEvent("error", data)


class EventRenderer:
    """
    `frame` makes bytes of an event; keep-alives are SSE comments where `frame` is
    `sse_frame`, and `metadata` heartbeat events otherwise. `chunked` names text events
    `chunk` (merged by a buffer) instead of `token`. `stream_id`, for a resumable stream,
    goes into `stream_start`'s metadata.
    """

    shows_notices: Final = True

    def __init__(
        self,
        *,
        frame: Callable[[StreamEvent], bytes],
        provider: str,
        model: str,
        request_id: str,
        prompt_chars: int,
        chunked: bool = False,
        stream_id: str | None = None,
    ) -> None:
        self.frame = frame
        self.stream_id = stream_id
        self.provider = provider
        self.model = model
        self.request_id = request_id
        self.prompt_chars = prompt_chars
        self.text_type: Final = "chunk" if chunked else "token"
        self._keep_alive: bytes | None = None

    def opened(self) -> bytes:
        metadata = {"provider": self.provider, "model": self.model, "request_id": self.request_id}
        if self.stream_id is not None:
            metadata["stream_id"] = self.stream_id
        return self.frame(StreamEvent("metadata", "stream_start", metadata))

    def delta(self, delta: Delta) -> bytes:
        out = b""
        if delta.text:
            out += self.frame(StreamEvent(self.text_type, delta.text))
        for tc in delta.tool_calls:
            out += self.frame(
                StreamEvent(
                    "metadata",
                    "tool_call",
                    {"index": tc.index, "id": tc.id, "name": tc.name, "arguments": tc.arguments},
                )
            )
        return out

    def notice(self, notice: RetryNotice) -> bytes:
        metadata = {
            "attempt": notice.attempt,
            "provider": notice.provider,
            "model": notice.model,
            "delay_ms": round(notice.delay * 1000),
            "reason": notice.reason,
        }
        return self.frame(StreamEvent("metadata", notice.kind, metadata))

    def heartbeat(self) -> bytes:
        if self._keep_alive is None:  # made when first needed: `frame` may number the events it frames
            is_sse = self.frame is sse_frame
            self._keep_alive = SSE_KEEP_ALIVE if is_sse else self.frame(StreamEvent("metadata", "heartbeat"))
        return self._keep_alive

    def done(self, session: StreamSession) -> bytes:
        acc = session.accumulator
        usage = acc.usage_or_estimate(self.prompt_chars)
        metadata = {
            "finish_reason": acc.finish_reason or "stop",
            "usage": {**usage.to_openai(), "estimated": usage.estimated},
            "characters": len(acc.text),
            "provider": self.provider,
            "model": self.model,
            "buffer_latency_ms": latency_summary(session.stats.buffer_waits),
        }
        if acc.tool_calls():
            metadata["tool_calls"] = acc.tool_calls()
        return self.frame(StreamEvent("done", None, metadata))

    def error(self, error: TrioproxyError) -> bytes:
        return self.frame(error_event(error, characters_delivered=error.characters_delivered or 0))
