"""
The access log: one structured line and the request metrics per request, and a request id
on every response.

It is ASGI middleware around the quart app, because only there is the end of a response
visible — a streaming body is sent long after its route returned, and a client that goes
away ends it early. Routes add what they know (the matched rule, the stream's session) to
the request's `RequestRecord`, found in the ASGI scope.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from .._request import content_text
from ._generic import prompt_chars

if TYPE_CHECKING:
    from ..pipeline import StreamSession
    from ._metrics import Metrics

__all__ = ["RECORD", "AccessLog", "RequestRecord", "request_record"]

RECORD: Final = "trioproxy.request"
"""The ASGI scope key of a request's `RequestRecord`."""

access_logger = logging.getLogger("trioproxy.access")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


@dataclass(slots=True)
class RequestRecord:
    id: str
    method: str
    path: str
    started: float
    route: str = "unmatched"
    """The matched URL rule (bounded, unlike the path); set by the app."""
    status: int = 0
    """The response's status; 0 while none was sent (the client may have left first)."""
    complete: bool = False
    crashed: bool = False
    """The app raised instead of answering (hypercorn answers 500)."""
    session: StreamSession | None = None
    key: str | None = None
    """Whose usage the session counts as (`_auth.key_name`); set with `session`."""
    provider: str | None = None
    """Where a request that runs no session went (a forwarded one)."""


def request_record(scope: Mapping[str, object]) -> RequestRecord:
    """
    The `RequestRecord` of the request or WebSocket whose ASGI scope this is. `AccessLog`
    wraps the app and puts one in every such scope, which hypercorn's scope types do not know.
    """
    return cast(RequestRecord, scope[RECORD])


class AccessLog:
    """
    ASGI middleware. A client's own `x-request-id` (a short token) is kept, so one id
    follows a request through the load balancers in front; otherwise one is made.
    """

    def __init__(self, app: Any, *, metrics: Metrics, enabled: bool = True, include_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.enabled = enabled
        self.include_prompts = include_prompts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or new_request_id()
        header = (b"x-request-id", request_id.encode())
        record = RequestRecord(
            id=request_id, method=scope.get("method", "WS"), path=scope["path"], started=trio.current_time()
        )
        scope[RECORD] = record

        async def send_with_id(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            elif kind == "websocket.accept":
                record.status = 101
                message["headers"] = [*message.get("headers", ()), header]
            elif kind == "http.response.body" and not message.get("more_body", False):
                record.complete = True
            elif kind == "websocket.close" or kind == "websocket.http.response.body":
                record.complete = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            record.crashed = True
            raise
        finally:
            self._finish(record, websocket=scope["type"] == "websocket")
            # The request is over. hypercorn's stream keeps its scope in reference cycles that
            # only the cycle collector frees: the session (its text and timings) goes now.
            record.session = None
            del scope[RECORD]

    def _finish(self, record: RequestRecord, *, websocket: bool) -> None:
        # A WebSocket ends when its client closes it: that is not a disconnect.
        disconnected = not record.complete and not (websocket and record.status == 101)
        outcome = request_outcome(record, disconnected=disconnected)
        self.metrics.observe_request(record.route, record.status, outcome, disconnected=disconnected)
        if self.enabled and access_logger.isEnabledFor(logging.INFO):
            fields = self.fields(record, outcome)
            access_logger.info(
                "%s %s %s %s", record.method, record.path, record.status, outcome, extra={"fields": fields}
            )

    def log_stream(
        self, session: StreamSession, *, request_id: str, route: str, stream_id: str | None, key: str
    ) -> None:
        """One line for a stream that is not a request of its own (a WebSocket stream)."""
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        stats = session.stats
        fields: dict[str, Any] = {"request_id": request_id, "route": route, "stream_id": stream_id}
        fields.update(self._session_fields(session, key))
        fields["outcome"] = stats.outcome
        access_logger.info("WS %s stream %s %s", route, stream_id, stats.outcome, extra={"fields": fields})

    def fields(self, record: RequestRecord, outcome: str) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "request_id": record.id,
            "method": record.method,
            "route": record.route,
            "path": record.path,
            "status": record.status,
            "outcome": outcome,
            "duration_ms": _ms(trio.current_time() - record.started),
        }
        if record.session is not None and record.key is not None:
            fields.update(self._session_fields(record.session, record.key))
        elif record.provider is not None:
            fields["provider"] = record.provider
        return fields

    def _session_fields(self, session: StreamSession, key: str) -> dict[str, Any]:
        stats = session.stats
        usage = session.accumulator.usage_or_estimate(prompt_chars(session.chat))
        fields: dict[str, Any] = {
            "key": key,
            "provider": stats.provider,
            "model": stats.model,
            "ttft_ms": None if stats.ttft is None else _ms(stats.ttft),
            "tokens_in": usage.prompt_tokens,
            "tokens_cached": usage.cache_read_tokens or 0,
            "tokens_out": usage.completion_tokens,
        }
        if usage.estimated:
            fields["tokens_estimated"] = True
        if stats.attempts > 1:
            fields["attempts"] = stats.attempts
            if stats.failures:
                fields["failures"] = [f"{provider}: {error.message}" for provider, error in stats.failures]
        if stats.retries:
            fields["retries"] = len(stats.retries)
        if stats.providers_left:
            fields["failovers"] = len(stats.providers_left)
        for kind, _ in stats.recoveries:
            fields[kind + "s"] = fields.get(kind + "s", 0) + 1
        if stats.breaker_transitions:
            fields["breaker_transitions"] = stats.breaker_transitions
        if stats.error is not None:
            fields["error"] = stats.error.message
        if self.include_prompts:
            fields["prompt"] = [
                {"role": m.get("role"), "content": content_text(m.get("content"))} for m in session.chat.messages
            ]
        return fields


def request_outcome(record: RequestRecord, *, disconnected: bool) -> str:
    """completed, rejected (4xx), failed (5xx), client_disconnected, interrupted, or how the stream ended."""
    session = record.session
    if session is not None and session.stats.error is not None:
        return session.stats.outcome
    if record.crashed or record.status >= 500:
        return "failed"
    if record.status >= 400:
        return "rejected"
    if disconnected:
        return "client_disconnected"
    if session is not None and session.stats.cancelled:
        return "interrupted"  # the response was completed by us, not the upstream (shutdown)
    return "completed"


def _client_request_id(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _CLIENT_REQUEST_ID.match(text) else None
    return None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
