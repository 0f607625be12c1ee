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
from typing import TYPE_CHECKING, Final

import trio

from .._events import Delta, Opened
from .._exceptions import ContextLengthError, TrioproxyError, UpstreamError, UpstreamTimeoutError
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

MAX_HELD_ITEMS: Final = 64
"""
What a racing attempt holds before its first token: its preamble (`OPENED`, the role, the
upstream's opening events); beyond it, events that say nothing (pings) are dropped.
"""


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
    routes = pipeline.routes
    failures: list[tuple[Route, UpstreamError]] = []
    hedges = routes[0].provider.retry.max_hedges
    at = 0
    while at < len(routes):
        route = routes[at]
        if failures:
            await sink.send(_notice("failover", 0, route, 0.0, failures[-1][1]))
        hedge_after = route.provider.timeouts.hedge_after
        if hedges and hedge_after and at + 1 < len(routes):
            hedges -= 1
            failed, tried, succeeded = await _race(pipeline, route, routes[at + 1], chat, sink, progress, rng)
        else:
            error = await _try_route(pipeline, route, chat, sink, progress, rng)
            failed, tried, succeeded = [] if error is None else [(route, error)], 1, error is None
        if succeeded:
            return
        failures += failed
        at += tried
        refused_by, last = failures[-1]
        if progress.token_sent:
            break
        if isinstance(last, ContextLengthError):
            # Only a larger context can help: the refusing route's own list, none asked twice.
            asked = {(r.provider.name, r.upstream_model) for r in routes[:at]}
            larger = pipeline.context_fallbacks.get(refused_by.provider.name, ())
            routes = routes[:at] + tuple(r for r in larger if (r.provider.name, r.upstream_model) not in asked)
        elif last.status in _NOT_FAILOVER_STATUSES:
            break
    if len(failures) == 1:
        raise failures[0][1]
    raise _every_failure(failures, routes=len(routes))


async def _race(
    pipeline: Pipeline,
    route: Route,
    hedge: Route,
    chat: ChatRequest,
    sink: Sink,
    progress: _Progress,
    rng: random.Random,
) -> tuple[list[tuple[Route, UpstreamError]], int, bool]:
    """
    `route`, and `hedge` alongside it once `route` has given no first token for its
    `hedge_after`: the first to send a token wins, and the other is cancelled at once (its
    upstream request closed). Each holds what it sends before its first token, so the loser's
    preamble never reaches the sink. The failures in the order they came, how many routes were
    tried (1 when `route` ended before the hedge began), and whether one streamed to its end.
    """
    race = _Race(sink, progress)
    failures: list[tuple[Route, UpstreamError]] = []
    succeeded = False

    async def enter(racer: Route, entrant: _Entrant) -> None:
        nonlocal succeeded
        with entrant.scope:
            error = await _try_route(pipeline, racer, chat, entrant, _Progress(), rng)
            if error is None:
                succeeded = True
            else:
                failures.append((racer, error))
                if not all(other.settled.is_set() for other in race.entrants if other is not entrant):
                    # The other goes on: this failure does not end the race, say so now.
                    await sink.send(_notice("hedge_failed", 0, racer, 0.0, error))
        entrant.settled.set()

    tried = 1
    async with trio.open_nursery() as nursery:
        first = race.entrant(route, announce=False)
        nursery.start_soon(enter, route, first)
        with trio.move_on_after(route.provider.timeouts.hedge_after):
            await first.settled.wait()
        if not first.settled.is_set():
            tried = 2
            reason = f"no first token within hedge_after ({route.provider.timeouts.hedge_after:g} s)"
            await sink.send(RetryNotice("hedge", 1, hedge.provider.name, hedge.upstream_model, 0.0, reason))
            nursery.start_soon(enter, hedge, race.entrant(hedge, announce=True))
    return failures, tried, succeeded


class _Race:
    """Two attempts racing for the first token; the sink takes the winner's items only."""

    def __init__(self, sink: Sink, progress: _Progress) -> None:
        self.sink = sink
        self.progress = progress
        self.entrants: list[_Entrant] = []
        self.winner: _Entrant | None = None

    def entrant(self, route: Route, *, announce: bool) -> _Entrant:
        entrant = _Entrant(self, route, announce=announce)
        self.entrants.append(entrant)
        return entrant


class _Entrant:
    """
    One attempt's way into a race's sink: before its first token it holds what it sends
    (`OPENED`, the role, an upstream's content-less events); its first token wins the race
    if no other did, cancels the others, and sends what it held, then the token.
    """

    def __init__(self, race: _Race, route: Route, *, announce: bool) -> None:
        self.race = race
        self.route = route
        self.announce = announce
        """Tell the sink when it wins: the stream is answered by another route than the one asked."""
        self.scope = trio.CancelScope()
        self.settled = trio.Event()
        """Its attempts ended, or it won."""
        self.held: list[SessionItem] = []

    async def send(self, item: SessionItem) -> None:
        race = self.race
        if race.winner is self:
            await race.sink.send(item)
        elif isinstance(item, RetryNotice):
            await race.sink.send(item)
        elif isinstance(item, Delta) and item.has_content:
            if race.winner is not None:  # lost, and about to be cancelled: nothing of it goes out
                await trio.lowlevel.checkpoint()
                return
            await self._win(item)
        elif len(self.held) < MAX_HELD_ITEMS or (isinstance(item, Delta) and item.says_anything):
            self.held.append(item)

    async def _win(self, token: Delta) -> None:
        race = self.race
        race.winner = self
        self.settled.set()
        for other in race.entrants:
            if other is not self:
                other.scope.cancel()
        if self.announce:
            route = self.route
            await race.sink.send(RetryNotice("hedge_won", 1, route.provider.name, route.upstream_model, 0.0, ""))
        progress = race.progress
        for item in self.held:
            if isinstance(item, Opened):
                if progress.opened:
                    continue
                progress.opened = True
            await race.sink.send(item)
        self.held.clear()
        progress.token_sent = True
        await race.sink.send(token)


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
