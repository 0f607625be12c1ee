"""
The OpenAI Responses front: `POST /v1/responses`, streamed (`_responses_front` renders the
events) or not (the same events folded into the Response object the stream ends with),
WebSocket mode on the same path (`_responses_websocket`), and the stored responses:
`GET /v1/responses/{id}` (the object, or with `stream=true` its events after
`starting_after`, then the live ones), `GET /v1/responses/{id}/input_items`, `POST
/v1/responses/{id}/cancel`, `DELETE`; and `POST /v1/responses/input_tokens` and `POST
/v1/responses/compact`, forwarded to a Responses upstream (input tokens are estimated for any
other; compaction is refused, as only the Responses API has it). Errors are OpenAI's error
object.

A Responses upstream's events pass through: byte for byte to a streaming client that stores
nothing (`store: false`, as Codex sends); for a stored response, through the store, with the
store's id in place of the upstream's.

A response with `store` (the API's default) runs as a resumable stream in the shared
registry (`Core.share`, `[streams]`: count, bytes and age bounds), under its own id: the
request is its first watcher, a `GET ?stream=true` another, replaying the log first, so no
event is missed or repeated and the upstream is asked once. A response is kept while it runs
and for `[streams] retention` seconds after; `previous_response_id` continues a kept one by
rebuilding the conversation (its input and output, then the new input), which is how an
upstream without the notion gets it. With `[redis]`, a stored response's conversation is kept
there too once it ends (`keep_conversation`), so that another process continues it and lists
its input items. Without `background`, the response ends when its last
watcher goes away (the upstream is cancelled at once, as on every front); with it, the
response runs on with nobody watching until it ends or is cancelled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Final

import orjson
from quart import Response, request
from quart_trio import QuartTrio

from ..._events import estimated_tokens
from ..._exceptions import NotFoundError, RequestError, SharedStateError, StreamCancelled, TrioproxyError
from ..._request import ChatRequest, parse_json_object
from ..._sse import SSEDecoder, encode_typed_event
from ...pipeline import Pipeline, StreamSession
from .._core import SSE, Core, json_response, rendered_answer, watch_remote_response, watch_response
from .._generic import prompt_chars
from .._responses_front import ResponsesEventRenderer, response_from_events
from .._responses_request import Turn, continued, input_items, listed_input_items, parse_responses_request
from .._responses_websocket import register_responses_websocket
from .._streams import BroadcastStream, RendererFactory, Watcher
from .openai_chat import error_response

__all__ = ["error_response", "owns", "register"]

logger = logging.getLogger("trioproxy.responses")

PREFIX: Final = "resp_"
"""The ids of stored responses, in the registry the generic endpoints' streams share."""


AFTER_EVERY_EVENT: Final = 2**63 - 1
"""An event id past every stream's last: the shared store read after it says only where the stream is."""


def owns(path: str) -> bool:
    return path == "/v1/responses" or path.startswith("/v1/responses/")


def _error(error: TrioproxyError) -> Response:
    return error_response("/v1/responses", error)


def _encode(payload: dict[str, Any], event_id: int) -> bytes:
    """A stored response's events: event id `n` is `sequence_number` `n - 1`, which the payload carries."""
    return encode_typed_event(payload)


def _renderer(stream: BroadcastStream) -> ResponsesEventRenderer:
    renderer = stream.renderer
    assert isinstance(renderer, ResponsesEventRenderer)
    return renderer


def register(app: QuartTrio, core: Core) -> None:
    routes = _Routes(core)
    app.post("/v1/responses")(routes.create)
    app.post("/v1/responses/input_tokens")(routes.input_tokens)
    app.post("/v1/responses/compact")(routes.compact)
    app.get("/v1/responses/<response_id>/input_items")(routes.list_input_items)
    app.get("/v1/responses/<response_id>")(routes.retrieve)
    app.post("/v1/responses/<response_id>/cancel")(routes.cancel)
    app.delete("/v1/responses/<response_id>")(routes.delete)
    register_responses_websocket(app, core, routes.stored_turn, routes.share)


