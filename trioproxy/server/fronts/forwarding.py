"""
Every other path under `/v1/` that a provider allows (its `forward_paths`), forwarded to it as
it is: method, query, body and answer, streamed both ways, whatever the answer's status.

Which provider: the one the body's `model` routes to (the body is then read whole, bounded by
`max_body_bytes`, and its `model` replaced by the upstream's name, as for chat), which must
itself allow the path; without a JSON body naming a model, the provider with the longest
prefix that allows it (the body then streams through, framed as the client framed it, counted
against `max_body_bytes`). A path no provider allows has no route at all: the app's 404; a
path a front serves is never forwarded (with another method it stays the app's 405).

The client's key is never forwarded (the provider's is added) and hop-by-hop headers are
dropped (`_forwarding`). Keys, limits (a forwarded request holds a place in them until its
answer ends), the access log, request ids and metrics (by route: the allowed prefix) are the
proxy's, as for every route. `first_token_timeout` bounds the wait for the answer's head, and
`silence_timeout` each gap in its body.

The upstream request runs in a task of the app's nursery, which hands the answer over a
channel: the response body only iterates that channel, and cancels the task when it ends, so
a client that goes away takes the upstream request with it. The answer in flight is one of the
streams the graceful shutdown waits for, and interrupts at its deadline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Final

import orjson
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.routing import Map, Rule

from ..._config import ProviderConfig
from ..._exceptions import (
    NotFoundError,
    PayloadTooLargeError,
    StreamInterrupted,
    TrioproxyError,
    UpstreamTimeoutError,
)
from ..._forwarding import ForwardRequest, allows, provider_for_path, request_headers, response_headers
from ..._policy import Timeouts
from ..._upstream import Upstream
from .._access import request_record
from .._core import Core, connection
from . import anthropic_messages
from . import error_response as path_error_response

__all__ = ["register"]

logger = logging.getLogger("trioproxy.forwarding")

METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")
"""What may be forwarded (`HEAD` comes with `GET`; `OPTIONS` is CORS's)."""

_Item = tuple[int, list[tuple[str, str]]] | bytes | TrioproxyError
"""What the upstream task hands the response: the head, then body pieces; an error last."""


def register(app: QuartTrio, core: Core) -> None:
    """A route for each prefix some provider forwards, and for every path under it."""

    async def forward(**_: str) -> Response:
        path = request.path
        try:
            native.match(path, method=request.method)
        except MethodNotAllowed:
            raise  # a path served here, with another method: the app's 405
        except HTTPException:
            pass  # no path served here (a redirect would only add a slash)
        try:
            provider, upstream, body = await _destination(core, path)
        except TrioproxyError as exc:
            return path_error_response(path, exc)
        request_record(connection().scope).provider = provider.name
        forwarding = _Forwarding(upstream, _forwarded_request(path, body), provider.timeouts)
        admission = core.admitted(core.client_identity())
        core.active.add(forwarding)  # the drain waits for it, and interrupts it at its deadline

        async def ask_upstream() -> None:
            try:
                await forwarding.run(admission)
            finally:
                core.active.discard(forwarding)

        try:
            core.nursery.start_soon(ask_upstream)
        except BaseException:
            core.active.discard(forwarding)
            raise
        head = await forwarding.head()
        if isinstance(head, TrioproxyError):
            return _error_response(provider, path, head)
        status, upstream_headers = head
        answer_headers = response_headers(upstream_headers)
        content_type = answer_headers.pop("content-type", None)
        return Response(forwarding.body(), status=status, headers=answer_headers, content_type=content_type)

    native = Map(
        [Rule(rule.rule, methods=rule.methods, endpoint=rule.endpoint) for rule in app.url_map.iter_rules()]
    ).bind("")
    """The routes of the fronts, registered before these: a path they serve is never forwarded."""
    prefixes = sorted({prefix for provider in core.config.providers.values() for prefix in provider.forward_paths})
    for prefix in prefixes:
        for rule in (prefix, prefix + "/<path:rest>"):
            app.add_url_rule(rule, endpoint=f"forward {rule}", view_func=forward, methods=METHODS)


def _forwarded_request(path: str, body: bytes | AsyncIterable[bytes]) -> ForwardRequest:
    """The current request as the upstream gets it: its raw path and query, its end-to-end headers."""
    raw_path = request.scope.get("raw_path") or path.encode()
    query = request.query_string
    target = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    headers = request_headers(request.headers.items())
    if not isinstance(body, bytes) and request.content_length is not None:
        headers["content-length"] = str(request.content_length)  # streamed as it was framed, not chunked
    return ForwardRequest(request.method, target, headers, body)


def _error_response(provider: ProviderConfig, path: str, error: TrioproxyError) -> Response:
    """A failure before the upstream's head, in the shape of the provider's own API."""
    if provider.type == "anthropic":
        return anthropic_messages.error_response(path, error)
    return path_error_response(path, error)


async def _destination(core: Core, path: str) -> tuple[ProviderConfig, Upstream, bytes | AsyncIterable[bytes]]:
    """The provider that takes the current request, and the body to send it."""
    body: bytes | AsyncIterable[bytes]
    if request.mimetype == "application/json":
        raw = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        body = raw
        model = _model(raw)
        if model is not None:
            route = core.router.route(model)
            if not allows(route.provider.forward_paths, path):
                raise NotFoundError(
                    f"provider {route.provider.name!r} does not forward {path} (its forward_paths do not list it)"
                )
            if route.upstream_model != model:
                body = orjson.dumps({**orjson.loads(raw), "model": route.upstream_model})
            return route.provider, route.upstream, body
    elif request.content_length == 0 or (request.content_length is None and "transfer-encoding" not in request.headers):
        body = b""  # none: a GET goes up without one
    else:
        body = _bounded(request.body, core.config.limits.max_body_bytes)
    provider = provider_for_path(core.config.providers.values(), path)
    assert provider is not None  # the routes are those of the providers' prefixes
    return provider, core.router.upstreams[provider.name], body


def _model(body: bytes) -> str | None:
    """The `model` a JSON body names, if it is an object that names one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the upstream will say what is wrong with it
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) and model else None


async def _bounded(body: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    """The client's body as it arrives, refused once it is over `limit` bytes in all."""
    too_large = PayloadTooLargeError(f"the request body is over the limit of {limit} bytes")
    received = 0
    try:
        async for data in body:
            received += len(data)
            if received > limit:
                raise too_large
            yield data
    except RequestEntityTooLarge:  # quart's own bound, on what it holds before it is read
        raise too_large from None


class _WatchedChannel:
    """
    The `ForwardSink` the upstream task writes into: the channel to the response, under a
    watchdog whose deadline is `first_token_timeout` for the head, then `silence_timeout`
    after each piece; waiting for the client to take a piece is not upstream silence.
    """

    def __init__(self, send: trio.MemorySendChannel[_Item], timeouts: Timeouts) -> None:
        self._send = send
        self._silence = timeouts.silence_timeout
        self.started = False
        self.kind, self.limit = "first_token_timeout", timeouts.first_token_timeout
        self.watchdog = trio.CancelScope(deadline=trio.current_time() + (self.limit or math.inf))

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        self.kind, self.limit = "silence_timeout", self._silence
        await self._hand_over((status, headers))

    async def body(self, data: bytes) -> None:
        await self._hand_over(data)

    async def _hand_over(self, item: _Item) -> None:
        self.watchdog.deadline = math.inf
        await self._send.send(item)
        self.watchdog.deadline = trio.current_time() + (self.limit or math.inf)


class _Forwarding:
    """
    One forwarded request in flight. `run` is its task, in the app's nursery: it asks the
    upstream and hands the answer over a channel, to `head` and then `body`, which the
    response iterates; the end of `body`, however it ends (the client may be gone), cancels
    the task. `interrupt` (the drain's deadline) cancels the upstream request, and the error
    it is given is the answer's last item.
    """

    def __init__(self, upstream: Upstream, request: ForwardRequest, timeouts: Timeouts) -> None:
        self._upstream = upstream
        self._request = request
        self._send, self._receive = trio.open_memory_channel[_Item](0)
        self._sink = _WatchedChannel(self._send, timeouts)
        self._cancel_scope = trio.CancelScope()
        self._upstream_scope = trio.CancelScope()
        self._interruption: TrioproxyError | None = None

    def interrupt(self, error: TrioproxyError) -> None:
        if self._interruption is None:
            self._interruption = error
        self._upstream_scope.cancel()

    async def run(self, admission: AbstractAsyncContextManager[None]) -> None:
        """
        The upstream request, holding its place in the limits (`admission`, `Core.admitted`)
        until the answer ends; a refusal, or a failure, is the channel's last item.
        """
        with self._cancel_scope:
            async with self._send:
                try:
                    async with admission:
                        error = await self._ask()
                except TrioproxyError as refusal:  # raised entering the admission, so before the upstream was asked
                    error = refusal
                if error is not None:
                    await self._send.send(error)

    async def _ask(self) -> TrioproxyError | None:
        """The upstream's answer, handed over the channel: `None` once whole, else why it is not."""
        sink = self._sink
        error: TrioproxyError | None = None
        with sink.watchdog, self._upstream_scope:
            try:
                await self._upstream.forward(self._request, sink)
            except TrioproxyError as exc:
                error = exc
            except Exception:  # a bug: logged whole, the client told, the server kept
                logger.exception("forwarding %s %s failed", self._request.method, self._request.target)
                error = TrioproxyError("internal error while forwarding")
        if self._interruption is not None:
            return self._interruption
        if sink.watchdog.cancelled_caught:
            what = "answer" if sink.kind == "first_token_timeout" else "further byte"
            return UpstreamTimeoutError(
                f"the upstream sent no {what} within {sink.kind} ({sink.limit:g} s)", kind=sink.kind
            )
        return error

    async def head(self) -> tuple[int, list[tuple[str, str]]] | TrioproxyError:
        """The answer's status and headers, or the error that came instead (the task is then over)."""
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:  # the server is shutting down
            item = StreamInterrupted("the server ended the request before the upstream answered")
        except BaseException:
            self._cancel_scope.cancel()
            raise
        assert not isinstance(item, bytes)  # the sink hands the head over first
        if isinstance(item, TrioproxyError):
            self._cancel_scope.cancel()
        return item

    async def body(self) -> AsyncIterator[bytes]:
        """
        The answer's body as it comes. An upstream that fails once it began is not passed off
        as a whole answer: the body ends with an error, and the client's connection with it.
        """
        try:
            async for item in self._receive:
                if isinstance(item, TrioproxyError):  # hypercorn logs it, and closes the connection mid-body
                    raise StreamInterrupted(f"the answer broke off: {item.message}") from None
                assert isinstance(item, bytes)
                yield item
        finally:
            self._cancel_scope.cancel()
