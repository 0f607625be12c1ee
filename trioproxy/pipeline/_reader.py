"""
The upstream reader stage: one attempt after another until one streams, watched by the
named timeouts.

Each attempt runs the upstream request under a watchdog: a task that cancels it once the
upstream was silent for `first_token_timeout` before the first token, then `silence_timeout`
after each one. The time an item waits for the stages downstream does not count (a slow
client is not a silent upstream). The cancel closes the upstream connection.

Before the first token, a failure is retried, failed over (by its kind), sent to a larger
context, or raced by a hedge. After it, nothing is replayed: the only way on is a
continuation, which asks an upstream that can to go on from the text already delivered, and
passes on only what is new; otherwise the failure ends the stream. Everything leaves through
one `_Delivery`, which lets `OPENED` out once and keeps the delivered text a continuation
needs.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from typing import TYPE_CHECKING, Final

import trio

from .._continuation import Overlap, continuation, ends_with_assistant
from .._events import Delta, Opened, Usage, estimated_tokens
from .._exceptions import (
    ContextLengthError,
    RequestError,
    TrioproxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    exception_leaves,
)
from .._policy import CONTINUABLE, Timeouts, failure_kind
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
upstream's opening events); beyond it, events that say nothing (pings) are dropped, and any
other is a protocol error.
"""


class _Delivery:
    """
    The reader's way out: `OPENED` leaves once, whichever attempt opened; it records whether a
    token left (no replay after it) and the text that did, while it is only text (what a
    continuation can go on from).
    """

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.opened = False
        self.token_sent = False
        self.text: list[str] = []
        self.text_only = True
        """No tool call, reasoning or other item left: a continuation may take the text as the whole answer so far."""

    async def send(self, item: SessionItem) -> None:
        if isinstance(item, Opened):
            if self.opened:
                return
            self.opened = True
        elif isinstance(item, Delta) and item.has_content:
            self.token_sent = True
            if item.text:
                self.text.append(item.text)
            if item.tool_calls or item.reasoning or item.raw_item:
                self.text_only = False
        await self._sink.send(item)


async def read_upstream(
    pipeline: Pipeline,
    chat: ChatRequest,
    sink: Sink,
    *,
    rng: random.Random | None = None,
) -> None:
    """Send the stream's items into `sink`; a failure is sent as its last item."""
    delivery = _Delivery(sink)
    error: TrioproxyError | None = None
    with trio.move_on_after(pipeline.timeouts.total_timeout or math.inf) as total:
        try:
            await _attempts(pipeline, chat, delivery, rng or random.Random())
        except TrioproxyError as exc:
            error = exc
    if total.cancelled_caught:
        error = UpstreamTimeoutError(
            f"the stream exceeded total_timeout ({pipeline.timeouts.total_timeout:g} s)", kind="total_timeout"
        )
    if error is not None:
        await sink.send(error)


async def _attempts(pipeline: Pipeline, chat: ChatRequest, delivery: _Delivery, rng: random.Random) -> None:
    routes = pipeline.routes
    failures: list[tuple[Route, UpstreamError]] = []
    hedges = routes[0].provider.retry.max_hedges
    at = 0
    while at < len(routes):
        route = routes[at]
        if failures:
            await delivery.send(_notice("failover", 0, route, 0.0, failures[-1][1]))
        hedge_after = route.provider.timeouts.hedge_after
        kind = "failover" if failures else "first"
        if hedges and hedge_after and at + 1 < len(routes):
            hedges -= 1
            failed, tried, succeeded = await _race(pipeline, route, routes[at + 1], chat, delivery, rng, kind)
        else:
            error = await _try_route(pipeline, route, chat, delivery, delivery, rng, kind)
            failed, tried, succeeded = [] if error is None else [(route, error)], 1, error is None
        if succeeded:
            return
        failures += failed
        at += tried
        broken_at, last = failures[-1]
        if delivery.token_sent:
            error = await _continue(pipeline, chat, delivery, (broken_at, *routes[at:]), last)
            if error is None:
                return
            raise error
        if isinstance(last, ContextLengthError):
            # Only a larger context can help: the refusing route's own list, none asked twice.
            asked = {(r.provider.name, r.upstream_model) for r in routes[:at]}
            larger = pipeline.context_fallbacks.get(broken_at.provider.name, ())
            routes = routes[:at] + tuple(r for r in larger if (r.provider.name, r.upstream_model) not in asked)
        elif last.status in _NOT_FAILOVER_STATUSES:
            break
    if len(failures) == 1:
        raise failures[0][1]
    raise _every_failure(failures, routes=len(routes))