class _Routes:
    """The routes' handlers, and the store lookups they and WebSocket mode share."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def stored(self, response_id: str) -> BroadcastStream:
        stream = self.core.streams.get(response_id) if response_id.startswith(PREFIX) else None
        if stream is None:
            raise _not_stored(response_id)
        return stream

    async def stored_turn(self, response_id: str) -> Turn:
        """What `previous_response_id` continues: a stored response that ended with an answer."""
        try:
            status, turn = await self.conversation(response_id)
        except NotFoundError as exc:
            raise NotFoundError(exc.message, code="previous_response_not_found", param="previous_response_id") from None
        except RequestError as exc:
            raise RequestError(exc.message, param="previous_response_id") from None
        if status not in ("completed", "incomplete"):
            raise RequestError(
                f"response {response_id!r} is {status}: only a finished answer can be continued",
                param="previous_response_id",
            )
        return turn

    async def conversation(self, response_id: str) -> tuple[str, Turn]:
        """
        A stored response's status and conversation: held here, or else (`[redis]`) as the
        process that ran it kept it when it ended. Raises `NotFoundError`, `RequestError` for
        one still running on another process, or `SharedStateError` when Redis fails.
        """
        if not response_id.startswith(PREFIX):
            raise _not_stored(response_id)
        stream = self.core.streams.get(response_id)
        if stream is not None:
            return _conversation(stream)
        store = self.core.streams.store
        kept = await store.read_conversation(response_id)
        if kept is None:
            logged = await store.read_events(response_id, AFTER_EVERY_EVENT)
            if logged is None:
                raise _not_stored(response_id)
            if not logged.ended:
                raise RequestError(
                    f"response {response_id!r} is in_progress on another process: "
                    "only there until it ends, then on any process"
                )
            raise NotFoundError(
                f"response {response_id!r} ended on another process, which could not share its conversation "
                "(over [streams] max_replay_bytes, or Redis failed): only that process has it"
            )
        conversation = orjson.loads(kept)
        return conversation["status"], Turn(response_id, conversation["input"], conversation["output"])

    async def keep_conversation(self, stream: BroadcastStream) -> None:
        """
        With `[redis]`, once the stored response ends: its conversation kept beside its events,
        for other processes. One over `[streams] max_replay_bytes` is not kept (the log says
        so): it is continued on this process only.
        """
        if not self.core.streams.store.shared:
            return
        await stream.finished_event.wait()
        if self.core.streams.get(stream.id) is not stream:
            return  # deleted meanwhile
        status, turn = _conversation(stream)
        conversation = orjson.dumps({"status": status, "input": turn.input, "output": turn.output})
        bound = self.core.streams.config.max_replay_bytes
        if len(conversation) > bound:
            logger.warning(
                "response %s: its conversation (%d bytes) is over [streams] max_replay_bytes (%d): not kept in Redis, "
                "only this process can continue it or list its input items",
                stream.id,
                len(conversation),
                bound,
            )
            return
        try:
            await self.core.streams.store.keep_conversation(stream.id, conversation)
        except SharedStateError as failure:
            logger.warning(
                "response %s: %s; only this process can continue it or list its input items", stream.id, failure.message
            )

    async def share(
        self, session: StreamSession, chat: ChatRequest, echoed: dict[str, Any]
    ) -> tuple[BroadcastStream, list[bytes], Watcher]:
        """
        A stored response that is not `background`, once its upstream accepted: shared in the
        registry, its requester the first watcher, ending with its last watcher (`Core.share`);
        its conversation kept in Redis once it ends (`keep_conversation_later`).
        """
        stream, backlog, watcher = await self.share_unkept(session, chat, echoed)
        self.keep_conversation_later(stream)
        return stream, backlog, watcher

    def keep_conversation_later(self, stream: BroadcastStream) -> None:
        """With `[redis]`, `keep_conversation` by a task of the app's; without, there is nowhere to keep it."""
        if self.core.streams.store.shared:
            self.core.nursery.start_soon(self.keep_conversation, stream, name=f"response {stream.id} conversation")

    async def share_unkept(
        self, session: StreamSession, chat: ChatRequest, echoed: dict[str, Any]
    ) -> tuple[BroadcastStream, list[bytes], Watcher]:
        """`share`, the caller keeping the conversation (`keep_conversation`)."""
        stream, backlog, watcher = await self.core.share(
            session, _stored_renderer(chat, echoed), shows_notices=False, prefix=PREFIX, encode=_encode
        )
        stream.resume_grace_period = 0.0
        return stream, backlog, watcher

    async def create(self) -> Response:
        try:
            body = parse_json_object(await request.get_data())
            previous_id = body.get("previous_response_id")
            if isinstance(previous_id, str):
                body = continued(body, await self.stored_turn(previous_id))
            chat = parse_responses_request(body)
            echoed = body if previous_id is None else {**body, "previous_response_id": previous_id}
            pipeline = self.core.pipeline(chat.model)
            background = body.get("background") is True
            if background and body.get("store") is False:
                raise RequestError("a background response must be stored: 'store' false cannot be", param="store")
        except TrioproxyError as exc:
            return _error(exc)
        if body.get("store") is False:
            return await self.unstored(pipeline, chat, echoed)
        if background:
            return await self.background(pipeline, chat, echoed)
        return await self.shared(pipeline, chat, echoed)

    async def unstored(self, pipeline: Pipeline, chat: ChatRequest, echoed: dict[str, Any]) -> Response:
        """`store: false`: the session's events straight to the client, or folded into the Response."""
        renderer = ResponsesEventRenderer(request=echoed, model=chat.model, prompt_chars=prompt_chars(chat))
        if chat.stream:
            return await self.core.stream(self.core.start(pipeline, chat), renderer, SSE, _error)
        events = await rendered_answer(self.core.start(pipeline, chat, heartbeats=False, streamed=False), renderer)
        if isinstance(events, TrioproxyError):
            return _error(events)
        return json_response(response_from_events(events))

    async def background(self, pipeline: Pipeline, chat: ChatRequest, echoed: dict[str, Any]) -> Response:
        """`background`: stored, running on with nobody watching; answered once the limits took it."""
        try:  # answered before the session's first item: once the limits (shared or not) took it
            session = await self.core.start_admitted(pipeline, chat, heartbeats=True)  # it may be watched
        except TrioproxyError as exc:
            return _error(exc)
        try:
            stream = self.core.streams.open(session, _stored_renderer(chat, echoed), prefix=PREFIX, encode=_encode)
        except TrioproxyError as exc:  # `max_streams` are running
            session.cancel()
            return _error(exc)
        stream.resume_grace_period = math.inf  # it outlives its request
        self.core.nursery.start_soon(stream.run, name=f"response {stream.id}")
        self.keep_conversation_later(stream)
        if chat.stream:
            return watch_response(stream, *stream.attach())
        return json_response(_renderer(stream).snapshot("queued"))

    async def shared(self, pipeline: Pipeline, chat: ChatRequest, echoed: dict[str, Any]) -> Response:
        """
        Stored, not `background`: the requester watches the shared stream (`share`) to its end.
        Not streamed, it is answered once its conversation is kept (`[redis]`), so that any
        process continues it at once; until then nobody has its id to watch it by, so it is not
        `streamed` either: an error ending it claims no delivered text.
        """
        session = self.core.start(pipeline, chat, heartbeats=chat.stream, streamed=chat.stream)
        try:
            if chat.stream:
                return watch_response(*await self.share(session, chat, echoed))
            stream, backlog, watcher = await self.share_unkept(session, chat, echoed)
        except TrioproxyError as exc:
            return _error(exc)
        events = bytearray(b"".join(backlog))
        try:
            async for data in watcher.receive:
                events += data
        finally:
            stream.detach(watcher)
        await self.keep_conversation(stream)
        failure = _renderer(stream).failure
        if failure is not None:
            return _error(failure)
        return json_response(response_from_events(bytes(events)))

    async def parsed_side_request(self, body: dict[str, Any]) -> ChatRequest:
        """An `input_tokens` or `compact` body, its `previous_response_id` resolved from the store."""
        previous_id = body.get("previous_response_id")
        if isinstance(previous_id, str):
            body = continued({"input": [], **body}, await self.stored_turn(previous_id))
        return parse_responses_request(body)

    async def input_tokens(self) -> Response:
        """A Responses upstream's own count; an estimate, marked so, from any other."""
        try:
            chat = await self.parsed_side_request(parse_json_object(await request.get_data()))
            route = self.core.router.route(chat.model)
            counted = await self.core.ask_upstream(route, chat, lambda upstream, routed: upstream.count_tokens(routed))
            if counted is None:  # what another upstream could not be asked is refused here too, unless it drops it
                chat.common_body(route.provider.drop_params)
        except TrioproxyError as exc:
            return _error(exc)
        if counted is not None:
            return Response(counted, content_type="application/json")
        tools = chat.client_body.get("tools")
        chars = prompt_chars(chat) + (len(orjson.dumps(tools)) if tools else 0)
        return json_response(
            {"object": "response.input_tokens", "input_tokens": estimated_tokens(chars), "estimated": True}
        )

    async def compact(self) -> Response:
        """A Responses upstream's own compaction; refused for any other, which has no such thing."""
        try:
            chat = await self.parsed_side_request(parse_json_object(await request.get_data()))
            route = self.core.router.route(chat.model)
            compacted = await self.core.ask_upstream(route, chat, lambda upstream, routed: upstream.compact(routed))
            if compacted is None:
                raise RequestError(
                    f"model {chat.model!r} is not served by an OpenAI Responses upstream, and only the Responses API "
                    "compacts a conversation (its compaction item is opaque to any other): compact with an ordinary "
                    "response instead",
                    code="unsupported_compaction",
                    param="model",
                )
        except TrioproxyError as exc:
            return _error(exc)
        return Response(compacted, content_type="application/json")

    async def list_input_items(self, response_id: str) -> Response:
        try:
            _, turn = await self.conversation(response_id)
            items = listed_input_items(turn.id, turn.input)
            return json_response(_page(items, request.args))
        except TrioproxyError as exc:
            return _error(exc)

    async def retrieve(self, response_id: str) -> Response:
        streaming = request.args.get("stream") in ("true", "1")
        try:
            after = _starting_after(request.args.get("starting_after")) if streaming else 0
            if not response_id.startswith(PREFIX):
                raise _not_stored(response_id)
            stream = self.core.streams.get(response_id)
            if stream is None:
                return await self.retrieve_elsewhere(response_id, streaming, after)
            renderer = _renderer(stream)
            if not streaming:
                return json_response(renderer.response or renderer.snapshot("queued"))
            _check_starting_after(after, stream.last_id)
            backlog, watcher = stream.attach(after)
        except TrioproxyError as exc:
            return _error(exc)
        return watch_response(stream, backlog, watcher)

    async def retrieve_elsewhere(self, response_id: str, streaming: bool, after: int) -> Response:
        """A response another process runs (or ran), from the shared store (`[redis]`)."""
        remote = await self.core.streams.remote(response_id, after)
        if remote is None:
            raise _not_stored(response_id)
        if not streaming:
            return json_response(_latest_response(response_id, b"".join(remote.backlog)))
        if remote.ended:  # else its events up to `after` may not be written yet
            _check_starting_after(after, remote.last_written)
        return watch_remote_response(remote)

    async def cancel(self, response_id: str) -> Response:
        try:
            stream = self.stored(response_id)
            if _renderer(stream).request.get("background") is not True:
                raise RequestError(
                    f"response {response_id!r} was not created with 'background': only a background response "
                    "can be cancelled (another ends when its client goes away)",
                    param="response_id",
                )
        except TrioproxyError as exc:
            return _error(exc)
        stream.cancel(StreamCancelled("cancelled by the client"))
        await stream.finished_event.wait()
        return json_response(_renderer(stream).response)

    async def delete(self, response_id: str) -> Response:
        try:
            stream = self.stored(response_id)
            await self.core.streams.delete(stream.id)  # from Redis too, where another process could find it
        except TrioproxyError as exc:
            return _error(exc)
        return json_response({"id": stream.id, "object": "response", "deleted": True})


