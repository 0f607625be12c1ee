"""
Graceful shutdown: what happens between the request to stop (SIGTERM, SIGINT) and the exit.

hypercorn does the connection side: once its shutdown trigger returns, it stops accepting,
closes idle kept-alive connections and every busy HTTP connection as soon as its response is
over, and gives what is left its `graceful_timeout` before cancelling it. What it cannot know
is how long an LLM stream may go on, nor how to end one so that its client can tell. That is
this module's job, in one object the app and the serve layer share:

- from the trigger on, the app is draining: a request that still reaches it (one that was on
  its way, a new stream asked for on an open WebSocket) is refused with a 503 and
  `Retry-After`, in its protocol's own shape, and `/health` answers `draining` with a 503;
- every stream in flight runs on, for `[server] shutdown_grace_period` seconds at most; when
  the last one ends the drain is over, and hypercorn lets the process exit as soon as the
  last responses are written;
- at the deadline, or at a second trigger, every stream still running is interrupted: its
  upstream request is cancelled, and its client gets an in-stream error saying that the
  server is shutting down, after what it already had and never followed by `[DONE]`.

Streams are counted as sessions (`StreamSession`): every kind of stream — OpenAI, generic SSE
and NDJSON, resumable, WebSocket, and non-streaming requests — runs as one, and each turns an
interruption into its own protocol's error. A forwarded request's answer is counted too
(`fronts/forwarding.py`): interrupted, it ends its client's connection mid-body. hypercorn's
`graceful_timeout` is set longer than the grace period (`_serve.py`), so those final errors
reach their clients before it tears the connections down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Protocol

import trio

from .._exceptions import ShuttingDownError
from ..pipeline import StreamSession

__all__ = ["RETRY_AFTER", "GracefulShutdown", "InFlight", "InFlightStreams"]

logger = logging.getLogger("trioproxy.server")

RETRY_AFTER: Final = 1.0
"""
Seconds a refused client is told to wait (`Retry-After`): behind a load balancer, its next
attempt goes to another instance, so there is nothing to wait for but the balancer noticing.
"""


class InFlight(Protocol):
    """A stream in flight: a session, or a forwarded answer."""

    def interrupt(self, error: ShuttingDownError) -> None:
        """End it now, its client told why as well as its protocol can."""
        ...


class InFlightStreams:
    """The streams running now (a `SessionRegistry`); `wait_until_empty` waits for none to be left."""

    def __init__(self) -> None:
        self._sessions: set[InFlight] = set()
        self._emptied = trio.Event()
        self._emptied.set()

    def add(self, session: InFlight, /) -> None:
        self._sessions.add(session)
        if self._emptied.is_set():
            self._emptied = trio.Event()

    def discard(self, session: InFlight, /) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._emptied.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[InFlight]:
        return iter(list(self._sessions))

    async def wait_until_empty(self) -> None:
        while self._sessions:
            await self._emptied.wait()


class GracefulShutdown:
    """
    The drain of one server. The app registers its sessions in `streams` and hands each new
    one to `admit`; the serve layer runs `drain` when asked to stop.
    """

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.streams = InFlightStreams()
        self._draining = trio.Event()
        self._on_drain: list[Callable[[], None]] = []

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the drain begins (for what must change at once, without waiting)."""
        self._on_drain.append(callback)

    @property
    def draining(self) -> bool:
        """The server was asked to stop: new work is refused."""
        return self._draining.is_set()

    async def wait_draining(self) -> None:
        await self._draining.wait()

    def refusal(self) -> ShuttingDownError:
        """The error a request gets when it arrives during the drain (a fresh one each time)."""
        return ShuttingDownError(
            "the server is shutting down and takes no new requests: retry, another instance will answer",
            retry_after=RETRY_AFTER,
        )

    def admit(self, session: StreamSession) -> None:
        """A session that was just started: during the drain it is refused before it reaches its upstream."""
        if self.draining:
            session.interrupt(self.refusal())

    async def drain(
        self,
        asked_again: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """
        Start draining (reported through `task_status`, so nothing new is admitted once
        `nursery.start` returns), then wait for the streams in flight to end, but no longer
        than the grace period, nor past `asked_again()` returning (a second signal): whatever
        still runs then is interrupted.
        """
        self._draining.set()
        for callback in self._on_drain:
            callback()
        began = trio.current_time()
        logger.info(
            "draining: %d stream(s) in flight, %g s grace period; new requests get 503",
            len(self.streams),
            self.grace_period,
        )
        task_status.started()
        cut_short_by: str | None = "the grace period is over"  # None: every stream ended by itself
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = began + self.grace_period

            async def on_a_second_request() -> None:
                nonlocal cut_short_by
                await asked_again()
                cut_short_by = "asked again to stop"
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_a_second_request, name="second shutdown request")
            await self.streams.wait_until_empty()
            cut_short_by = None
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - began
        if cut_short_by is None:
            logger.info("drained: every stream ended by itself, in %.2f s", elapsed)
            return
        interrupted = list(self.streams)
        for session in interrupted:
            session.interrupt(
                ShuttingDownError(
                    "the server is shutting down and ended the stream before it completed",
                    retry_after=RETRY_AFTER,
                )
            )
        logger.warning(
            "drain over after %.2f s (%s): interrupted %d stream(s)", elapsed, cut_short_by, len(interrupted)
        )
