"""
The upstream reader stage: one attempt after another until one streams, watched by the
named timeouts.

Each attempt runs the upstream in a task of its own (the pump) and reads its items under a
deadline: `first_token_timeout` until the first token, then `silence_timeout` between tokens.
A deadline that passes cancels the pump, which closes the upstream connection.

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

from .._events import OPENED, Delta
from .._exceptions import TrioproxyError, UpstreamError, UpstreamTimeoutError
from .._request import ChatRequest

if TYPE_CHECKING:
    from .._router import Route
    from .._upstream import Upstream
    from ._assemble import Pipeline
    from ._session import SessionItem

__all__ = ["RetryNotice", "read_upstream"]

logger = logging.getLogger("trioproxy.upstream")

_NOT_FAILOVER_STATUSES = frozenset({400, 413, 422})
"""The client's own request is at fault: another upstream would refuse it too."""


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """A failed attempt before the first token, and what happens next."""

    kind: str  # "retry" (same route, after `delay`) or "failover" (the next route)
    attempt: int
    provider: str
    model: str
    delay: float
    reason: str


@dataclass(slots=True)
class _Progress:
    opened: bool = False
    token_sent: bool = False


async def read_upstream(
    pipeline: Pipeline,
    chat: ChatRequest,
    send: trio.MemorySendChannel[SessionItem],
    *,
    rng: random.Random | None = None,
) -> None:
    """Send the stream's items; a failure is sent as its last item. Closes `send`."""
    progress = _Progress()
    async with send:
        error: TrioproxyError | None = None
        with trio.move_on_after(pipeline.timeouts.total_timeout or math.inf) as total:
            try:
                await _attempts(pipeline, chat, send, progress, rng or random.Random())
            except TrioproxyError as exc:
                error = exc
            except trio.BrokenResourceError:
                return  # the stages downstream are gone: the session is ending
        if total.cancelled_caught:
            error = UpstreamTimeoutError(
                f"the stream exceeded total_timeout ({pipeline.timeouts.total_timeout:g} s)", kind="total_timeout"
            )
        if error is not None:
            try:
                await send.send(error)
            except trio.BrokenResourceError:
                pass


async def _attempts(
    pipeline: Pipeline,
    chat: ChatRequest,
    send: trio.MemorySendChannel[SessionItem],
    progress: _Progress,
    rng: random.Random,
) -> None:
    error: UpstreamError | None = None
    for route in pipeline.routes:
        if error is not None:
            await send.send(_notice("failover", 0, route, 0.0, error))
        routed = chat.routed(route.upstream_model)
        retry = route.provider.retry
        for attempt in range(retry.max_retries + 1):
            try:
                await _attempt(pipeline, route, routed, send, progress)
                return
            except UpstreamError as exc:
                error = exc
            if progress.token_sent or not error.retryable or attempt == retry.max_retries:
                break
            delay = retry.delay(attempt, retry_after=getattr(error, "retry_after", None), random=rng.random())
            logger.info("retrying %s/%s in %.3f s: %s", route.provider.name, route.upstream_model, delay, error)
            await send.send(_notice("retry", attempt + 1, route, delay, error))
            await trio.sleep(delay)
        if progress.token_sent or error.status in _NOT_FAILOVER_STATUSES:
            break
    assert error is not None
    raise error


async def _attempt(
    pipeline: Pipeline,
    route: Route,
    chat: ChatRequest,
    send: trio.MemorySendChannel[SessionItem],
    progress: _Progress,
) -> None:
    timeouts = route.provider.timeouts
    failure: TrioproxyError | None = None
    pump_send, pump_recv = trio.open_memory_channel["SessionItem"](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, route.upstream, chat, pump_send)
        kind, limit = "first_token_timeout", timeouts.first_token_timeout
        deadline = trio.current_time() + (limit or math.inf)
        async with pump_recv:
            while True:
                with trio.move_on_at(deadline) as watchdog:
                    try:
                        item = await pump_recv.receive()
                    except trio.EndOfChannel:
                        break
                if watchdog.cancelled_caught:
                    what = "the first token" if kind == "first_token_timeout" else "the next token"
                    failure = UpstreamTimeoutError(
                        f"no {what} from the upstream within {kind} ({limit:g} s)", kind=kind
                    )
                    nursery.cancel_scope.cancel()
                    break
                if isinstance(item, TrioproxyError):
                    failure = item
                    break
                if item is OPENED:
                    if progress.opened:
                        continue
                    progress.opened = True
                elif isinstance(item, Delta):
                    item.arrived = trio.current_time()
                    if not pipeline.passthrough:
                        item.raw = None
                    if item.has_content or progress.token_sent:
                        kind, limit = "silence_timeout", timeouts.silence_timeout
                        deadline = trio.current_time() + (limit or math.inf)
                        progress.token_sent = progress.token_sent or item.has_content
                await send.send(item)
    if failure is not None:
        raise failure


async def _pump(upstream: Upstream, chat: ChatRequest, send: trio.MemorySendChannel[SessionItem]) -> None:
    """Run one upstream request; its failure becomes the last item."""
    async with send:
        try:
            await upstream.stream(chat, send)  # type: ignore[arg-type]
            return
        except trio.BrokenResourceError:
            return  # the attempt stopped reading: it is being abandoned
        except TrioproxyError as exc:
            error = exc
        except Exception:
            # A bug, not an upstream failure: log it whole, and still tell the client.
            logger.exception("upstream request for %s failed", chat.model)
            error = TrioproxyError("internal error while streaming")
        try:
            await send.send(error)
        except trio.BrokenResourceError:
            pass


def _notice(kind: str, attempt: int, route: Route, delay: float, error: UpstreamError) -> RetryNotice:
    return RetryNotice(
        kind=kind,
        attempt=attempt,
        provider=route.provider.name,
        model=route.upstream_model,
        delay=delay,
        reason=error.message,
    )
