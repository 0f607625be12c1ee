"""
WebSocket mode of the Responses front: `GET /v1/responses` upgraded, as Codex and the openai
SDK derive it from the base URL (`responses_protocol.md` §4).

- The client sends one text frame per turn, `{"type": "response.create", ...the create
  body...}`; `stream` and `background` are ignored (Codex sends `"stream": true`).
- The server answers with the same events as the SSE stream, one JSON text frame each, from
  `response.created` to exactly one of `response.completed`, `response.incomplete` or
  `response.failed`; a Responses upstream's own events pass through, each event's data one
  frame, under the upstream's id.
- `"generate": false` (Codex sends it first, to warm the connection up) asks for no output:
  the answer is `response.created`, `response.in_progress` and `response.completed` with an
  empty output, and nothing is asked upstream; its id continues like any other.
- Responses run one at a time, in the order they were asked for: Codex waits for one to end
  before it asks for the next. A frame that arrives meanwhile waits its turn.
- With `store` (the API's default) a response is stored as one made over HTTP is (`share`):
  `GET /v1/responses/{id}`, its replay and `previous_response_id` on another connection work;
  it still ends with its requester (the connection) unless another watcher follows it.
  `store: false` (as Codex sends) keeps nothing.
- The connection remembers its last response, so the next one may send only its new items
  with `previous_response_id` (as Codex does, also with `store: false`): the conversation is
  rebuilt from the earlier input and output. Another id is looked up among the stored
  responses (`lookup`), and refused with `previous_response_not_found` if it is not there.
- A request that fails before its first event (malformed, unknown model, `[limits]`, the
  upstream's refusal, a timeout before the first token) is one `error` frame with its HTTP
  `status` (also as `status_code`, which older Codex reads), as OpenAI sends it, and the
  connection stays open. Once `response.created` is sent, a failure ends the response with
  `error` and `response.failed`, as over SSE.

The client going away cancels the handler, and with it the session and its upstream request.
Keep-alive is hypercorn's WebSocket ping, as on the other WebSocket endpoints. When the server
drains, a response running finishes, a new one is refused (503), and the connection is closed
with 1001 (going away) between responses, which makes Codex reconnect elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import trio
from quart import websocket
from quart_trio import QuartTrio

from .._exceptions import PayloadTooLargeError, RequestError, TrioproxyError
from .._request import ChatRequest
from .._sse import SSEDecoder
from ..pipeline import StreamSession
from ._core import Core
from ._generic import last_word, prompt_chars, render_for
from ._responses_front import ResponsesEventRenderer, websocket_frame
from ._responses_request import Turn, continued, input_items, parse_responses_request
from ._streams import BroadcastStream, Watcher
from ._websocket import GOING_AWAY

__all__ = ["register_responses_websocket"]

logger = logging.getLogger("trioproxy.server")

IGNORED: Final = ("type", "stream", "background", "generate")
"""Fields of a `response.create` frame that are not part of the request."""


Lookup = Callable[[str], Awaitable[Turn]]
"""`lookup(id)`: the stored response `id` as `previous_response_id` continues it."""
Share = Callable[[StreamSession, ChatRequest, dict[str, Any]], Awaitable[tuple[BroadcastStream, list[bytes], Watcher]]]
"""How a stored response runs: its session, request and echoed body → its stream, backlog and watcher."""


def register_responses_websocket(app: QuartTrio, core: Core, lookup: Lookup, share: Share) -> None:
    """
    Add the WebSocket route of `/v1/responses` to `app`; `lookup(id)` finds a stored
    response for `previous_response_id`, or raises; `share` runs a stored one. A frame over `[limits]
    max_body_bytes` is refused unread; a peer that does not read for `[server] write_timeout`
    seconds is dropped.
    """
    responder = _Responder(core, lookup, share)

    @app.websocket("/v1/responses")
    async def responses_ws() -> None:
        await websocket.accept()
        responding = trio.Lock()
        """Held while a response runs: the drain closes the connection only between responses."""

        async def close_when_drained(nursery: trio.Nursery) -> None:
            await core.shutdown.wait_draining()
            async with responding:
                await websocket.close(GOING_AWAY, "the server is shutting down")
                nursery.cancel_scope.cancel()

        previous: Turn | None = None
        turn = 0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_when_drained, nursery)
                while True:
                    text = await websocket.receive()
                    turn += 1
                    async with responding:
                        try:
                            previous = await responder.respond(text, previous, turn)
                        except TrioproxyError as exc:
                            await responder.send_error(exc)
        except* trio.TooSlowError:  # raised by a write in the nursery's body: it comes in a group
            logger.warning("dropping a WebSocket peer that stopped reading")


class _Responder:
    """Answers a connection's `response.create` frames (one at a time: the route holds a lock)."""

    def __init__(self, core: Core, lookup: Lookup, share: Share) -> None:
        self.core = core
        self.lookup = lookup
        self.share = share

    async def send(self, frames: bytes) -> None:
        for frame in frames.splitlines():
            with trio.fail_after(self.core.config.server.write_timeout):
                await websocket.send(frame.decode())

    async def send_error(self, error: TrioproxyError) -> None:
        body = {"type": error.type, "code": error.code, "message": error.message, "param": error.param}
        frame = {"type": "error", "status": error.status, "status_code": error.status, "error": body}
        await self.send(orjson.dumps(frame))

    async def respond(self, text: str | bytes, previous: Turn | None, turn: int) -> Turn | None:
        """One `response.create`: its events sent, and the turn a next one may continue."""
        frame = _response_create(text, self.core.config.limits.max_body_bytes)
        body = {key: value for key, value in frame.items() if key not in IGNORED}
        previous_id = body.get("previous_response_id")
        if isinstance(previous_id, str):
            body = continued(body, await _previous_turn(previous_id, previous, self.lookup))
        chat = parse_responses_request({**body, "stream": True})
        echoed = body if previous_id is None else {**body, "previous_response_id": previous_id}
        pipeline = self.core.pipeline(chat.model)
        renderer = ResponsesEventRenderer(
            request=echoed,
            model=chat.model,
            prompt_chars=prompt_chars(chat),
            frame=websocket_frame,
        )
        if frame.get("generate") is False:  # only an id to continue from: nothing is asked upstream
            await self.send(renderer.done())
            return Turn(renderer.id, input_items(body), [])
        session = self.core.start(pipeline, chat, heartbeats=False, stream_id=str(turn))
        if body.get("store") is not False:
            return await self.stored(session, chat, body, echoed)
        try:
            completed = await _relay(session, renderer, self.send)
        finally:
            session.cancel()
        return _turn(renderer, renderer.id, body) if completed else None

    async def stored(
        self, session: StreamSession, chat: ChatRequest, body: dict[str, Any], echoed: dict[str, Any]
    ) -> Turn | None:
        """A stored response's events, read from its stream's log (SSE) as frames."""
        stream, backlog, watcher = await self.share(session, chat, echoed)  # before its first event: raises
        events = SSEDecoder()
        try:
            for event in events.feed(b"".join(backlog)):
                await self.send(event.data.encode())
            async for data in watcher.receive:
                for event in events.feed(data):
                    await self.send(event.data.encode())
        finally:
            stream.detach(watcher)
        renderer = stream.renderer
        assert isinstance(renderer, ResponsesEventRenderer)
        return _turn(renderer, stream.id, body)


