"""
`BalancedUpstream`: a provider's targets, each an `HttpUpstream` behind a circuit breaker,
taken by outstanding requests per weight.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .._exceptions import UpstreamConnectError, UpstreamError
from .._forwarding import ForwardRequest, ForwardSink
from .._policy import failure_kind
from .._request import ChatRequest
from .._targets import Breakers, BreakerState, Target, Verdict, choose
from ..pipeline._items import RetryNotice, Sink
from ._http import HttpUpstream

__all__ = ["BalancedUpstream"]

logger = logging.getLogger("trioproxy.upstream")


class BalancedUpstream:
    """
    A provider's targets (replicas), each an `HttpUpstream` with its own pool, behind a circuit
    breaker (`_targets`, its state in `breakers`): a request goes to the available target with
    the fewest outstanding requests per weight; when none is available it fails at once, as no
    connection (the reader fails over without a connect timeout spent). A failure that says
    the target is unwell (no connection, a broken one, a 5xx) counts against it; a change of
    its breaker is told to the request that caused it (a `breaker` notice) and counted in
    `transitions`.
    """

    def __init__(self, name: str, targets: list[tuple[str, float, HttpUpstream]], breakers: Breakers) -> None:
        self.name = name
        self.targets = [Target(url, breakers, weight) for url, weight, _ in targets]
        self._upstreams = {url: upstream for url, _, upstream in targets}
        self._breakers = breakers
        self.transitions: dict[tuple[str, BreakerState], int] = {}
        """How many times each target's breaker went to each state."""
        self._turn = 0

    async def stream(self, chat: ChatRequest, send: Sink) -> None:
        model = chat.upstream_model or chat.model

        async def tell(reason: str) -> None:
            await send.send(RetryNotice("breaker", 0, self.name, model, 0.0, reason))

        async def attempt(url: str, upstream: HttpUpstream) -> None:
            if chat.trace is not None:
                chat.trace.target(url)
            await upstream.stream(chat, send)

        await self._balanced(attempt, tell)

    async def forward(self, request: ForwardRequest, sink: ForwardSink) -> None:
        """
        Forwarded to a target taken as a stream's is; its answer's 5xx counts against it as a
        stream's failure does.
        """
        status = _StatusSeen(sink)  # a forwarded answer has no notices: the log and the metrics tell of the breaker
        await self._balanced(lambda _url, upstream: upstream.forward(request, status), None, status)

    async def _balanced(
        self,
        attempt: Callable[[str, HttpUpstream], Awaitable[None]],
        tell: Callable[[str], Awaitable[None]] | None,
        status: _StatusSeen | None = None,
    ) -> None:
        """
        `attempt` on the target whose turn it is (given its url and upstream), and again on the
        next while no connection could be made; its outcome (with a forwarded answer's `status`)
        judges the target, and a change of its breaker is counted, logged and, given `tell`, told
        to the request.
        """
        tried: list[Target] = []
        taken = await self._take(tried)
        if taken is None:
            raise UpstreamConnectError(
                f"every target of provider {self.name!r} is skipped for now: its circuit breaker is open"
            )
        while True:
            target, probe = taken
            try:
                await attempt(target.url, self._upstreams[target.url])
            except UpstreamError as exc:
                kind = failure_kind(exc)
                if kind not in _TARGET_FAULTS:
                    await self._settle(target, "released", probe)
                    raise
                change = await self._settle(target, "failed", probe)
                await self._judged(target, change, f": {exc.message}", tell)
                tried.append(target)
                if kind == "connect":
                    taken = await self._take(tried)
                    if taken is not None:
                        continue  # nothing was sent: another target takes the request at once
                raise
            except BaseException:
                await self._settle(target, "released", probe)
                raise
            if status is not None and status.code >= 500:
                change = await self._settle(target, "failed", probe)
                why = f": status {status.code}"
            else:
                change, why = await self._settle(target, "succeeded", probe), ""
            await self._judged(target, change, why, tell)
            return

    async def count_tokens(self, chat: ChatRequest) -> bytes | None:
        return await self._ask_one(lambda upstream: upstream.count_tokens(chat))

    async def compact(self, chat: ChatRequest) -> bytes | None:
        return await self._ask_one(lambda upstream: upstream.compact(chat))

    async def _ask_one(self, ask: Callable[[HttpUpstream], Awaitable[bytes | None]]) -> bytes | None:
        """A question other than a generation, to one target: no failover, the breaker not told."""
        taken = await self._take([])
        if taken is None:
            raise UpstreamConnectError(
                f"every target of provider {self.name!r} is skipped for now: its circuit breaker is open"
            )
        target, probe = taken
        try:
            return await ask(self._upstreams[target.url])
        finally:
            await self._settle(target, "released", probe)

    async def _take(self, tried: list[Target]) -> tuple[Target, bool] | None:
        """
        A target not tried yet, its request counted (`_targets.choose`), starting from the next
        in turn: equals take requests in turn.
        """
        self._turn = (self._turn + 1) % len(self.targets)
        rotated = self.targets[self._turn :] + self.targets[: self._turn]
        return await choose([target for target in rotated if target not in tried], trio.current_time())

    async def _settle(self, target: Target, verdict: Verdict, probe: bool) -> BreakerState | None:
        """
        Its request ended: no longer outstanding, and its verdict told to the breaker, shielded
        (a cancelled request frees the probe it held too).
        """
        target.outstanding -= 1
        with trio.CancelScope(shield=True):
            state = await self._breakers.settle(target.url, verdict, probe=probe, now=trio.current_time())
        return state

    async def _judged(
        self, target: Target, state: BreakerState | None, why: str, tell: Callable[[str], Awaitable[None]] | None
    ) -> None:
        """A change of a target's breaker (`state`, if any), counted, logged, and told to the request that caused it."""
        if state is None:
            return
        key = (target.url, state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        logger.warning("circuit breaker of %s target %s: %s%s", self.name, target.url, state, why)
        if tell is not None:
            await tell(f"the circuit breaker of {target.url} is {state.replace('_', '-')}{why}")

    async def expire_idle_connections(self) -> None:
        async with trio.open_nursery() as nursery:
            for upstream in self._upstreams.values():
                nursery.start_soon(upstream.expire_idle_connections)

    async def aclose(self) -> None:
        async with trio.open_nursery() as nursery:
            for upstream in self._upstreams.values():
                nursery.start_soon(upstream.aclose)


_TARGET_FAULTS: Final = frozenset({"connect", "connection_broken", "server_error"})
"""Failures that say the target itself is unwell, and count against its breaker."""


class _StatusSeen:
    """A forwarded answer's sink that keeps the answer's status, for the target's breaker."""

    def __init__(self, sink: ForwardSink) -> None:
        self._sink = sink
        self.code = 0

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.code = status
        await self._sink.head(status, headers)

    async def body(self, data: bytes) -> None:
        await self._sink.body(data)