async def _continue(
    pipeline: Pipeline,
    chat: ChatRequest,
    delivery: _Delivery,
    routes: tuple[Route, ...],
    error: UpstreamError,
) -> UpstreamError | None:
    """
    After `error` broke the stream on `routes[0]` past its first token: ask that route, then
    the next, to continue the text delivered, each in its own way, none that refused lately;
    `None` once one streamed to its end, else the failure the client is told, never a refusal
    of the continuation itself. At most `max_continuations`.
    """
    retry = routes[0].provider.retry
    if not _continuable(pipeline, chat, delivery, error):
        return error
    left = retry.max_continuations
    candidates = list(routes)
    while left and candidates:
        route = candidates[0]
        provider = route.provider
        way = provider.continuation_for(route.upstream_model)
        now = trio.current_time()
        if way == "none" or pipeline.refusals.refused(provider.name, route.upstream_model, now=now):
            candidates.pop(0)
            continue
        left -= 1
        text = "".join(delivery.text)
        continued = continuation(chat, text, way)
        await delivery.send(_notice("continuation", retry.max_continuations - left, route, 0.0, error))
        continuing = _Continuing(delivery, continued.overlap, delivered=len(text))
        try:
            await _attempt(pipeline, route, continued.chat.routed(route.upstream_model), continuing, "continuation")
            return None
        except RequestError:  # the client's request cannot go to this route's protocol: not a way on
            candidates.pop(0)
            continue
        except UpstreamError as exc:
            if continuing.new_text:  # it went on, then broke too: go on from there, on this route first
                error = exc
                if not _continuable(pipeline, chat, delivery, error):
                    return error
                continue
            await delivery.send(_notice("continuation_failed", 0, route, 0.0, exc))
            if failure_kind(exc) is None:  # refused: this route takes no continuation, for a while
                logger.info("%s/%s refused a continuation: %s", provider.name, route.upstream_model, exc)
                pipeline.refusals.refuse(provider.name, route.upstream_model, until=now + retry.continuation_cooldown)
            candidates.pop(0)
    return error


def _continuable(pipeline: Pipeline, chat: ChatRequest, delivery: _Delivery, error: UpstreamError) -> bool:
    """
    Whether a continuation can take the stream on after `error`: the upstream broke off (not
    refused), what was delivered is text only and as the upstream wrote it (no transform),
    and the client's request is a chat that does not end with its own assistant turn (a
    legacy completion's prompt has no turns: asked again, it would be answered from the start).
    """
    return (
        failure_kind(error) in CONTINUABLE
        and delivery.text_only
        and bool(delivery.text)
        and not pipeline.transforms
        and chat.protocol != "completions"
        and not ends_with_assistant(chat)
    )


async def _race(
    pipeline: Pipeline,
    route: Route,
    hedge: Route,
    chat: ChatRequest,
    delivery: _Delivery,
    rng: random.Random,
    kind: str,
) -> tuple[list[tuple[Route, UpstreamError]], int, bool]:
    """
    `route`, and `hedge` alongside it once `route` has given no first token for its
    `hedge_after`: the first to send a token wins, and the other is cancelled at once (its
    upstream request closed). Each holds what it sends before its first token, so the loser's
    preamble never reaches the sink. The failures in the order they came, how many routes were
    tried (1 when `route` ended before the hedge began), and whether one streamed to its end.
    `kind`: what asking `route` is (first, failover).
    """
    race = _Race(delivery)
    failures: list[tuple[Route, UpstreamError]] = []
    succeeded = False

    async def enter(racer: Route, entrant: _Entrant, kind: str) -> None:
        nonlocal succeeded
        with entrant.scope:
            error = await _try_route(pipeline, racer, chat, entrant, delivery, rng, kind)
            if error is None:
                succeeded = True
                if race.winner is None:  # an answer with no token (a refusal, an empty text): it wins all the same
                    await entrant.win()
            else:
                failures.append((racer, error))
                if not all(other.settled.is_set() for other in race.entrants if other is not entrant):
                    # The other goes on: this failure does not end the race, say so now.
                    await delivery.send(_notice("hedge_failed", 0, racer, 0.0, error))
        entrant.settled.set()

    tried = 1
    async with trio.open_nursery() as nursery:
        first = race.entrant(route, announce=False)
        nursery.start_soon(enter, route, first, kind)
        with trio.move_on_after(route.provider.timeouts.hedge_after):
            await first.settled.wait()
        if not first.settled.is_set():
            tried = 2
            reason = f"no first token within hedge_after ({route.provider.timeouts.hedge_after:g} s)"
            await delivery.send(RetryNotice("hedge", 1, hedge.provider.name, hedge.upstream_model, 0.0, reason))
            nursery.start_soon(enter, hedge, race.entrant(hedge, announce=True), "hedge")
    return failures, tried, succeeded


