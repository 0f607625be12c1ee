"""
The quart-trio application: the one place that touches quart (with `_serve.py` for
hypercorn).

The generic SSE endpoints are different: their generation is not tied to the request that
started it. It runs as a broadcast task (`_streams.py`) that any number of responses watch,
the POST being the first; `GET /v1/streams/{id}` attaches another, replaying what it missed
after its `Last-Event-ID`. A watcher that goes away only detaches; the upstream is cancelled
when no watcher is left for `[streams].resume_grace_period`.

Each streaming request starts a session (`pipeline.start_session`) in the app's nursery and
holds back its preamble (the upstream's acceptance, the role chunk) until something the client
must see now: the first token (or finish reason, or usage), a heartbeat that is due, a retry
notice the front shows (`_generic.commits`). An error before that still becomes an HTTP status
with the protocol's error body; otherwise the response is committed as 200 with the held items
first, and from its first body write on the session's own tasks write the rest straight to
the ASGI `send` (`deliver_to`): a token then crosses no task switch between the upstream and
the client. The body generator only waits for the session to end and writes its last word;
its `finally` cancels the session, so a client that goes away — at any point — takes its
upstream request with it.

`start` is also where `[limits]` are applied, once for every route (WebSocket included): a
session starts only if its body's shape is within bounds and the limiter admits its client,
and it holds its lease until its task ends. A refusal is raised as our error and rendered in
the route's protocol; nothing reaches the upstream. Bodies are capped by quart's
`MAX_CONTENT_LENGTH` while they are read, and the cap is reported as our 413.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import orjson
import trio
from quart import Response, has_request_context, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge, RequestTimeout
from werkzeug.routing import WebsocketMismatch

from .._config import Config
from .._events import StreamEvent
from .._exceptions import (
    AuthenticationError,
    HTTPRefusal,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    TrioproxyError,
    UpstreamTimeoutError,
)
from .._limits import Limiter, check_request_shape
from .._request import ChatRequest, parse_chat_request, parse_json_object
from .._router import Router
from .._version import __version__
from ..pipeline import Pipeline, SessionItem, StreamSession, pipeline_for, start_session
from ._access import RECORD, AccessLog, RequestRecord
from ._anthropic_front import AnthropicEventRenderer, message_from_events, model_list, token_count_estimate
from ._anthropic_front import error_body as anthropic_error_body
from ._anthropic_request import parse_messages_request
from ._auth import key_is_valid, presented_key
from ._cors import CorsMiddleware
from ._events_front import EventRenderer, error_event, ndjson_frame, sse_frame
from ._generic import Renderer, StreamInterrupted, commits, generic_chat_request, last_word, prompt_chars, render
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Metrics
from ._openai_front import OpenAIChunkRenderer, completion_body, error_body
from ._shutdown import GracefulShutdown
from ._streams import BroadcastStream, StreamRegistry, Watcher
from ._websocket import register_websocket_routes

__all__ = ["create_app"]

logger = logging.getLogger("trioproxy.server")

STREAM_HEADERS: Final = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE: Final = "text/event-stream"
NDJSON: Final = "application/x-ndjson"
#: Where each HTTP request's ASGI `send` is kept in its scope, for `_relay`.
ASGI_SEND: Final = "trioproxy.send"
#: The generic event endpoints: how each frames its events (errors included), and as what.
GENERIC_ENDPOINTS: Final[dict[str, tuple[Callable[[StreamEvent], bytes], str]]] = {
    "/v1/chat/stream": (sse_frame, SSE),
    "/v1/stream/sse": (sse_frame, SSE),
    "/v1/chat/stream/json": (ndjson_frame, NDJSON),
}
#: Preamble items a response holds back before its head, at most: a bound on an upstream that
#: sends nothing but content-less chunks (and on the role chunks of retried attempts).
MAX_HELD_ITEMS: Final = 16
#: The playground is one self-contained page: it may run its own inline code and talk to this
#: origin, and nothing else (no CDN, no framing).
PLAYGROUND_HEADERS: Final = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def create_app(config: Config, *, router: Router | None = None, shutdown: GracefulShutdown | None = None) -> QuartTrio:
    """
    The proxy as an ASGI app; `router` replaces the one built from `config` (tests);
    `shutdown` is the graceful shutdown the serve layer triggers (`_shutdown.py`).
    """
    app = QuartTrio("trioproxy")
    app.config["RESPONSE_TIMEOUT"] = None  # LLM streams outlive Quart's 60 s default
    app.config["MAX_CONTENT_LENGTH"] = config.limits.max_body_bytes  # bodies are not read past it
    app.config["BODY_TIMEOUT"] = config.server.body_timeout  # a body still arriving then is a 408
    app.asgi_app = _keeping_send(app.asgi_app)  # type: ignore[method-assign]
    if config.cors.enabled:
        app.asgi_app = CorsMiddleware(app.asgi_app, config.cors)  # type: ignore[method-assign]
    router = router or Router(config)
    shutdown = shutdown or GracefulShutdown(config.server.shutdown_grace_period)

    active = shutdown.streams
    streams = StreamRegistry(config.streams)
    metrics = Metrics(active_streams=active.__len__)
    access_log = AccessLog(
        app.asgi_app, metrics=metrics, enabled=config.logging.access_log, include_prompts=config.logging.include_prompts
    )
    app.asgi_app = access_log  # type: ignore[method-assign]
    limits = config.limits
    limiter = Limiter(
        requests_per_minute=limits.requests_per_minute,
        max_streams_per_key=limits.max_streams_per_key,
        max_concurrent_streams=limits.max_concurrent_streams,
    )

    def start(
        pipeline: Pipeline, chat: ChatRequest, *, heartbeats: bool = True, stream_id: str | None = None
    ) -> StreamSession:
        """
        Start a session for the current request (or a WebSocket's stream `stream_id`), if
        `[limits]` allow it: raises `RequestError` for a body of the wrong shape,
        `RateLimitedError` or `OverloadedError` when the limiter refuses the client.
        """
        check_request_shape(
            chat.client_body, max_messages=limits.max_messages, max_string_chars=limits.max_string_chars
        )
        lease = limiter.admit(client_identity(), trio.current_time())
        record: RequestRecord = _connection().scope[RECORD]

        def on_end(session: StreamSession) -> None:
            lease.release()
            metrics.observe_stream(session)
            if stream_id is not None:  # a WebSocket stream: its own log line
                access_log.log_stream(session, request_id=record.id, route=record.route, stream_id=stream_id)

        nursery: trio.Nursery = app.nursery  # type: ignore[attr-defined]
        try:
            session = start_session(
                nursery, pipeline, chat, heartbeats=heartbeats, endpoint=_route(), registry=active, on_end=on_end
            )
        except BaseException:
            lease.release()
            raise
        if stream_id is None:
            record.session = session
        shutdown.admit(session)  # while draining, its first item is the refusal
        return session

    def client_identity() -> str:
        """Who the limits count against: the client key when keys are on, else the address."""
        connection = _connection()
        if config.auth.enabled:
            return "key:" + (presented_key(connection.headers) or "")
        return "address:" + (connection.scope.get("client") or ("unknown",))[0]

    shutdown.on_drain(streams.stop_resuming)  # nobody can come back to resume a stream

    @app.before_serving
    async def expire_idle_upstream_connections() -> None:
        """The pools' timers live in the app's nursery, from start-up until `close_upstreams` ends them."""
        app.nursery.start_soon(router.expire_idle_connections)  # type: ignore[attr-defined]

    @app.after_serving
    async def close_upstreams() -> None:
        await router.aclose()

    async def name_route_and_check_key() -> Response | None:
        """
        Before every request and WebSocket: name its route in its `RequestRecord`, then answer
        a 401 in the protocol of its path when client keys are on and none valid was shown.
        """
        connection = _connection()
        connection.scope[RECORD].route = _route()
        path = connection.path
        if not config.auth.enabled or not (
            path.startswith("/v1/") or path == "/metrics" and config.auth.protect_metrics
        ):
            return None
        if key_is_valid(presented_key(connection.headers), config.auth.keys):
            return None
        error = AuthenticationError(
            "missing or invalid API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            code="invalid_api_key",
        )
        response = _error_response(path, error)
        response.headers["www-authenticate"] = "Bearer"
        return response

    app.before_request(name_route_and_check_key)
    app.before_websocket(name_route_and_check_key)

    @app.get("/")
    async def playground() -> Response:
        """The playground page; open even with client keys on (its own requests carry the key)."""
        return Response(_playground_page(), content_type="text/html; charset=utf-8", headers=PLAYGROUND_HEADERS)

    @app.before_request
    async def refuse_while_draining() -> Response | None:
        """A request that reaches the app during the drain: 503, retry elsewhere (`/health` says why)."""
        if not shutdown.draining or request.path == "/health":
            return None
        response = _error_response(request.path, shutdown.refusal())
        if request.http_version in ("1.0", "1.1"):  # HTTP/2 forbids the header (and closes by GOAWAY)
            response.headers["connection"] = "close"
        return response

    @app.get("/health")
    async def health() -> Response:
        providers = {name: {"type": p.type} for name, p in config.providers.items()}
        status = "draining" if shutdown.draining else "ok"  # a draining instance takes no new work
        body = {"status": status, "version": __version__, "providers": providers, "active_streams": len(active)}
        return _json(body, status=503 if shutdown.draining else 200)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        """The routable models, in Anthropic's list shape for a client that names its API version."""
        if "anthropic-version" in request.headers:
            return _json(model_list(router.models()))
        data = [{"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in router.models()]
        return _json({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        try:
            chat = parse_chat_request(parse_json_object(await request.get_data()))
            pipeline = pipeline_for(router, router.route(chat.model))
        except TrioproxyError as exc:
            return _openai_error(exc)
        if not chat.stream:
            return await _complete(pipeline, chat)
        renderer = OpenAIChunkRenderer(model=chat.model, include_usage=chat.include_usage)
        return await _stream(start(pipeline, chat), renderer, SSE, _openai_error)

    async def _complete(pipeline: Pipeline, chat: ChatRequest) -> Response:
        """A non-streaming answer, built from the upstream's stream (so retries and stages apply)."""
        session = start(pipeline, chat, heartbeats=False)
        try:
            async for item in session.output:
                if isinstance(item, TrioproxyError):
                    return _openai_error(item)
            if not session.completed:
                return _openai_error(StreamInterrupted("the server ended the request before it completed"))
            return _json(completion_body(session.accumulator, model=chat.model, prompt_chars=prompt_chars(chat)))
        finally:
            session.cancel()

    @app.post("/v1/messages")
    async def messages() -> Response:
        try:
            chat = parse_messages_request(parse_json_object(await request.get_data()), request.headers)
            pipeline = pipeline_for(router, router.route(chat.model))
        except TrioproxyError as exc:
            return _anthropic_error(exc)
        renderer = AnthropicEventRenderer(model=chat.model, prompt_chars=prompt_chars(chat))
        if not chat.stream:
            return await _message(pipeline, chat, renderer)
        return await _stream(start(pipeline, chat), renderer, SSE, _anthropic_error)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens() -> Response:
        """An Anthropic upstream's own count; an estimate, marked so, from any other."""
        try:
            chat = parse_messages_request(parse_json_object(await request.get_data()), request.headers, counting=True)
            route = router.route(chat.model)
            timeout = route.provider.timeouts.first_token_timeout
            with trio.move_on_after(timeout or math.inf) as waited:
                counted = await route.upstream.count_tokens(chat.routed(route.upstream_model))
            if waited.cancelled_caught:
                raise UpstreamTimeoutError(
                    f"no answer from the upstream within first_token_timeout ({timeout:g} s)",
                    kind="first_token_timeout",
                )
        except TrioproxyError as exc:
            return _anthropic_error(exc)
        if counted is None:
            tools = chat.client_body.get("tools")
            return _json(token_count_estimate(prompt_chars(chat) + (len(orjson.dumps(tools)) if tools else 0)))
        return Response(counted, content_type="application/json")

    async def _message(pipeline: Pipeline, chat: ChatRequest, renderer: AnthropicEventRenderer) -> Response:
        """A non-streaming Messages answer: the stream's events, folded into one `Message`."""
        session = start(pipeline, chat, heartbeats=False)
        try:
            events = bytearray()
            async for item in session.output:
                if isinstance(item, TrioproxyError):
                    return _anthropic_error(item)
                events += render(renderer, item)
            if not session.completed:
                return _anthropic_error(StreamInterrupted("the server ended the request before it completed"))
            return _json(message_from_events(bytes(events + renderer.done(session))))
        except TrioproxyError as exc:  # the upstream's tool input is not JSON
            return _anthropic_error(exc)
        finally:
            session.cancel()

    def generic_endpoint(frame: Callable[[StreamEvent], bytes], content_type: str) -> Callable[[], Any]:
        error_response = functools.partial(_event_error, frame, content_type)

        async def endpoint() -> Response:
            request_id = request.scope[RECORD].id
            try:
                body = parse_json_object(await request.get_data())
                chat, provider, buffer = generic_chat_request(body)
                route = router.route(chat.model, provider=provider)
                pipeline = pipeline_for(router, route, buffer=buffer)
            except TrioproxyError as exc:
                return error_response(exc)

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

            if frame is sse_frame:  # resumable and shareable; NDJSON stays tied to its request
                response = await _shared_stream(start(pipeline, chat), renderer_for, error_response)
            else:
                response = await _stream(start(pipeline, chat), renderer_for(None, frame), content_type, error_response)
            return response

        return endpoint

    async def _shared_stream(
        session: StreamSession,
        renderer_for: Callable[[str, Callable[[StreamEvent], bytes]], EventRenderer],
        error_response: Callable[[TrioproxyError], Response],
    ) -> Response:
        """
        Like `_stream`, but once the upstream accepted, the generation becomes a resumable
        stream (its own broadcast task) with this request as its first watcher.
        """
        try:
            opening = await _opening(session, shows_notices=True)
            if isinstance(opening, TrioproxyError):
                session.cancel()
                return error_response(opening)
            stream = streams.open(session, renderer_for)
        except TrioproxyError as exc:  # `max_streams` are running
            session.cancel()
            return error_response(exc)
        except BaseException:
            session.cancel()
            raise
        for item in opening:  # logged before the first watcher attaches: it gets them as one write
            stream.publish(item)
        backlog, watcher = stream.attach()
        app.nursery.start_soon(stream.run, name=f"stream {stream.id}")  # type: ignore[attr-defined]
        return _watch_response(stream, backlog, watcher)

    @app.get("/v1/streams/<stream_id>")
    async def watch_stream(stream_id: str) -> Response:
        """Attach to a running or recently finished stream, after its `Last-Event-ID`."""
        stream = streams.get(stream_id)
        if stream is None:
            return _sse_error(NotFoundError(f"no stream {stream_id!r}: it never existed or it has expired"))
        last_event_id = request.headers.get("last-event-id", "").strip()
        if last_event_id and not (last_event_id.isascii() and last_event_id.isdigit()):
            return _sse_error(
                RequestError(f"Last-Event-ID must be an event id of this stream, got {last_event_id[:40]!r}")
            )
        after = int(last_event_id or 0)
        if after > stream.last_id:
            return _sse_error(RequestError(f"Last-Event-ID {after} is ahead of the stream (at {stream.last_id})"))
        try:
            backlog, watcher = stream.attach(after)
        except TrioproxyError as exc:  # the events after `after` are no longer kept
            return _sse_error(exc)
        return _watch_response(stream, backlog, watcher)

    register_websocket_routes(
        app,
        start=start,
        router=router,
        max_message_bytes=limits.max_body_bytes,
        write_timeout=config.server.write_timeout,
        shutdown=shutdown,
    )

    for path, (frame, content_type) in GENERIC_ENDPOINTS.items():
        name = path.removeprefix("/v1/").replace("/", "_")
        app.add_url_rule(path, name, generic_endpoint(frame, content_type), methods=["POST"])

    @app.errorhandler(TrioproxyError)
    async def refusal(exc: TrioproxyError) -> Response:
        """A refusal raised by `start` (limits), in the protocol of the route."""
        return _error_response(_connection().path, exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        """
        The framework's refusals (no route, wrong method, a body too large or too slow), in
        our words and in the protocol of the path; also before a WebSocket handshake, which
        then gets this HTTP response instead of an upgrade.
        """
        connection = _connection()
        path = connection.path
        if isinstance(exc, RequestEntityTooLarge):  # quart's MAX_CONTENT_LENGTH
            too_large = PayloadTooLargeError(f"the request body is over the limit of {limits.max_body_bytes} bytes")
            return _error_response(path, too_large)
        status = exc.code or 500
        if has_websocket_context() and isinstance(exc, (NotFound, WebsocketMismatch, MethodNotAllowed)):
            message, status = f"no WebSocket endpoint at {path}", 404
        elif isinstance(exc, WebsocketMismatch):
            message = (
                f"{path} is a WebSocket endpoint: open it with a WebSocket handshake (GET with Upgrade: websocket)"
            )
        elif isinstance(exc, NotFound):
            message = f"no endpoint at {connection.method} {path}"
        elif isinstance(exc, MethodNotAllowed):
            allowed = ", ".join(sorted(exc.valid_methods or ()))  # a set: in a stable order
            message = f"{connection.method} is not allowed on {path} (allowed: {allowed})"
        elif isinstance(exc, RequestTimeout):  # quart's BODY_TIMEOUT
            message = f"the request body did not arrive within [server] body_timeout ({config.server.body_timeout:g} s)"
        else:
            message = exc.description or exc.name
        error = HTTPRefusal(message, status=status)
        response = _error_response(path, error)  # e.g. a GET on a generic endpoint: its own shape
        for name, value in exc.get_headers():
            if name.lower() == "allow" and status == 405:
                response.headers["allow"] = value
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        connection = _connection()  # a WebSocket's before-hook may raise too
        logger.exception("unhandled error in %s %s", connection.method, connection.path)
        return _error_response(connection.path, TrioproxyError("internal server error"))

    return app


def _connection() -> Any:
    """The current request, or else the current WebSocket."""
    return request if has_request_context() else websocket


def _route() -> str:
    """The matched URL rule of the current request or WebSocket: a bounded label, unlike its path."""
    rule = _connection().url_rule
    return rule.rule if rule is not None else "unmatched"


@functools.cache
def _playground_page() -> bytes:
    """Read once from the package's data: the page needs no build step and fetches nothing."""
    return (importlib.resources.files(__package__) / "static" / "playground.html").read_bytes()


async def _opening(session: StreamSession, *, shows_notices: bool) -> list[SessionItem] | TrioproxyError:
    """
    The session's first items, up to one that commits the response (`commits`), or the error
    that ended it before: the items held back until then are few and small, and at most
    `MAX_HELD_ITEMS` of them.
    """
    held: list[SessionItem] = []
    while len(held) < MAX_HELD_ITEMS:
        try:
            item = await session.output.receive()
        except trio.EndOfChannel:
            if held:
                break  # its last word follows what it said
            return StreamInterrupted("the server ended the request before the upstream answered")
        if isinstance(item, TrioproxyError):
            return item
        held.append(item)
        if commits(item, shows_notices=shows_notices):
            break
    return held


async def _stream(
    session: StreamSession,
    renderer: Renderer,
    content_type: str,
    error_response: Callable[[TrioproxyError], Response],
) -> Response:
    """
    Wait until the session has something the client must see (`_opening`): an error before
    that still gets an HTTP status and the protocol's error body; else the response is
    committed as a 200 stream, and its head carries every item held until then, in order.
    """
    try:
        opening = await _opening(session, shows_notices=renderer.shows_notices)
    except BaseException:
        session.cancel()
        raise
    if isinstance(opening, TrioproxyError):
        session.cancel()
        return error_response(opening)
    head = b"".join(render(renderer, item) for item in opening)
    body = _relay(session, renderer, head, request.scope[ASGI_SEND])
    return Response(body, status=200, content_type=content_type, headers=STREAM_HEADERS)


class _BodyWriter:
    """Writes the session's items, rendered, to the response through its ASGI `send`, while it lasts."""

    def __init__(self, renderer: Renderer, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._renderer = renderer
        self._send = send
        self.relaying = True
        """False once the response ended: the client is gone."""

    async def send(self, item: SessionItem) -> None:
        out = render(self._renderer, item)
        if out and self.relaying:
            await self._send({"type": "http.response.body", "body": out, "more_body": True})


async def _relay(
    session: StreamSession, renderer: Renderer, head: bytes, send: Callable[[dict[str, Any]], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """
    The response body. Once quart has written its head, the session's tasks write its items
    themselves, through the request's own ASGI `send` (the one quart writes with); this only
    waits for the session to end, and then writes its last word. Never yields inside a nursery.
    """
    writer = _BodyWriter(renderer, send)
    try:
        yield head
        session.deliver_to(writer)
        await session.finished.wait()
        if not session.failed:  # an error was the session's own last word
            yield last_word(renderer, session)
    finally:
        writer.relaying = False
        session.cancel()


def _keeping_send(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """The app, keeping each HTTP request's `send` in its scope (at `ASGI_SEND`) for `_relay`."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        scope[ASGI_SEND] = send
        try:
            await app(scope, receive, send)
        finally:
            del scope[ASGI_SEND]

    return asgi


def _watch_response(stream: BroadcastStream, backlog: list[bytes], watcher: Watcher) -> Response:
    headers = {**STREAM_HEADERS, "x-stream-id": stream.id}
    return Response(_watch(stream, backlog, watcher), status=200, content_type=SSE, headers=headers)


async def _watch(stream: BroadcastStream, backlog: list[bytes], watcher: Watcher) -> AsyncIterator[bytes]:
    """A watcher's response body: the replayed events, then the live ones. Never yields inside a nursery."""
    try:
        if backlog:
            yield b"".join(backlog)
        async for data in watcher.receive:
            yield data
    finally:
        stream.detach(watcher)


def _error_response(path: str, error: TrioproxyError) -> Response:
    """
    `error` in the protocol of the route at `path`: an `error` event on the generic endpoints,
    Anthropic's error object under `/v1/messages`, else OpenAI's.
    """
    if path in GENERIC_ENDPOINTS:
        return _event_error(*GENERIC_ENDPOINTS[path], error)
    if path.startswith("/v1/streams/"):
        return _sse_error(error)
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return _anthropic_error(error)
    return _openai_error(error)


def _event_error(frame: Callable[[StreamEvent], bytes], content_type: str, error: TrioproxyError) -> Response:
    """`error` as one `error` event of the generic endpoints, framed by `frame`."""
    response = Response(frame(error_event(error)), status=error.status, content_type=content_type)
    return _with_retry_after(response, error)


def _sse_error(error: TrioproxyError) -> Response:
    return _event_error(sse_frame, SSE, error)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status=status, content_type="application/json")


def _openai_error(error: TrioproxyError) -> Response:
    return _with_retry_after(_json(error_body(error), status=error.status), error)


def _anthropic_error(error: TrioproxyError) -> Response:
    return _with_retry_after(_json(anthropic_error_body(error), status=error.status), error)


def _with_retry_after(response: Response, error: TrioproxyError) -> Response:
    """`Retry-After` in whole seconds, rounded up, when the error says when to ask again."""
    if error.retry_after is not None:
        response.headers["retry-after"] = str(math.ceil(error.retry_after))
    return response