def _not_stored(response_id: str) -> NotFoundError:
    return NotFoundError(f"no response {response_id!r}: it was never stored, or it has expired or been deleted")


def _conversation(stream: BroadcastStream) -> tuple[str, Turn]:
    """A stored response's status (`in_progress` until it ends) and conversation, as `previous_response_id` takes it."""
    renderer = _renderer(stream)
    response = renderer.response
    status = response["status"] if response is not None and stream.finished else "in_progress"
    output = response["output"] if response is not None and stream.finished else []
    return status, Turn(stream.id, input_items(renderer.request), output)


def _stored_renderer(chat: ChatRequest, echoed: dict[str, Any]) -> RendererFactory:
    """The renderer of a stored response to `chat`, whose Response object echoes the request `echoed`."""

    def renderer_for(response_id: str, frame: Callable[[Any], bytes]) -> ResponsesEventRenderer:
        return ResponsesEventRenderer(
            request=echoed, model=chat.model, prompt_chars=prompt_chars(chat), frame=frame, response_id=response_id
        )

    return renderer_for


def _starting_after(value: str | None) -> int:
    """The event id a replay starts after: `starting_after` is a sequence number, one less than its event's id."""
    if value is None:
        return 0
    try:
        sequence_number = int(value)
    except ValueError:
        raise RequestError("'starting_after' must be an integer", param="starting_after") from None
    if sequence_number < -1:
        raise RequestError(
            f"'starting_after' {sequence_number} is not an event of this response", param="starting_after"
        )
    return sequence_number + 1


