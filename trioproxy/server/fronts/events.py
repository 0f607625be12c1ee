"""
trioproxy's own events front: the generic endpoints (`POST /v1/chat/stream` and
`/v1/stream/sse` as SSE, `/v1/chat/stream/json` as NDJSON), the WebSocket endpoints
(`_websocket.py`), and `GET /v1/streams/{id}`; `_events_front` renders the events, and every
error on these paths is one `error` event in the path's framing.

The generic SSE endpoints are different from the other fronts' routes: their generation is not
tied to the request that started it. It runs as a broadcast task (`_streams.py`) that any
number of responses watch, the POST being the first; `GET /v1/streams/{id}` attaches another,
replaying what it missed after its `Last-Event-ID`. A watcher that goes away only detaches;
the upstream is cancelled when no watcher is left for `[streams].resume_grace_period`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from quart import Response, request
from quart_trio import QuartTrio

from ..._events import StreamEvent
from ..._exceptions import NotFoundError, RequestError, TrioproxyError
from ..._request import ChatRequest, parse_json_object
from ...pipeline import Pipeline, StreamSession
from .._access import request_record
from .._core import SSE, Core, watch_remote_response, watch_response, with_retry_after
from .._events_front import EventRenderer, error_event, ndjson_frame, sse_frame
from .._generic import generic_chat_request, prompt_chars
from .._websocket import register_websocket_routes

__all__ = ["GENERIC_ENDPOINTS", "error_response", "owns", "register"]

NDJSON: Final = "application/x-ndjson"
#: The generic event endpoints: how each frames its events (errors included), and as what.
GENERIC_ENDPOINTS: Final[dict[str, tuple[Callable[[StreamEvent], bytes], str]]] = {
    "/v1/chat/stream": (sse_frame, SSE),
    "/v1/stream/sse": (sse_frame, SSE),
    "/v1/chat/stream/json": (ndjson_frame, NDJSON),
}


def owns(path: str) -> bool:
    return path in GENERIC_ENDPOINTS or path.startswith("/v1/streams/")


def error_response(path: str, error: TrioproxyError) -> Response:
    """`error` as one `error` event, framed as the endpoint at `path` frames its events."""
    frame, content_type = GENERIC_ENDPOINTS.get(path, (sse_frame, SSE))
    return _event_error(frame, content_type, error)


def _event_error(frame: Callable[[StreamEvent], bytes], content_type: str, error: TrioproxyError) -> Response:
    response = Response(frame(error_event(error)), status=error.status, content_type=content_type)
    return with_retry_after(response, error)


def _sse_error(error: TrioproxyError) -> Response:
    return _event_error(sse_frame, SSE, error)


def register(app: QuartTrio, core: Core) -> None:
    routes = _Routes(core)
    app.get("/v1/streams/<stream_id>")(routes.watch_stream)
    register_websocket_routes(
        app,
        start=core.start,
        router=core.router,
        max_message_bytes=core.config.limits.max_body_bytes,
        write_timeout=core.config.server.write_timeout,
        shutdown=core.shutdown,
    )
    for path, (frame, content_type) in GENERIC_ENDPOINTS.items():
        name = path.removeprefix("/v1/").replace("/", "_")
        app.add_url_rule(path, name, routes.generic_endpoint(frame, content_type), methods=["POST"])


class _Routes:
    """The generic endpoints' handlers and `GET /v1/streams/{id}`'s."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def generic_endpoint(self, frame: Callable[[StreamEvent], bytes], content_type: str) -> Callable[[], Any]:
        error_response = functools.partial(_event_error, frame, content_type)

        async def endpoint() -> Response:
            request_id = request_record(request.scope).id
            try:
                body = parse_json_object(await request.get_data())
                chat, provider, buffer = generic_chat_request(body)
                pipeline = self.core.pipeline(chat.model, provider=provider, buffer=buffer)
            except TrioproxyError as exc:
                return error_response(exc)
            renderer_for = _event_renderers(pipeline, chat, request_id)
            if frame is sse_frame:  # resumable and shareable; NDJSON stays tied to its request
                return await self.shared_stream(self.core.start(pipeline, chat), renderer_for, error_response)
            return await self.core.stream(
                self.core.start(pipeline, chat), renderer_for(None, frame), content_type, error_response
            )

        return endpoint

    async def shared_stream(
        self,
        session: StreamSession,
        renderer_for: Callable[[str, Callable[[StreamEvent], bytes]], EventRenderer],
        error_response: Callable[[TrioproxyError], Response],
    ) -> Response:
        """A resumable stream (`Core.share`) with this request as its first watcher."""
        try:
            shared = await self.core.share(session, renderer_for, shows_notices=True)
        except TrioproxyError as exc:
            return error_response(exc)
        return watch_response(*shared)

    async def watch_stream(self, stream_id: str) -> Response:
        """
        Attach to a running or recently finished stream, after its `Last-Event-ID`: this
        process's own, else one another process runs, from the shared store (`[redis]`).
        """
        try:
            after = _last_event_id(request.headers.get("last-event-id", ""))
            stream = self.core.streams.get(stream_id)
            if stream is None:
                return await self.watch_elsewhere(stream_id, after)
            _check_not_ahead(after, stream.last_id)
            backlog, watcher = stream.attach(after)  # raises if the events after `after` are no longer kept
        except TrioproxyError as exc:
            return _sse_error(exc)
        return watch_response(stream, backlog, watcher)

    async def watch_elsewhere(self, stream_id: str, after: int) -> Response:
        """A stream another process runs (or ran), from the shared store (`[redis]`)."""
        remote = await self.core.streams.remote(stream_id, after)
        if remote is None:
            raise NotFoundError(f"no stream {stream_id!r}: it never existed or it has expired")
        if remote.ended:  # else its events up to `after` may not be written yet
            _check_not_ahead(after, remote.last_written)
        return watch_remote_response(remote)


def _event_renderers(
    pipeline: Pipeline, chat: ChatRequest, request_id: str
) -> Callable[[str | None, Callable[[StreamEvent], bytes]], EventRenderer]:
    """How a generic endpoint's renderer is made, once its stream's id (if resumable) and framing are known."""
    route = pipeline.routes[0]

    def renderer_for(stream_id: str | None, frame: Callable[[StreamEvent], bytes]) -> EventRenderer:
        return EventRenderer(
            frame=frame,
            provider=route.provider.name,
            model=route.upstream_model,
            request_id=request_id,
            prompt_chars=prompt_chars(chat),
            chunked=pipeline.buffer.enabled,
            stream_id=stream_id,
        )

    return renderer_for


def _last_event_id(header: str) -> int:
    """A watcher's `Last-Event-ID`: 0 when it has none."""
    last_event_id = header.strip()
    if last_event_id and not (last_event_id.isascii() and last_event_id.isdigit()):
        raise RequestError(f"Last-Event-ID must be an event id of this stream, got {last_event_id[:40]!r}")
    return int(last_event_id or 0)


def _check_not_ahead(after: int, last_id: int) -> None:
    if after > last_id:
        raise RequestError(f"Last-Event-ID {after} is ahead of the stream (at {last_id})")
