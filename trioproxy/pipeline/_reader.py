"""
The upstream reader stage: one attempt after another until one streams, watched by the
named timeouts.

Each attempt runs the upstream request inside a watchdog: one cancel scope whose deadline is
`first_token_timeout` until the first token, then `silence_timeout` after each one. The
deadline is lifted while an item waits for the stages downstream (a slow client is not a
silent upstream) and set again once it is taken. A deadline that passes cancels the request,
which closes the upstream connection.

Retries and failover happen only while no token has left this stage: once one has, a failure
ends the stream with an error instead, so no code path can send text twice. `OPENED` also
leaves this stage at most once, whichever attempt opened.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .._events import Delta, Opened
from .._exceptions import TrioproxyError, UpstreamError, UpstreamTimeoutError
from .._policy import Timeouts
from .._request import ChatRequest
from ._assemble import Pipeline
from ._items import RetryNotice, SessionItem, Sink

if TYPE_CHECKING:
    from .._router import Route

__all__ = ["read_upstream"]

logger = logging.getLogger("trioproxy.upstream")

_NOT_FAILOVER_STATUSES = frozenset({400, 413, 422})
"""The client's own request is at fault: another upstream would refuse it too."""


@dataclass(slots=True)
class _Progress:
    opened: bool = False
    token_sent: bool = False


async def read_upstream(
    pipeline: Pipeline,
    chat: ChatRequest,
    sink: Sink,
    *,
    rng: random.Random | None = None,
) -> None:
    """Send the stream's items into `sink`; a failure is sent as its last item."""
    progress = _Progress()
    error: TrioproxyError | None = None
    with trio.move_on_after(pipeline.timeouts.total_timeout or math.inf) as total:
        try:
            await _attempts(pipeline, chat, sink, progress, rng or random.Random())
        except TrioproxyError as exc:
            error = exc
    if total.cancelled_caught:
        error = UpstreamTimeoutError(
            f"the stream exceeded total_timeout ({pipeline.timeouts.total_timeout:g} s)", kind="total_timeout"
        )
    if error is not None:
        await sink.send(error)


async def _attempts(
    pipeline: Pipeline,
    chat: ChatRequest,
    sink: Sink,
    progress: _Progress,
    rng: random.Random,
) -> None:
    failures: list[tuple[Route, UpstreamError]] = []
    for route in pipeline.routes:
        if failures:
            await sink.send(_notice("failover", 0, route, 0.0, failures[-1][1]))
        error = await _try_route(pipeline, route, chat, sink, progress, rng)
        if error is None:
            return
        failures.append((route, error))
        if progress.token_sent or error.status in _NOT_FAILOVER_STATUSES:
            break
    if len(failures) == 1:
        raise failures[0][1]
    raise _every_failure(failures, routes=len(pipeline.routes))


async def _try_route(
    pipeline: Pipeline,
    route: Route,
    chat: ChatRequest,
    sink: Sink,
    progress: _Progress,
    rng: random.Random,
) -> UpstreamError | None:
    """One route, retried as its provider says: None once an attempt streamed to its end, else the last failure."""
    routed = chat.routed(route.upstream_model)
    retry = route.provider.retry
    attempt = 0
    while True:
        try:
            await _attempt(pipeline, route, routed, sink, progress)
            return None
        except UpstreamError as exc:
            error = exc
        if progress.token_sent or not retry.retries(error) or attempt == retry.max_retries:
            return error
        delay = retry.delay(attempt, retry_after=error.retry_after, random=rng.random())
        logger.info("retrying %s/%s in %.3f s: %s", route.provider.name, route.upstream_model, delay, error)
        attempt += 1
        await sink.send(_notice("retry", attempt, route, delay, error))
        await trio.sleep(delay)


def _every_failure(failures: list[tuple[Route, UpstreamError]], *, routes: int) -> UpstreamError:
    """
    The last failure, with a message naming every route tried and why each failed: the client
    must see why the route it asked for failed, not only why its last fallback did.
    """
    tried = "all" if len(failures) == routes else f"{len(failures)} of"
    reasons = "; ".join(f"{route.provider.name}/{route.upstream_model}: {error.message}" for route, error in failures)
    return failures[-1][1].with_message(f"{tried} {routes} routes failed: {reasons}")


async def _attempt(pipeline: Pipeline, route: Route, chat: ChatRequest, sink: Sink, progress: _Progress) -> None:
    watched = _WatchedSink(sink, route.provider.timeouts, progress, passthrough=pipeline.passthrough)
    with watched.watchdog:
        await route.upstream.stream(chat, watched)
    if watched.watchdog.cancelled_caught:
        kind, limit = watched.kind, watched.limit
        what = "first" if kind == "first_token_timeout" else "further"
        raise UpstreamTimeoutError(f"the upstream sent no {what} token within {kind} ({limit:g} s)", kind=kind)


class _WatchedSink:
    """The sink an attempt's upstream writes into: it moves the watchdog's deadline."""

    def __init__(self, sink: Sink, timeouts: Timeouts, progress: _Progress, *, passthrough: bool) -> None:
        self._sink = sink
        self._progress = progress
        self._passthrough = passthrough
        self._silence = timeouts.silence_timeout
        self.kind, self.limit = "first_token_timeout", timeouts.first_token_timeout
        self.watchdog = trio.CancelScope(deadline=trio.current_time() + (self.limit or math.inf))

    async def send(self, item: SessionItem) -> None:
        progress = self._progress
        if isinstance(item, Opened):
            if progress.opened:
                return
            progress.opened = True
        elif isinstance(item, Delta):
            item.arrived = trio.current_time()
            if not self._passthrough:
                item.raw = None
                if not item.says_anything:
                    return  # only its bytes mattered (a `ping`, a block's end): the stages need not see it
            if item.has_content and not progress.token_sent:
                progress.token_sent = True
                self.kind, self.limit = "silence_timeout", self._silence
        deadline = self.watchdog.deadline
        self.watchdog.deadline = math.inf  # waiting on the stages downstream is not upstream silence
        await self._sink.send(item)
        if progress.token_sent:
            deadline = trio.current_time() + (self.limit or math.inf)
        self.watchdog.deadline = deadline


def _notice(kind: str, attempt: int, route: Route, delay: float, error: UpstreamError) -> RetryNotice:
    return RetryNotice(
        kind=kind,
        attempt=attempt,
        provider=route.provider.name,
        model=route.upstream_model,
        delay=delay,
        reason=error.message,
        error=error,
    )
