"""
A request's session: the nursery in which its pipeline's tasks run.

The HTTP response body is produced by an async generator, and a generator must never yield
from inside a nursery or cancel scope (PEP 789). So the session runs as its own task, in the
server's nursery, and hands the response its items through a bounded channel; the response
generator only iterates that channel and, in its `finally`, cancels the session. When the
client goes away, the server cancels the response, the generator's `finally` cancels the
session, and the upstream reader unwinds through httpx, which closes the upstream connection.

Items on `output` (`_items.py`): `OPENED` (the upstream accepted), `Delta`s, `RetryNotice`s,
`HEARTBEAT`s, and at most one `TrioproxyError`, always last. The end of the stream is the close
of the channel; a channel that closes with `completed` still false was cut short, and the
client must be told so rather than shown a truncated answer as whole. A session ended with
`interrupt(error)` (the server is shutting down) says so itself: `error` is its last item.
An item the client's protocol cannot carry ends it too, with the renderer's refusal as its
last word (`refused`): a failure, like the upstream's.

A response that has committed to streaming can take the items straight from the session's
tasks instead (`deliver_to`): the task that read a token from the upstream then also writes
it to the client, and a token crosses no task switch and no channel on its way through.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

from .._accumulator import Accumulator
from .._events import Delta
from .._exceptions import TrioproxyError, UpstreamError
from .._request import ChatRequest
from ._assemble import Pipeline
from ._items import HEARTBEAT, RetryNotice, SessionItem, Sink
from ._reader import read_upstream
from ._stats import StreamStats

__all__ = ["SessionRegistry", "StreamSession", "start_session"]

logger = logging.getLogger("trioproxy.session")


class StreamSession:
    """
    One generation in flight. Create with `start_session`; always end with `cancel()`.

    `accumulator` holds what was delivered (text, tool calls, usage), `stats` how it went
    (timings, retries, failures); `heartbeats` says whether idle keep-alives are sent (not for
    non-streaming requests); `streamed` says whether its output reaches someone as it goes (a
    stream's client or watchers), rather than as one answer sent whole or not at all: only
    then has an error that ends it text to account for (`ended_with`); `endpoint` names the
    route it serves, for metrics and logs.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        chat: ChatRequest,
        *,
        heartbeats: bool = True,
        streamed: bool = True,
        endpoint: str = "",
    ) -> None:
        self.pipeline = pipeline
        self.chat = chat
        self.streamed = streamed
        self.endpoint = endpoint
        self.accumulator = Accumulator()
        first = pipeline.routes[0]
        self.stats = StreamStats(started=trio.current_time(), provider=first.provider.name, model=first.upstream_model)
        self.completed = False
        self.finished = trio.Event()
        self._heartbeat_interval = pipeline.timeouts.heartbeat_interval if heartbeats else 0.0
        self._cancel_scope = trio.CancelScope()
        self._upstream_scope = trio.CancelScope()
        self._interruption: TrioproxyError | None = None
        self._last_word_scope = trio.CancelScope()
        """Around handing over the interruption error: `cancel()` means nobody is left to read it."""
        self._out, self.output = trio.open_memory_channel[SessionItem](0)
        self._writer: Sink | None = None
        self._writing = False
        """An item is being written. The delivery and the heartbeat both write: one item at a time."""
        self._write_turn = trio.lowlevel.ParkingLot()
        """Where a writer waits for the write under way. Not a `trio.Lock`: its bookkeeping (a
        parking-lot breaker per acquire and release) was 2% of the proxy's function calls per
        token, for a wait that only a heartbeat meeting a token ever has."""
        self._last_output = -math.inf
        self._hedge: tuple[str, str] | None = None
        """The provider and model asked alongside by a hedge, once one began."""

    async def run(self) -> None:
        """The session's task; returns when the stream ends or the session is cancelled."""
        try:
            with self._cancel_scope:
                await trio.lowlevel.checkpoint_if_cancelled()  # refused before it began: no upstream request
                try:
                    async with trio.open_nursery() as nursery:
                        self._last_output = trio.current_time()
                        if self._heartbeat_interval:
                            nursery.start_soon(self._send_heartbeats, name="heartbeat")
                        await self._run_stages(nursery)
                        nursery.cancel_scope.cancel()  # the stream is over: stop the heartbeat
                except* Exception:
                    # A stage's bug, not an upstream failure: log it whole, and still tell the client.
                    logger.exception("a stage of the %s session failed", self.chat.model)
                    # Like any last item, it waits for its reader; `cancel()` bounds that wait.
                    await self.send(TrioproxyError("internal error while streaming"))
            if self._interruption is not None and self._cancel_scope.cancelled_caught and not self.completed:
                with self._last_word_scope:
                    await self.send(self._interruption)
        finally:
            self.stats.ended = trio.current_time()
            self.stats.cancelled = self._cancel_scope.cancelled_caught
            self._out.close()
            self.finished.set()

    def cancel(self) -> None:
        """End the session now: every task stops and the upstream connection closes."""
        self._cancel_scope.cancel()
        self._last_word_scope.cancel()

    def interrupt(self, error: TrioproxyError) -> None:
        """
        End the session now, like `cancel()`, but with `error` as its last item, so that its
        client is told why (with how much it got) instead of seeing the stream stop. A session
        that already ended is left as it was.
        """
        if self._interruption is None:
            self._interruption = error
        self._cancel_scope.cancel()

    def ended_with(self, error: TrioproxyError) -> TrioproxyError:
        """
        `error` as this session's last word. Streamed, it says how much text went out before
        it, which is not repeated; an answer sent whole or not at all delivered none, and
        `error` is its whole story.
        """
        return self.accumulator.ended_with(error) if self.streamed else error

    @property
    def error(self) -> TrioproxyError | None:
        """The error that was the stream's last word, once one was (the upstream's, a refusal, ...)."""
        return self.stats.error

    @property
    def failed(self) -> bool:
        """An error was delivered: it was the stream's last word."""
        return self.stats.error is not None

    def deliver_to(self, writer: Sink) -> None:
        """
        From now on, every item is sent to `writer` by the task that produced it, instead
        of through `output`, which closes. An item being handed over through `output` right
        now was not taken: closing the channel gives it back to its task, which writes it.
        """
        self._writer = writer
        self.output.close()

    def abort_upstream(self) -> None:
        """Cancel the upstream request at once; the stages still deliver what they hold."""
        self._upstream_scope.cancel()

    async def _run_stages(self, nursery: trio.Nursery) -> None:
        """
        The reader, each stage in a task of its own, and delivery. With no stage in between,
        the reader hands its items straight to delivery: no channel hop on the hot path.
        """
        stages = self.pipeline.stages(self.abort_upstream)
        if not stages:
            with self._upstream_scope:
                await read_upstream(self.pipeline, self.chat, self)
        else:
            send, receive = trio.open_memory_channel[SessionItem](0)
            nursery.start_soon(self._read_upstream_into, send, name="upstream reader")
            for stage in stages:
                send, next_receive = trio.open_memory_channel[SessionItem](0)
                nursery.start_soon(stage, receive, send, name=getattr(stage, "func", stage).__name__)
                receive = next_receive
            async with receive:
                async for item in receive:
                    await self.send(item)
        self.completed = not self.failed and not self._upstream_scope.cancelled_caught

    async def _read_upstream_into(self, send: trio.MemorySendChannel[SessionItem]) -> None:
        async with send:
            # The stages downstream may stop reading: a validator ended the stream.
            with self._upstream_scope, contextlib.suppress(trio.BrokenResourceError):
                await read_upstream(self.pipeline, self.chat, send)

    async def send(self, item: SessionItem) -> None:
        """Delivery, the last stage: account for what the client gets, then hand it over."""
        if self.failed:
            return  # the stream already ended with its error
        if isinstance(item, Delta):
            self.accumulator.add(item)
            await self._send(item)
            if item.has_content:
                self.stats.token(trio.current_time(), arrived=item.arrived if item.text else None)
            return
        if isinstance(item, RetryNotice):
            self._count(item)
        elif isinstance(item, TrioproxyError):
            item = self._end_with(item)
        await self._send(item)

    def refused(self, refusal: TrioproxyError) -> TrioproxyError:
        """
        The client's renderer refused an item its protocol cannot carry (an upstream's tool
        calls interleaved): `refusal` ends the stream as its failure, counted as an error like
        the upstream's own, and its upstream request is cancelled. Returns the stream's last
        word, for the renderer to render in its place; nothing is delivered after it.
        """
        last_word = self._end_with(refusal)
        if not self._writing:  # else `_write` cancels it once the last word is written (from inside it)
            self.abort_upstream()
        return last_word

    def _end_with(self, error: TrioproxyError) -> TrioproxyError:
        if isinstance(error, UpstreamError) and not self.stats.counted(error):
            self.stats.failed(error)  # (a stream a continuation could not save ends with the failure it counted)
        error = self.ended_with(error)
        self.stats.error = error
        return error

    def _count(self, notice: RetryNotice) -> None:
        stats = self.stats
        if notice.kind == "breaker":
            stats.breaker_transitions.append(notice.reason)
        elif notice.kind == "hedge_won":
            stats.provider, stats.model = notice.provider, notice.model
        elif notice.kind in ("hedge_failed", "continuation_failed"):
            self._count_failed_attempt(notice)
        elif notice.kind in ("retry", "failover"):
            if notice.error is not None:
                stats.failed(notice.error)
            if notice.kind == "retry":
                stats.retries.append(notice.provider)
            else:
                stats.failed_over(notice.provider, notice.model)
        else:
            self._count_recovery(notice)

    def _count_failed_attempt(self, notice: RetryNotice) -> None:
        """A hedge's or a continuation's attempt failed; the stream goes on without it."""
        stats = self.stats
        assert notice.error is not None
        stats.failures.append((notice.provider, notice.error))
        if notice.kind == "hedge_failed" and notice.provider == stats.provider:
            # One of the two racing attempts failed, and the other goes on: the stream is now its.
            assert self._hedge is not None
            stats.provider, stats.model = self._hedge

    def _count_recovery(self, notice: RetryNotice) -> None:
        """A recovery other than a retry or failover (`hedge`, `continuation`, `skipped_event`)."""
        stats = self.stats
        stats.recoveries.append((notice.kind, stats.provider))
        if notice.kind == "hedge":
            self._hedge = (notice.provider, notice.model)
        elif notice.kind == "continuation":
            assert notice.error is not None
            if not stats.counted(notice.error):  # what broke the stream, on the provider it broke on
                stats.failed(notice.error)
            stats.provider, stats.model = notice.provider, notice.model

    async def _send(self, item: SessionItem) -> None:
        if self._writer is None:
            try:
                await self._out.send(item)
            except trio.BrokenResourceError:
                if self._writer is None:
                    raise
                await self._write(item)  # `deliver_to` closed the channel while this item waited
        else:
            await self._write(item)
        self._last_output = trio.current_time()

    async def _write(self, item: SessionItem) -> None:
        assert self._writer is not None
        while self._writing:
            await self._write_turn.park()
        self._writing = True
        failed_before = self.failed
        try:
            self._last_output = trio.current_time()  # a write under way is not silence: no heartbeat
            await self._writer.send(item)
        finally:
            self._writing = False
            if self.failed and not failed_before:  # the writer refused the item (`refused`); its last word is out
                self.abort_upstream()
            if self._write_turn:  # a writer waits (rare): its turn
                self._write_turn.unpark()

    async def _send_heartbeats(self) -> None:
        interval = self._heartbeat_interval
        while True:
            await trio.sleep_until(self._last_output + interval)
            if trio.current_time() >= self._last_output + interval:
                await self._send(HEARTBEAT)