class _Race:
    """Two attempts racing for the first token; the sink takes the winner's items only."""

    def __init__(self, delivery: _Delivery) -> None:
        self.delivery = delivery
        self.entrants: list[_Entrant] = []
        self.winner: _Entrant | None = None

    def entrant(self, route: Route, *, announce: bool) -> _Entrant:
        entrant = _Entrant(self, route, announce=announce)
        self.entrants.append(entrant)
        return entrant


class _Entrant:
    """
    One attempt's way into a race's sink: before its first token it holds what it sends
    (`OPENED`, the role, an upstream's content-less events); its first token, or its end when
    it answered with none, wins the race if no other did: it cancels the others, and sends
    what it held.
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
        if race.winner is self or isinstance(item, RetryNotice):
            await race.delivery.send(item)
        elif isinstance(item, Delta) and item.has_content:
            if race.winner is not None:  # lost, and about to be cancelled: nothing of it goes out
                await trio.lowlevel.checkpoint()
                return
            await self.win()
            await race.delivery.send(item)
        elif len(self.held) < MAX_HELD_ITEMS:
            self.held.append(item)
        elif not isinstance(item, Delta) or item.says_anything:
            raise UpstreamProtocolError(f"the upstream sent more than {MAX_HELD_ITEMS} events before its first token")

    async def win(self) -> None:
        """Take the race: cancel the others, and send what this one held."""
        race = self.race
        race.winner = self
        self.settled.set()
        for other in race.entrants:
            if other is not self:
                other.scope.cancel()
        delivery = race.delivery
        if self.announce:
            route = self.route
            await delivery.send(RetryNotice("hedge_won", 1, route.provider.name, route.upstream_model, 0.0, ""))
        for item in self.held:
            await delivery.send(item)
        self.held.clear()


async def _try_route(
    pipeline: Pipeline,
    route: Route,
    chat: ChatRequest,
    sink: Sink,
    delivery: _Delivery,
    rng: random.Random,
    kind: str,
) -> UpstreamError | None:
    """
    One route, retried as its provider says (until a token left `delivery`): None once an
    attempt streamed to its end, else the last failure. `kind`: what its first attempt is.
    """
    routed = chat.routed(route.upstream_model)
    retry = route.provider.retry
    attempt = 0
    while True:
        try:
            await _attempt(pipeline, route, routed, sink, "retry" if attempt else kind)
            return None
        except UpstreamError as exc:
            error = exc
        if delivery.token_sent or not retry.retries(error) or attempt == retry.max_retries:
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


async def _attempt(pipeline: Pipeline, route: Route, chat: ChatRequest, sink: Sink, kind: str) -> None:
    """One upstream request, `kind` first, retry, failover, hedge or continuation: a span of its own when traced."""
    trace = pipeline.trace
    if trace is None:
        await _watched_attempt(pipeline, route, chat, sink)
        return
    with trace.attempt(kind, route) as attempt:
        await _watched_attempt(pipeline, route, replace(chat, trace=attempt), sink)


async def _watched_attempt(pipeline: Pipeline, route: Route, chat: ChatRequest, sink: Sink) -> None:
    watched = _WatchedSink(sink, route.provider.timeouts, passthrough=pipeline.passthrough)
    try:
        async with trio.open_nursery() as nursery:
            with watched.watchdog:
                nursery.start_soon(watched.watch, name="watchdog")
                await route.upstream.stream(chat, watched)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the attempt's own failure: the watchdog never fails
        raise _only(group) from None
    if watched.watchdog.cancelled_caught:
        kind, limit = watched.kind, watched.limit
        what = "first" if kind == "first_token_timeout" else "further"
        raise UpstreamTimeoutError(f"the upstream sent no {what} token within {kind} ({limit:g} s)", kind=kind)


def _only(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """
    What the attempt raised, out of the group trio's nursery raised around it: its one
    failure, or, when the attempt was cancelled from outside (both its tasks then raise
    `Cancelled`), one `Cancelled`.
    """
    leaves = list(exception_leaves(group))
    failures = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    if len(failures) == 1:
        return failures[0]
    return group if failures else leaves[0]


class _WatchedSink:
    """
    The sink an attempt's upstream writes into, and its watchdog: a task that cancels the
    attempt (`watchdog`) once the upstream was silent for the limit, not counting the time an
    item waited for the stages downstream (a slow client is not a silent upstream).

    A token only notes the time: moving a cancel scope's deadline twice per token (lifted
    while the item waits downstream, set again after) cost 4% of the proxy's CPU at 200
    streams; the task wakes once per limit at most, and sleeps again until the deadline the
    last token set.
    """

    def __init__(self, sink: Sink, timeouts: Timeouts, *, passthrough: bool) -> None:
        self._sink = sink
        self._passthrough = passthrough
        self._silence = timeouts.silence_timeout
        self._first_token = False
        self.kind, self.limit = "first_token_timeout", timeouts.first_token_timeout
        self.watchdog = trio.CancelScope()
        self._since = trio.current_time()
        """When the upstream's current silence began: the attempt's start, then each item after the first token."""
        self._waiting_downstream = False
        self._nap = trio.CancelScope()
        """The watchdog's sleep: cancelled to wake it when the limit changes, at the first token."""

    async def send(self, item: SessionItem) -> None:
        if isinstance(item, Delta):
            item.arrived = trio.current_time()
            if not self._passthrough:
                item.raw = None
                if not item.says_anything:
                    return  # only its bytes mattered (a `ping`, a block's end): the stages need not see it
            if item.has_content and not self._first_token:
                self._first_token = True
                self.kind, self.limit = "silence_timeout", self._silence
                self._nap.cancel()
        self._waiting_downstream = True
        try:
            await self._sink.send(item)
        finally:
            self._waiting_downstream = False
        if self._first_token:
            self._since = trio.current_time()

    async def watch(self) -> None:
        """Cancel `watchdog` when the upstream's silence reaches the limit; runs until cancelled."""
        while True:
            limit, now = self.limit, trio.current_time()
            if not limit:  # off (`silence_timeout` may be on after the first token)
                wake = math.inf
            elif self._waiting_downstream:
                wake = now + limit  # the clock starts again once the item is taken
            elif now >= self._since + limit:
                self.watchdog.cancel()
                return
            else:
                wake = self._since + limit
            self._nap = trio.CancelScope(deadline=wake)
            with self._nap:
                await trio.sleep_forever()


