"""
The drain's timing rules (`server/_shutdown.py`) on trio's MockClock (`autojump_clock`): the
grace deadline, the end of the drain when the last stream ends, and the second request to
stop are each checked to the exact instant, with real sessions over an in-memory upstream.

`tests/e2e/test_graceful_shutdown.py` sends the signals to a real `trioproxy serve` process.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from tests.pipeline.test_session import CHAT, STALL, ScriptedUpstream, pipeline, route, tokens
from trioproxy._events import Delta
from trioproxy._exceptions import ShuttingDownError
from trioproxy.pipeline import SessionItem, StreamSession, start_session
from trioproxy.server._shutdown import RETRY_AFTER, GracefulShutdown


def slow_stream(n: int, interval: float = 1.0) -> list[Any]:
    """A stream of `n` one-letter tokens, `interval` s apart, then its finish."""
    script: list[Any] = tokens()
    for _ in range(n):
        script += [interval, Delta(text="x")]
    return [*script, Delta(finish_reason="stop")]


class Client:
    """Reads a session to its end, noting what came and when the last item did."""

    def __init__(self, session: StreamSession) -> None:
        self.session = session
        self.items: list[SessionItem] = []
        self.ended_at: float | None = None

    async def read(self) -> None:
        try:
            async for item in self.session.output:
                self.items.append(item)
        finally:
            self.ended_at = trio.current_time()
            self.session.cancel()

    @property
    def text(self) -> str:
        return "".join(i.text for i in self.items if isinstance(i, Delta))

    @property
    def error(self) -> ShuttingDownError | None:
        last = self.items[-1] if self.items else None
        return last if isinstance(last, ShuttingDownError) else None


def start(nursery: trio.Nursery, shutdown: GracefulShutdown, upstream: ScriptedUpstream) -> Client:
    """A session as the app starts one: registered in flight, admitted (or refused) by the drain."""
    session = start_session(nursery, pipeline(route(upstream)), CHAT, registry=shutdown.streams)
    shutdown.admit(session)
    client = Client(session)
    nursery.start_soon(client.read)
    return client


async def never() -> None:
    await trio.sleep_forever()


async def test_streams_that_end_within_the_grace_period_finish_and_the_drain_ends_with_the_last(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.server")
    shutdown = GracefulShutdown(grace_period=10)
    upstreams = ScriptedUpstream([slow_stream(3)]), ScriptedUpstream([slow_stream(5)])
    async with trio.open_nursery() as nursery:
        short, long = start(nursery, shutdown, upstreams[0]), start(nursery, shutdown, upstreams[1])
        await trio.sleep(1)
        await nursery.start(shutdown.drain, never)
        assert shutdown.draining
        await shutdown.streams.wait_until_empty()
        drained_at = trio.current_time()
        nursery.cancel_scope.cancel()  # `never` would wait on: the serve layer cancels it too

    assert (short.text, long.text) == ("xxx", "xxxxx")
    assert short.session.completed
    assert long.session.completed
    assert short.error is None
    assert long.error is None
    assert drained_at == 5.0  # the last stream's end, not the grace period's
    assert upstreams[0].cancelled == upstreams[1].cancelled == []
    assert "draining: 2 stream(s) in flight, 10 s grace period" in caplog.text


async def test_at_the_grace_deadline_every_stream_ends_with_the_shutdown_error(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    shutdown = GracefulShutdown(grace_period=2)
    upstreams = ScriptedUpstream([slow_stream(100)]), ScriptedUpstream([slow_stream(100, interval=0.5)])
    async with trio.open_nursery() as nursery:
        one, two = start(nursery, shutdown, upstreams[0]), start(nursery, shutdown, upstreams[1])
        await trio.sleep(2.25)
        await nursery.start(shutdown.drain, never)

    assert upstreams[0].cancelled == upstreams[1].cancelled == [4.25]  # the grace period after the drain began
    assert (one.text, two.text) == ("xxxx", "xxxxxxxx")
    for client in (one, two):
        assert client.ended_at == 4.25
        assert client.error is not None
        assert not client.session.completed
        assert client.error.message.startswith("the server is shutting down and ended the stream before it completed")
        assert client.error.characters_delivered == len(client.text)
        assert client.error.status == 503
        assert client.error.code == "server_shutting_down"
    assert one.error is not two.error  # each session's error says how much it delivered
    assert "(the grace period is over): interrupted 2 stream(s)" in caplog.text


async def test_a_second_request_to_stop_ends_the_streams_at_once(autojump_clock: trio.abc.Clock) -> None:
    shutdown = GracefulShutdown(grace_period=30)
    upstream = ScriptedUpstream([slow_stream(100)])
    asked_again = trio.Event()
    async with trio.open_nursery() as nursery:
        client = start(nursery, shutdown, upstream)
        await nursery.start(shutdown.drain, asked_again.wait)
        await trio.sleep(3)
        asked_again.set()

    assert upstream.cancelled == [3.0]
    assert client.error is not None
    assert client.ended_at == 3.0


async def test_a_stream_asked_for_during_the_drain_is_refused_before_its_upstream(
    autojump_clock: trio.abc.Clock,
) -> None:
    shutdown = GracefulShutdown(grace_period=30)
    upstream = ScriptedUpstream([slow_stream(5)])
    async with trio.open_nursery() as nursery:
        await nursery.start(shutdown.drain, never)
        late = start(nursery, shutdown, upstream)
        await shutdown.streams.wait_until_empty()
        nursery.cancel_scope.cancel()

    assert upstream.calls == 0
    assert late.items == [late.error]  # the refusal is its first and only item
    assert late.error is not None
    assert late.error.retry_after == RETRY_AFTER
    assert "takes no new requests" in late.error.message
    assert trio.current_time() == 0.0


async def test_with_nothing_in_flight_the_drain_is_over_at_once(autojump_clock: trio.abc.Clock) -> None:
    shutdown = GracefulShutdown(grace_period=30)
    drained = []
    shutdown.on_drain(lambda: drained.append(trio.current_time()))
    with trio.fail_after(1e-9):
        async with trio.open_nursery() as nursery:
            await nursery.start(shutdown.drain, never)
            await shutdown.streams.wait_until_empty()
            nursery.cancel_scope.cancel()
    assert drained == [0.0]


async def test_a_zero_grace_period_ends_every_stream_at_once(autojump_clock: trio.abc.Clock) -> None:
    shutdown = GracefulShutdown(grace_period=0)
    upstream = ScriptedUpstream([[*tokens("a"), STALL]])
    async with trio.open_nursery() as nursery:
        client = start(nursery, shutdown, upstream)
        await trio.sleep(1)
        await nursery.start(shutdown.drain, never)
    assert upstream.cancelled == [1.0]
    assert client.text == "a"
    assert client.error is not None