def _check_starting_after(after: int, last_id: int) -> None:
    if after > last_id:
        raise RequestError(
            f"'starting_after' {after - 1} is not an event of this response (its last is {last_id - 1})",
            param="starting_after",
        )


DEFAULT_PAGE: Final = 20
MAX_PAGE: Final = 100


def _page(items: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """
    One page of a list, as OpenAI's list endpoints give it: `order` (`desc`, the default, or
    `asc`), then the items after the id `after` or before the id `before`, at most `limit`
    (1-100, default 20).
    """
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise RequestError("'order' must be 'asc' or 'desc'", param="order")
    try:
        limit = int(args.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise RequestError(f"'limit' must be an integer from 1 to {MAX_PAGE}", param="limit")
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    start, end = 0, len(ordered)
    for name in ("after", "before"):
        cursor = args.get(name)
        if cursor is None:
            continue
        if cursor not in ids:
            raise RequestError(f"'{name}' {cursor!r} is not an input item of this response", param=name)
        if name == "after":
            start = ids.index(cursor) + 1
        else:
            end = ids.index(cursor)
    window = ordered[start:end]
    data = window[:limit] if args.get("before") is None or args.get("after") is not None else window[-limit:]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(data) < len(window),
    }


def _latest_response(response_id: str, events: bytes) -> dict[str, Any]:
    """The Response object as the newest of a stored response's events carries it (`queued`: none yet)."""
    latest: dict[str, Any] = {"id": response_id, "object": "response", "status": "queued"}
    for event in SSEDecoder().feed(events):
        payload = orjson.loads(event.data)
        if isinstance(payload.get("response"), dict):
            latest = payload["response"]
    return latest