class _Continuing:
    """
    A continuation's way to the delivery: only what is new. Its opening (`OPENED`, the role,
    the upstream's own event bytes) is the client's already; the whitespace the client has
    and the prefill left out is trimmed (`Overlap`); its usage counts the broken attempt too.
    """

    def __init__(self, delivery: _Delivery, overlap: str, *, delivered: int) -> None:
        self._delivery = delivery
        self._overlap = Overlap(overlap)
        self._delivered_tokens = estimated_tokens(delivered)
        self.new_text = False

    async def send(self, item: SessionItem) -> None:
        if isinstance(item, Opened):
            return
        if isinstance(item, Delta):
            item.raw, item.role = None, None
            if item.text:
                item.text = self._overlap.trim(item.text)
            if item.usage is not None:
                item.usage = self._both_attempts(item.usage)
            if not item.says_anything:
                return
            self.new_text = self.new_text or item.has_content
        await self._delivery.send(item)

    def _both_attempts(self, usage: Usage) -> Usage:
        """
        The continuation's usage plus the broken attempt's, estimated: that one read the prompt
        without the delivered text, and wrote the delivered text.
        """
        first_prompt = max(usage.prompt_tokens - self._delivered_tokens, 0)
        return replace(
            usage,
            prompt_tokens=usage.prompt_tokens + first_prompt,
            completion_tokens=usage.completion_tokens + self._delivered_tokens,
            estimated=True,
        )


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