def _turn(renderer: ResponsesEventRenderer, response_id: str, body: dict[str, Any]) -> Turn | None:
    """The turn a next `response.create` may continue: none after a failed response."""
    response = renderer.response
    if response is None or response["status"] == "failed":
        return None
    return Turn(response_id, input_items(body), response["output"])


async def _previous_turn(previous_id: str, last: Turn | None, lookup: Lookup) -> Turn:
    """The turn `previous_response_id` names: the connection's last one, or a stored response."""
    return last if last is not None and last.id == previous_id else await lookup(previous_id)


def _response_create(text: str | bytes, max_message_bytes: int) -> dict[str, Any]:
    """The `response.create` frame `text` is; raises the refusal of any other message."""
    if len(text.encode() if isinstance(text, str) else text) > max_message_bytes:
        raise PayloadTooLargeError(f"a message is over the limit of {max_message_bytes} bytes")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise RequestError("a message must be a JSON object") from None
    if not isinstance(frame, dict) or frame.get("type") != "response.create":
        raise RequestError("a message must be a JSON object of type 'response.create'", param="type")
    return frame


async def _relay(
    session: StreamSession, renderer: ResponsesEventRenderer, send: Callable[[bytes], Awaitable[None]]
) -> bool:
    """
    The session's items, rendered, to `send`; whether the response ended without an error.
    An error before the first event is raised: the client gets it as an `error` frame.
    """
    async for item in session.output:
        if isinstance(item, TrioproxyError) and not renderer.started:
            raise item
        await send(render_for(session, renderer, item))
        if session.failed:  # its error (or the renderer's refusal of the item) was the last word
            return False
    await send(last_word(renderer, session))
    return True
