"""
The WebSocket endpoints: `/v1/chat/ws` and `/v1/stream/ws/{client_id}`.

One connection carries any number of streams (at most `MAX_STREAMS`), each tagged with the
`id` its client chose:

- a request is the generic body of `POST /v1/chat/stream` plus `"id"`; the server answers
  with the same `StreamEvent`s as the SSE endpoint (`metadata` stream_start, `token`/`chunk`,
  `metadata`, then one `done` or one `error`), each a JSON text message with `"id"` added;
- `{"type": "cancel", "id": ...}` cancels that stream's session (so its upstream request) at
  once and ends the stream with an `error` event of type `cancelled`, which counts the
  characters the stream delivered;
- a connection has no HTTP status per stream, so a stream that fails before its first token
  ends with an `error` event like one that fails later, and nothing is held back for it;
- a malformed message gets an `error` event (with its `id` when it had one) and the
  connection stays open; so does a request `[limits]` refuse (429, 503), and a message over
  `max_body_bytes` (413, without an `id`: it is not parsed).

Structure: one nursery per connection holds the writer task and a task per stream; the
receive loop runs in the handler itself. When the client goes away, quart-trio cancels the
handler, so the nursery, every stream task and (through their `finally`) every session and
its upstream request are cancelled with it.

Every stream task writes through one bounded channel to the single writer; a peer that does
not read for `[server] write_timeout` seconds is dropped. Keep-alive is hypercorn's WebSocket ping
(`websocket_ping_interval`, set in `_serve.py`), so sessions run without heartbeat items.
hypercorn does not track pongs: a peer that vanished without closing is noticed when a write
to it fails (TCP retransmission gives up) or, with streams running, by `write_timeout`.

hypercorn's graceful shutdown leaves WebSocket connections open, so the server closes them
itself while it drains (`_shutdown.py`): a new stream is refused with a 503 `error` event
(`start` does that), the streams running go on, and once the last of them has sent its final
event the connection is closed with 1001 (going away).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import trio
from quart import websocket
from quart_trio import QuartTrio

from .._events import Delta, StreamEvent
from .._exceptions import PayloadTooLargeError, RequestError, StreamCancelled, TrioproxyError
from .._request import parse_json_object
from .._router import Router
from ..pipeline import StreamSession, pipeline_for
from ._access import request_record
from ._events_front import EventRenderer, error_event
from ._generic import generic_chat_request, last_word, prompt_chars, render_for
from ._shutdown import GracefulShutdown

__all__ = ["MAX_STREAMS", "SEND_QUEUE_SIZE", "register_websocket_routes"]

logger = logging.getLogger("trioproxy.server")

MAX_STREAMS: Final = 32
"""Concurrent streams per connection; a request beyond gets an `error` event."""
SEND_QUEUE_SIZE: Final = 64
"""Messages waiting for the socket, all streams of a connection together."""
GOING_AWAY: Final = 1001
"""The close code of a connection the server closes because it shuts down."""


def register_websocket_routes(
    app: QuartTrio,
    *,
    start: Callable[..., StreamSession],
    router: Router,
    max_message_bytes: int,
    write_timeout: float,
    shutdown: GracefulShutdown,
) -> None:
    """
    Add the WebSocket routes to `app`; `start(pipeline, chat)` starts a session (a refusal
    of `[limits]` is its only item) or refuses a body out of their bounds. A message longer
    than `max_message_bytes` is refused unread; one that waits `write_timeout` seconds for the
    socket drops the peer.
    """
    routes = _Routes(start, router, max_message_bytes, write_timeout, shutdown)

    async def serve_connection(client_id: str | None) -> None:
        await websocket.accept()
        async with trio.open_nursery() as nursery:
            connection = _Connection(routes, nursery, client_id, request_record(websocket.scope).id)
            nursery.start_soon(connection.write)
            nursery.start_soon(connection.close_when_drained)
            while True:
                await connection.handle(await websocket.receive())

    @app.websocket("/v1/chat/ws")
    async def chat_ws() -> None:
        await serve_connection(None)

    @app.websocket("/v1/stream/ws/<client_id>")
    async def stream_ws(client_id: str) -> None:
        await serve_connection(client_id)


@dataclass(frozen=True, slots=True)
class _Routes:
    """What every WebSocket connection shares: see `register_websocket_routes`."""

    start: Callable[..., StreamSession]
    router: Router
    max_message_bytes: int
    write_timeout: float
    shutdown: GracefulShutdown


class _Connection:
    """The streams of one WebSocket connection."""

    def __init__(self, routes: _Routes, nursery: trio.Nursery, client_id: str | None, request_id: str) -> None:
        self.routes = routes
        self.nursery = nursery
        self.client_id = client_id
        self.request_id = request_id
        """The connection's id from the access log: its `x-request-id`, in its log lines."""
        self.active: dict[str | int, tuple[StreamSession, trio.CancelScope]] = {}
        self._stream_ended = trio.Event()
        self.outbox, self._outgoing = trio.open_memory_channel[bytes | None](SEND_QUEUE_SIZE)
        """Messages for the socket; `None` closes the connection (the server shuts down)."""

    async def write(self) -> None:
        """The one task that writes to the socket."""
        async for message in self._outgoing:
            try:
                with trio.fail_after(self.routes.write_timeout):
                    if message is None:
                        await websocket.close(GOING_AWAY, "the server is shutting down")
                        self.nursery.cancel_scope.cancel()
                        return
                    await websocket.send(message.decode())
            except trio.TooSlowError:
                logger.warning("dropping a WebSocket peer that stopped reading")
                self.nursery.cancel_scope.cancel()
                return

    async def close_when_drained(self) -> None:
        """Once the server drains and the last stream here has ended, close, after its final events."""
        await self.routes.shutdown.wait_draining()
        while self.active:
            await self._stream_ended.wait()
        await self.outbox.send(None)

    async def send_error(self, error: TrioproxyError, request_id: str | int | None = None) -> None:
        await self.send_lines(_tagged(error_event(error), request_id))

    async def handle(self, text: str | bytes) -> None:
        """One message from the client."""
        max_message_bytes = self.routes.max_message_bytes
        # A str's UTF-8 length is at most 4 bytes a character: only a long one is encoded to measure it.
        short = isinstance(text, str) and len(text) <= max_message_bytes // 4
        if not short and len(text.encode() if isinstance(text, str) else text) > max_message_bytes:
            too_large = PayloadTooLargeError(f"a message is over the limit of {max_message_bytes} bytes")
            await self.send_error(too_large)
            return
        try:
            message = parse_json_object(text, what="a message")
        except RequestError as exc:
            await self.send_error(exc)
            return
        request_id = message.get("id")
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool) or request_id == "":
            await self.send_error(RequestError("'id' is required: a non-empty string or an integer", param="id"))
            return
        kind = message.get("type", "request")
        if kind == "cancel":
            self.cancel(request_id)
        elif (refusal := self._refusal(kind, request_id)) is not None:
            await self.send_error(refusal, request_id)
        else:
            await self.open_stream(request_id, {k: v for k, v in message.items() if k not in ("id", "type")})

    def _refusal(self, kind: object, request_id: str | int) -> RequestError | None:
        """Why a message that is no `cancel` cannot start stream `request_id`, if it cannot."""
        if kind != "request":
            return RequestError(f"unknown message type {kind!r}: 'request' or 'cancel'", param="type")
        if request_id in self.active:
            return RequestError(f"stream {request_id!r} is already running", param="id")
        if len(self.active) >= MAX_STREAMS:
            return RequestError(f"at most {MAX_STREAMS} streams may run at once on one connection")
        return None

    async def open_stream(self, request_id: str | int, body: dict[str, Any]) -> None:
        try:
            chat, provider, buffer = generic_chat_request(body)
            route = self.routes.router.route(chat.model, provider=provider)
            pipeline = pipeline_for(self.routes.router, route, buffer=buffer)
        except TrioproxyError as exc:
            await self.send_error(exc, request_id)
            return
        extra = {"client_id": self.client_id} if self.client_id is not None else {}
        renderer = EventRenderer(
            frame=lambda event: _tagged(event, request_id, extra),
            provider=route.provider.name,
            model=route.upstream_model,
            request_id=self.request_id,
            prompt_chars=prompt_chars(chat),
            chunked=pipeline.buffer.enabled,
        )
        try:
            session = self.routes.start(pipeline, chat, heartbeats=False, stream_id=str(request_id))
        except TrioproxyError as exc:  # a body out of `[limits]` bounds
            await self.send_error(exc, request_id)
            return
        scope = trio.CancelScope()
        self.active[request_id] = (session, scope)
        self.nursery.start_soon(self.relay, request_id, session, renderer, scope)

    async def relay(
        self, request_id: str | int, session: StreamSession, renderer: EventRenderer, scope: trio.CancelScope
    ) -> None:
        """One stream: the session's items, rendered, into the outbox."""
        delivered = 0
        try:
            with scope:
                async for item in session.output:  # no heartbeats: `start(..., heartbeats=False)`
                    await self.send_lines(render_for(session, renderer, item))
                    if session.failed:  # its error (or the renderer's refusal of the item) was the last word
                        return
                    if isinstance(item, Delta):
                        delivered += len(item.text)
                await self.send_lines(last_word(renderer, session))
            if scope.cancelled_caught:
                cancelled = StreamCancelled("cancelled by the client", characters_delivered=delivered)
                await self.send_lines(renderer.error(cancelled))
        finally:
            session.cancel()
            del self.active[request_id]
            self._stream_ended.set()
            self._stream_ended = trio.Event()

    async def send_lines(self, framed: bytes) -> None:
        """Each line of `framed` (events as `_tagged` frames them) as a message of its own, without its newline."""
        for line in framed.splitlines():
            await self.outbox.send(line)

    def cancel(self, request_id: str | int) -> None:
        """Cancel a running stream; an unknown id (a stream that just ended) is ignored."""
        entry = self.active.get(request_id)
        if entry is not None:
            session, scope = entry
            session.cancel()
            scope.cancel()


def _tagged(event: StreamEvent, request_id: str | int | None, extra: Mapping[str, str] | None = None) -> bytes:
    """`event` as one line of JSON with the request's `id` (and `extra` in stream_start's metadata)."""
    obj = event.to_dict()
    if extra and event.type == "metadata" and event.data == "stream_start":
        obj["metadata"] = {**obj["metadata"], **extra}
    if request_id is not None:
        obj["id"] = request_id
    return orjson.dumps(obj) + b"\n"
