"""
What every front shares: sessions, limits, metrics, the access log and the stream registry
(`Core`), and how a session becomes an HTTP response (`Core.stream`, `complete`).

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

`Core.start` is also where `[limits]` are applied, once for every route (WebSocket included):
a session starts only if its body's shape is within bounds, and its task first takes a place
in the limits for its client (reserving the tokens it may cost in the token budgets), held
until it ends, when the reservation is corrected to the upstream's count of the tokens used.
A refusal is our error, rendered in the route's protocol; nothing reaches the upstream.
`Core.admitted` is that admission for every kind of request (a session's guard, a forwarded
request), in Redis or in this process, with `[redis] on_error` applied in one place.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import orjson
import trio
from quart import Response, has_request_context, request, websocket

from .._config import Config
from .._events import estimated_tokens
from .._exceptions import SharedStateError, TrioproxyError, UpstreamTimeoutError
from .._limits import Limiter, check_request_shape
from .._policy import BufferConfig
from .._redis import RedisState, SharedLimits
from .._request import ChatRequest
from .._router import Route, Router
from .._upstream import Upstream
from ..pipeline import Pipeline, SessionItem, StreamSession, pipeline_for, start_session
from ._access import AccessLog, request_record
from ._auth import NO_KEY, key_name, presented_key
from ._generic import Renderer, StreamInterrupted, commits, last_word, prompt_chars, render_for
from ._metrics import Metrics
from ._shutdown import GracefulShutdown
from ._streams import (
    LOCAL_STORE,
    BroadcastStream,
    Encoder,
    RemoteStream,
    RendererFactory,
    StreamRegistry,
    Watcher,
    sse_with_id,
)

if TYPE_CHECKING:
    from .._tracing import Tracing

__all__ = [
    "ASGI_SEND",
    "BODY_LANE",
    "SSE",
    "STREAM_HEADERS",
    "BodyLane",
    "Core",
    "complete",
    "connection",
    "json_response",
    "keeping_send",
    "opening",
    "rendered_answer",
    "route_label",
    "watch_remote_response",
    "watch_response",
    "with_retry_after",
]

STREAM_HEADERS: Final = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE: Final = "text/event-stream"
#: Where each HTTP request's ASGI `send` is kept in its scope, for `_relay`.
ASGI_SEND: Final = "trioproxy.send"
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
#: Where the server (`_serve.py`) offers an HTTP request a `BodyLane`, in its scope's extensions.
BODY_LANE: Final = "trioproxy.body_lane"
#: Preamble items a response holds back before its head, at most: a bound on an upstream that
#: sends nothing but content-less chunks (and on the role chunks of retried attempts).
MAX_HELD_ITEMS: Final = 16


class Core:
    """
    The server's shared state, which the fronts use and own none of: the router, the limiter,
    metrics, the access log, the resumable streams, the graceful shutdown and its set of
    active sessions, and the traces (`tracing`, `None` when off). Sessions run in `nursery`
    (the app's).
    """

    def __init__(
        self,
        config: Config,
        *,
        router: Router,
        shutdown: GracefulShutdown,
        metrics: Metrics,
        access_log: AccessLog,
        nursery: Callable[[], trio.Nursery],
        tracing: Tracing | None = None,
        redis: RedisState | None = None,
    ) -> None:
        self.config = config
        self.tracing = tracing
        self.router = router
        self.shutdown = shutdown
        self.metrics = metrics
        self.access_log = access_log
        self.active = shutdown.streams
        self.redis = redis
        """
        Where limits, streams and breakers are shared across processes, when `[redis]` is set;
        `serve_redis` runs it.
        """
        self.streams = StreamRegistry(config.streams, store=self.redis or LOCAL_STORE)
        self._nursery = nursery
        limits = config.limits
        self._shared_limits = SharedLimits(
            requests_per_minute=limits.requests_per_minute,
            max_streams_per_key=limits.max_streams_per_key,
            max_concurrent_streams=limits.max_concurrent_streams,
            tokens_per_minute=limits.tokens_per_minute,
            tokens_per_day=limits.tokens_per_day,
        )
        self.limiter = Limiter(**asdict(self._shared_limits))  # the same bounds, in this process
        shutdown.on_drain(self.streams.stop_resuming)  # nobody can come back to resume a stream

    @property
    def nursery(self) -> trio.Nursery:
        """The app's nursery: sessions and resumable streams outlive the handler that starts them."""
        return self._nursery()

    def pipeline(self, model: str, *, provider: str | None = None, buffer: BufferConfig | None = None) -> Pipeline:
        """The pipeline of a request for `model`; raises `ModelNotFoundError` when nothing routes it."""
        return pipeline_for(self.router, self.router.route(model, provider=provider), buffer=buffer)

    def start(
        self,
        pipeline: Pipeline,
        chat: ChatRequest,
        *,
        heartbeats: bool = True,
        streamed: bool = True,
        stream_id: str | None = None,
    ) -> StreamSession:
        """
        Start a session for the current request (or a WebSocket's stream `stream_id`), if
        `[limits]` allow it: raises `RequestError` for a body of the wrong shape. A
        non-streaming answer is not `streamed` (`StreamSession`): nothing of it reaches its
        client before it is whole, nor does its error claim any delivered text. The limits
        (`admitted`) decide in the session's task: their refusal (`RateLimitedError`,
        `OverloadedError`) is its only item. Traced, the request's span starts here and ends
        with its session, or with its refusal.
        """
        return self._start(pipeline, chat, heartbeats=heartbeats, streamed=streamed, stream_id=stream_id)[0]

    async def start_admitted(self, pipeline: Pipeline, chat: ChatRequest, *, heartbeats: bool) -> StreamSession:
        """
        `start`, returning once the limits admitted the session, or raising their refusal: for
        a front that answers before the session's first item (a background response: its
        requester has its id at once, to watch it by, so it is `streamed`).
        """
        session, admission = self._start(pipeline, chat, heartbeats=heartbeats, streamed=True, stream_id=None)
        try:
            await admission.decided.wait()
        except BaseException:
            session.cancel()
            raise
        if admission.refusal is not None:
            raise admission.refusal
        return session

    def _start(  # noqa: C901 - its closures share the admission, trace and record: to become one object
        self, pipeline: Pipeline, chat: ChatRequest, *, heartbeats: bool, streamed: bool, stream_id: str | None
    ) -> tuple[StreamSession, _Admission]:
        limits = self.config.limits
        trace = None
        if self.tracing is not None:
            trace = self.tracing.request(chat, pipeline.routes[0], endpoint=route_label(), headers=connection().headers)
            pipeline = replace(pipeline, trace=trace)
        try:
            check_request_shape(
                chat.client_body, max_messages=limits.max_messages, max_string_chars=limits.max_string_chars
            )
        except TrioproxyError as exc:
            if trace is not None:
                trace.refused(exc)
            raise
        record = request_record(connection().scope)
        key = self.key_name()
        admission = _Admission()

        def decide(refusal: TrioproxyError | None) -> None:
            """The limits decided; a refusal is a rejected request, not a stream (metrics, the log)."""
            admission.refusal = refusal
            admission.decided.set()
            if refusal is not None and stream_id is None:
                record.session = None

        guard = functools.partial(self._guard, self.client_identity(), self._tokens_to_reserve(chat), decide)

        def on_end(session: StreamSession) -> None:
            admission.decided.set()  # (already, unless the app's end cancelled the session before)
            if admission.refusal is not None:
                self.metrics.stream_refused()
                if trace is not None:
                    trace.refused(admission.refusal)
                return
            self.metrics.observe_stream(session, key=key)
            if stream_id is not None:  # a WebSocket stream: its own log line
                self.access_log.log_stream(
                    session, request_id=record.id, route=record.route, stream_id=stream_id, key=key
                )
            if trace is not None:
                trace.ended(session)

        try:
            session = start_session(
                self.nursery,
                pipeline,
                chat,
                heartbeats=heartbeats,
                streamed=streamed,
                endpoint=route_label(),
                registry=self.active,
                on_end=on_end,
                guard=guard,
            )
        except BaseException as exc:
            if trace is not None:
                trace.refused(exc)
            raise
        self.metrics.stream_started()
        if stream_id is None:
            record.session = session
            record.key = key
        self.shutdown.admit(session)  # while draining, its first item is the refusal
        return session, admission

    async def serve_redis(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection to Redis, when `[redis]` is set, until cancelled (the app's nursery owns it)."""
        if self.redis is None:
            task_status.started()
            return
        await self.redis.run(task_status=task_status)

    @asynccontextmanager
    async def admitted(
        self, client: str, tokens: int = 0, used: Callable[[], int | None] = lambda: None
    ) -> AsyncIterator[None]:
        """
        A place in `[limits]` for one request of `client` (with `tokens` reserved in the token
        budgets), held inside: in Redis with `[redis]`, else in this process. On the way out,
        the reservation is corrected to `used()` (the upstream's count, `None` when it did
        not say) and the place given back. If Redis fails or is slow, `[redis] on_error`:
        "open" admits by this process's own limits, "closed" refuses with the failure (503).

        Raises:
            RateLimitedError, OverloadedError: the limits refuse the request.
            SharedStateError: Redis failed, and `on_error = "closed"`.
        """
        if self.redis is not None:
            try:
                shared = await self.redis.admit(client, self._shared_limits, tokens)
            except SharedStateError:
                if self.config.redis.on_error == "closed":
                    raise
            else:
                try:
                    yield
                finally:
                    # A failure is logged by `RedisState`; the place expires within `[redis] lease_ttl`.
                    with contextlib.suppress(SharedStateError):
                        await self.redis.release(shared, used())
                return
        lease = self.limiter.admit(client, trio.current_time(), tokens)
        try:
            yield
        finally:
            if (spent := used()) is not None:
                lease.reconcile(spent)
            lease.release()

    @asynccontextmanager
    async def _guard(
        self, client: str, tokens: int, decide: Callable[[TrioproxyError | None], None], session: StreamSession
    ) -> AsyncIterator[None]:
        """
        A session's guard: its place in the limits (`admitted`), held while it runs. A refusal
        is the session's only item; `decide` is told the outcome first.
        """
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(self.admitted(client, tokens, functools.partial(_used_tokens, session)))
            except TrioproxyError as refusal:
                decide(refusal)
                session.interrupt(refusal)
            else:
                decide(None)
            yield

    async def ask_upstream(
        self, route: Route, chat: ChatRequest, ask: Callable[[Upstream, ChatRequest], Awaitable[bytes | None]]
    ) -> bytes | None:
        """
        A question other than a generation (count the input's tokens, compact it) to the
        upstream of `route` (`chat`'s model's), `chat` routed to it, within its
        `first_token_timeout`: the JSON it answers, or `None` when it cannot say.
        """
        timeout = route.provider.timeouts.first_token_timeout
        with trio.move_on_after(timeout or math.inf):
            return await ask(route.upstream, chat.routed(route.upstream_model))
        raise UpstreamTimeoutError(
            f"no answer from the upstream within first_token_timeout ({timeout:g} s)", kind="first_token_timeout"
        )

    def _tokens_to_reserve(self, chat: ChatRequest) -> int:
        """
        What a request may cost, reserved in the token budgets at admission: its prompt (an
        estimate from its characters) and its maximum output, or `estimated_output_tokens` when it
        sets none (an embedding has none). 0 when no budget is on.
        """
        limits = self.config.limits
        if not (limits.tokens_per_minute or limits.tokens_per_day):
            return 0
        embeddings = chat.native is not None and chat.native.protocol == "embeddings"
        output = 0 if embeddings else chat.max_tokens or limits.estimated_output_tokens
        return estimated_tokens(prompt_chars(chat)) + output

    def client_identity(self) -> str:
        """Who the limits count against: the client key when keys are on, else the address."""
        current = connection()
        if self.config.auth.enabled:
            return "key:" + (presented_key(current.headers) or "")
        return "address:" + (current.scope.get("client") or ("unknown",))[0]

    def key_name(self) -> str:
        """Whose usage a session counts as in metrics and logs: its client key's name, when keys are on."""
        if self.config.auth.enabled:
            return key_name(presented_key(connection().headers) or "")
        return NO_KEY

    async def stream(
        self,
        session: StreamSession,
        renderer: Renderer,
        content_type: str,
        error_response: Callable[[TrioproxyError], Response],
    ) -> Response:
        """
        Wait until the session has something the client must see (`opening`): an error before
        that still gets an HTTP status and the protocol's error body, and so does the
        renderer's refusal of an item held until then; else the response is committed as a
        200 stream, and its head carries every item held until then, in order.
        """
        try:
            held = await opening(session, shows_notices=renderer.shows_notices)
        except BaseException:
            session.cancel()
            raise
        if isinstance(held, TrioproxyError):
            session.cancel()
            return error_response(held)
        head = b"".join(render_for(session, renderer, item) for item in held)
        if (refusal := session.error) is not None:  # of a held item: nothing was sent yet, a status still can be
            session.cancel()
            return error_response(refusal)
        body = _relay(session, renderer, head, kept_send(request.scope), body_lane(request.scope))
        return Response(body, status=200, content_type=content_type, headers=STREAM_HEADERS)

    async def share(
        self,
        session: StreamSession,
        renderer_for: RendererFactory,
        *,
        shows_notices: bool,
        prefix: str = "st_",
        encode: Encoder = sse_with_id,
    ) -> tuple[BroadcastStream, list[bytes], Watcher]:
        """
        Like `stream`, but once the upstream accepted, the generation becomes a resumable
        stream (its own broadcast task) with the current request as its first watcher: the
        stream, what it said until now, and the watcher. Raises the error that ended the
        session before that (or the renderer's refusal of an item held until then, or
        `StreamsFullError`), the session cancelled.
        """
        try:
            held = await opening(session, shows_notices=shows_notices)
            if isinstance(held, TrioproxyError):
                raise held
            stream = self.streams.open(session, renderer_for, prefix=prefix, encode=encode)
        except BaseException:
            session.cancel()
            raise
        for item in held:  # logged before the first watcher attaches: it gets them as one write
            stream.publish(item)
        if (refusal := session.error) is not None:  # of a held item: nobody saw the stream, a status still can be
            self.streams.remove(stream.id)
            raise refusal
        backlog, watcher = stream.attach()
        self.nursery.start_soon(stream.run, name=f"stream {stream.id}")
        return stream, backlog, watcher


async def opening(session: StreamSession, *, shows_notices: bool) -> list[SessionItem] | TrioproxyError:
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


async def complete(session: StreamSession, take: Callable[[SessionItem], None] | None = None) -> TrioproxyError | None:
    """
    Run a non-streaming request's session to its end, handing each item to `take`: `None`
    once it completed, else the error that ended it. The session is over when this returns
    (its `accumulator` holds the answer).
    """
    try:
        async for item in session.output:
            if isinstance(item, TrioproxyError):
                return item
            if take is not None:
                take(item)
                if (refusal := session.error) is not None:  # `take` refused the item (`render_for`)
                    return refusal
        if not session.completed:
            return StreamInterrupted("the server ended the request before it completed")
        return None
    finally:
        session.cancel()


async def rendered_answer(session: StreamSession, renderer: Renderer) -> bytes | TrioproxyError:
    """
    A non-streaming answer as the events a stream would have carried, `done`'s included (the
    fronts fold them into one object), or the error that ended the session.
    """
    events = bytearray()
    error = await complete(session, lambda item: events.extend(render_for(session, renderer, item)))
    if error is not None:
        return error
    return bytes(events + renderer.done(session))


class BodyLane(Protocol):
    """
    A streamed response's way to its client round the ASGI `send`, once its head is written
    (the server's HTTP/1.1 chunked bodies have one: `_serve._ChunkedBodyLane`). It takes a
    part of the body only when the client could not tell the difference.
    """

    def write(self, data: bytes) -> bytes | None:
        """`None`: not taken, nothing written. Else the part the socket did not take now (`b""`: none)."""

    async def write_rest(self, rest: bytes) -> None:
        """Write what `write` left, before anything else is written."""


class _BodyWriter:
    """
    Writes the session's items, rendered, to the response while it lasts: through its body
    lane when it has one and the lane takes them, else through its ASGI `send`.
    """

    def __init__(self, session: StreamSession, renderer: Renderer, send: ASGISend, lane: BodyLane | None) -> None:
        self._session = session
        self._renderer = renderer
        self._send = send
        self._lane = lane
        self.relaying = True
        """False once the response ended: the client is gone."""

    async def send(self, item: SessionItem) -> None:
        out = render_for(self._session, self._renderer, item)
        if out and self.relaying:
            if self._lane is not None and (rest := self._lane.write(out)) is not None:
                if rest:
                    await self._lane.write_rest(rest)
                return
            await self._send({"type": "http.response.body", "body": out, "more_body": True})


async def _relay(
    session: StreamSession, renderer: Renderer, head: bytes, send: ASGISend, lane: BodyLane | None
) -> AsyncIterator[bytes]:
    """
    The response body. Once quart has written its head, the session's tasks write its items
    themselves, through the request's own ASGI `send` (the one quart writes with); this only
    waits for the session to end, and then writes its last word. Never yields inside a nursery.
    """
    writer = _BodyWriter(session, renderer, send, lane)
    try:
        yield head
        session.deliver_to(writer)
        await session.finished.wait()
        if not session.failed:  # an error was the session's own last word
            yield last_word(renderer, session)
    finally:
        writer.relaying = False
        session.cancel()


def _used_tokens(session: StreamSession) -> int | None:
    """The tokens the upstream says the session used, or `None` when it did not say (its reservation stands)."""
    usage = session.accumulator.usage
    return None if usage is None else usage.total_tokens


@dataclass(eq=False, slots=True)
class _Admission:
    """Whether the limits took a session: `decided` is set once they did, `refusal` is theirs if they refused."""

    decided: trio.Event = field(default_factory=trio.Event)
    refusal: TrioproxyError | None = None


def watch_response(stream: BroadcastStream, backlog: list[bytes], watcher: Watcher) -> Response:
    """A watcher's SSE response: the replayed events, then the live ones."""
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


def watch_remote_response(stream: RemoteStream) -> Response:
    """The SSE response of a watcher of another process's stream: the replayed events, then the live ones."""
    headers = {**STREAM_HEADERS, "x-stream-id": stream.id}
    return Response(_watch_remote(stream), status=200, content_type=SSE, headers=headers)


async def _watch_remote(stream: RemoteStream) -> AsyncIterator[bytes]:
    """Never yields inside a nursery or cancel scope: each `next()` is awaited whole."""
    if stream.backlog:
        yield b"".join(stream.backlog)
    while (data := await stream.next()) is not None:
        yield data


def keeping_send(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
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


def kept_send(scope: Mapping[str, object]) -> ASGISend:
    """The `send` that `keeping_send` keeps in an HTTP request's scope, which hypercorn's scope types do not know."""
    return cast(ASGISend, scope[ASGI_SEND])


def body_lane(scope: Mapping[str, Any]) -> BodyLane | None:
    """The `BodyLane` the server offers an HTTP request, if it offers one (hypercorn's scope types do not know it)."""
    return cast("BodyLane | None", scope.get("extensions", {}).get(BODY_LANE))


def connection() -> Any:
    """The current request, or else the current WebSocket."""
    return request if has_request_context() else websocket


def route_label() -> str:
    """The matched URL rule of the current request or WebSocket: a bounded label, unlike its path."""
    rule = connection().url_rule
    return rule.rule if rule is not None else "unmatched"


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status=status, content_type="application/json")


def with_retry_after(response: Response, error: TrioproxyError) -> Response:
    """`Retry-After` in whole seconds, rounded up, when the error says when to ask again."""
    if error.retry_after is not None:
        response.headers["retry-after"] = str(math.ceil(error.retry_after))
    return response