class SessionRegistry(Protocol):
    """Where running sessions are kept (a `set` will do): `add`ed when started, `discard`ed when over."""

    def add(self, session: StreamSession, /) -> None: ...
    def discard(self, session: StreamSession, /) -> None: ...


def start_session(
    nursery: trio.Nursery,
    pipeline: Pipeline,
    chat: ChatRequest,
    *,
    heartbeats: bool = True,
    streamed: bool = True,
    endpoint: str = "",
    registry: SessionRegistry | None = None,
    on_end: Callable[[StreamSession], None] | None = None,
    guard: Callable[[StreamSession], AbstractAsyncContextManager[None]] | None = None,
) -> StreamSession:
    """
    Run a session in `nursery`; `registry` holds it from now until it ended (active streams),
    so that no session is ever running without being in it, not even before its task starts;
    `on_end` sees it when its task ends, however it ends (metrics; it frees the stream's place
    in the server's limits). `guard(session)`, when given, is a context the session runs in,
    entered by its task first: what admission must wait for (shared limits) happens there; it
    may refuse the session (`interrupt` it before it began: its refusal is its only item).
    """
    session = StreamSession(pipeline, chat, heartbeats=heartbeats, streamed=streamed, endpoint=endpoint)

    async def run() -> None:
        try:
            if guard is None:
                await session.run()
            else:
                async with guard(session):
                    await session.run()
        finally:
            if registry is not None:
                registry.discard(session)
            if on_end is not None:
                on_end(session)

    if registry is not None:
        registry.add(session)
    try:
        nursery.start_soon(run, name=f"session {chat.model}")
    except BaseException:
        if registry is not None:
            registry.discard(session)
        raise
    return session
