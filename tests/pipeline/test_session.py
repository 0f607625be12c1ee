"""
The session's timing and failure rules, on trio's MockClock (`autojump_clock`): every
deadline is checked to the exact instant, with no real sleep.

The upstream here is an in-memory script, so the test sees exactly when it was cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from trioproxy import (
    Delta,
    ToolCallDelta,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    Usage,
)
from trioproxy._config import ProviderConfig
from trioproxy._events import OPENED, Opened
from trioproxy._exceptions import ContextLengthError, RequestError, StreamInterrupted
from trioproxy._policy import BufferConfig, RetryConfig, Timeouts
from trioproxy._request import parse_chat_request
from trioproxy._router import Route
from trioproxy.pipeline import HEARTBEAT, Heartbeat, Pipeline, RetryNotice, ValidationError, banned_phrases
from trioproxy.pipeline._session import StreamSession
from trioproxy.server._metrics import MAX_MODEL_LABELS, Metrics

STALL = "stall"
CHAT = parse_chat_request({"model": "p/m", "messages": [{"role": "user", "content": "hi"}], "stream": True})


@dataclass
class ScriptedUpstream:
    """Each request plays the next script: seconds to sleep, items to send, errors to raise."""

    scripts: list[list[Any]]
    calls: int = 0
    started: list[float] = field(default_factory=list)
    cancelled: list[float] = field(default_factory=list)
    chats: list[Any] = field(default_factory=list)

    async def stream(self, chat: Any, send: trio.MemorySendChannel[Any]) -> None:
        script = self.scripts[self.calls]
        self.calls += 1
        self.chats.append(chat)
        self.started.append(trio.current_time())
        try:
            for step in script:
                if isinstance(step, (int, float)):
                    await trio.sleep(step)
                elif step == STALL:
                    await trio.sleep_forever()
                elif isinstance(step, Exception):
                    raise step
                else:
                    await send.send(step)
        except trio.Cancelled:
            self.cancelled.append(trio.current_time())
            raise

    async def aclose(self) -> None:
        pass


def tokens(*texts: str) -> list[Any]:
    return [OPENED, Delta(role="assistant"), *(Delta(text=t) for t in texts)]


def route(upstream: ScriptedUpstream, name: str = "p", **policy: Any) -> Route:
    provider = ProviderConfig(
        name=name,
        type="openai",
        base_url="http://127.0.0.1:9/v1",
        timeouts=policy.pop("timeouts", Timeouts(heartbeat_interval=0)),
        retry=policy.pop("retry", RetryConfig(max_retries=0)),
        **policy,
    )
    return Route(provider, upstream, "m")  # type: ignore[arg-type]


NO_BUFFER = BufferConfig()


def pipeline(*routes: Route, buffer: BufferConfig = NO_BUFFER, validators: tuple = ()) -> Pipeline:
    return Pipeline(routes=routes, buffer=buffer, transforms=(), validators=validators)


async def run(p: Pipeline, *, heartbeats: bool = True) -> tuple[list[tuple[float, Any]], StreamSession]:
    """Run a session to its end; every output item with the instant it came out."""
    session = StreamSession(p, CHAT, heartbeats=heartbeats)
    items = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        async for item in session.output:
            items.append((trio.current_time(), item))
    return items, session


def texts(items: list[tuple[float, Any]]) -> str:
    return "".join(i.text for _, i in items if isinstance(i, Delta))


# --- buffering ---------------------------------------------------------------------------


async def test_buffer_flushes_on_its_deadline_even_when_no_token_follows(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("Hel", "lo"), 10.0, Delta(text=" world"), Delta(finish_reason="stop")]])
    buffer = BufferConfig(min_chunk_size=100, flush_interval_ms=250)
    items, session = await run(pipeline(route(upstream), buffer=buffer))

    chunks = [(t, i.text) for t, i in items if isinstance(i, Delta) and i.text]
    assert chunks == [(0.25, "Hello"), (10.0, " world")]  # the tail flushes before the finish reason
    assert session.stats.buffer_waits == pytest.approx([0.25, 0.0])  # measured from the oldest character
    assert session.completed


async def test_buffers_worst_case_wait_is_flush_interval(autojump_clock: trio.abc.Clock) -> None:
    # Tokens every 40 ms into a buffer that would hold 1000 characters: each chunk leaves at
    # most flush_interval after its oldest character arrived.
    script = [OPENED]
    for _ in range(50):
        script += [0.04, Delta(text="x")]
    upstream = ScriptedUpstream([script])
    items, _ = await run(pipeline(route(upstream), buffer=BufferConfig(min_chunk_size=1000, flush_interval_ms=100)))

    arrivals = [0.04 * (n + 1) for n in range(50)]
    sent_at = []
    for t, item in items:
        if isinstance(item, Delta) and item.text:
            sent_at += [t] * len(item.text)
    assert len(sent_at) == 50
    waits = [sent - arrived for sent, arrived in zip(sent_at, arrivals, strict=True)]
    assert max(waits) == pytest.approx(0.1)
    assert min(waits) >= 0


# --- heartbeats --------------------------------------------------------------------------


async def test_heartbeats_while_the_upstream_stalls_before_its_first_token(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[OPENED, 50.0, Delta(text="late"), Delta(finish_reason="stop")]])
    timeouts = Timeouts(heartbeat_interval=15, first_token_timeout=60)
    items, session = await run(pipeline(route(upstream, timeouts=timeouts)))

    beats = [t for t, i in items if isinstance(i, Heartbeat)]
    assert beats == [15.0, 30.0, 45.0]
    assert texts(items) == "late"
    assert session.completed


async def test_heartbeats_in_mid_stream_only_after_a_quiet_interval(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), 10.0, Delta(text="b"), 20.0, Delta(text="c")]])
    items, _ = await run(pipeline(route(upstream, timeouts=Timeouts(heartbeat_interval=15))))

    assert [
        (t, "hb" if i is HEARTBEAT else getattr(i, "text", ""))
        for t, i in items
        if i is HEARTBEAT or getattr(i, "text", "")
    ] == [
        (0.0, "a"),
        (10.0, "b"),
        (25.0, "hb"),
        (30.0, "c"),
    ]


async def test_no_heartbeats_for_non_streaming_sessions(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), 100.0, Delta(text="b")]])
    items, _ = await run(pipeline(route(upstream, timeouts=Timeouts(heartbeat_interval=15))), heartbeats=False)
    assert not any(isinstance(i, Heartbeat) for _, i in items)


# --- timeouts ----------------------------------------------------------------------------


async def test_first_token_timeout_fires_at_its_deadline_and_cancels_the_upstream(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = ScriptedUpstream([[OPENED, Delta(role="assistant"), STALL]])
    items, session = await run(
        pipeline(route(upstream, timeouts=Timeouts(first_token_timeout=30, heartbeat_interval=0)))
    )

    t, error = items[-1]
    assert isinstance(error, UpstreamTimeoutError)
    assert (t, error.kind) == (30.0, "first_token_timeout")
    assert upstream.cancelled == [30.0]
    assert not session.completed


async def test_silence_timeout_measures_the_gap_between_tokens(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), 4.0, Delta(text="b"), STALL]])
    items, _ = await run(pipeline(route(upstream, timeouts=Timeouts(silence_timeout=5, heartbeat_interval=0))))

    t, error = items[-1]
    assert isinstance(error, UpstreamTimeoutError)
    assert (t, error.kind) == (9.0, "silence_timeout")
    assert upstream.cancelled == [9.0]
    assert texts(items) == "ab"
    assert error.characters_delivered == 2
    assert "after 2 characters were delivered" in error.message


async def test_the_first_token_moves_the_watchdog_from_the_first_token_timeout_to_the_silence_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The watchdog asleep until the first token's deadline (60 s) wakes for the shorter silence (5 s)."""
    upstream = ScriptedUpstream([[*tokens("a"), STALL]])
    timeouts = Timeouts(first_token_timeout=60, silence_timeout=5, heartbeat_interval=0)
    items, _ = await run(pipeline(route(upstream, timeouts=timeouts)))

    t, error = items[-1]
    assert isinstance(error, UpstreamTimeoutError)
    assert (t, error.kind) == (5.0, "silence_timeout")


async def test_silence_is_watched_after_the_first_token_when_the_first_token_timeout_is_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = ScriptedUpstream([[OPENED, 100.0, *tokens("a")[1:], STALL]])
    timeouts = Timeouts(first_token_timeout=0, silence_timeout=5, heartbeat_interval=0)
    items, _ = await run(pipeline(route(upstream, timeouts=timeouts)))

    t, error = items[-1]
    assert isinstance(error, UpstreamTimeoutError)
    assert (t, error.kind) == (105.0, "silence_timeout")
    assert texts(items) == "a"


async def test_with_the_silence_timeout_off_only_the_first_token_is_watched(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), 1000.0, Delta(text="b"), Delta(finish_reason="stop")]])
    timeouts = Timeouts(first_token_timeout=5, silence_timeout=0, heartbeat_interval=0)
    items, session = await run(pipeline(route(upstream, timeouts=timeouts)))

    assert texts(items) == "ab"
    assert session.completed
    assert items[-1][0] == 1000.0


async def test_total_timeout_bounds_the_whole_stream(autojump_clock: trio.abc.Clock) -> None:
    script = tokens("a")
    for _ in range(100):
        script += [1.0, Delta(text="a")]
    upstream = ScriptedUpstream([script])
    items, _ = await run(pipeline(route(upstream, timeouts=Timeouts(total_timeout=20, heartbeat_interval=0))))

    t, error = items[-1]
    assert isinstance(error, UpstreamTimeoutError)
    assert (t, error.kind) == (20.0, "total_timeout")
    assert upstream.cancelled == [20.0]


# --- retries and failover ----------------------------------------------------------------


async def test_retry_delays_follow_the_config_and_retry_after(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream(
        [
            [UpstreamStatusError("busy", status=503)],
            [UpstreamStatusError("slow down", status=429, retry_after=5.0)],
            [UpstreamBrokenError("reset")],
            [*tokens("ok"), Delta(finish_reason="stop")],
        ]
    )
    retry = RetryConfig(max_retries=3, base_delay_ms=100, exponential_base=3, max_delay_ms=10_000, jitter=0)
    items, session = await run(pipeline(route(upstream, retry=retry)))

    notices = [i for _, i in items if isinstance(i, RetryNotice)]
    assert [(n.kind, n.attempt, n.delay) for n in notices] == [("retry", 1, 0.1), ("retry", 2, 5.0), ("retry", 3, 0.9)]
    assert upstream.started == pytest.approx([0.0, 0.1, 5.1, 6.0])
    assert texts(items) == "ok"
    assert session.completed


async def test_jitter_only_shortens_the_delay(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[UpstreamStatusError("busy", status=500)]] * 5 + [tokens("ok")])
    retry = RetryConfig(max_retries=5, base_delay_ms=1000, exponential_base=2, max_delay_ms=3000, jitter=0.5)
    items, _ = await run(pipeline(route(upstream, retry=retry)))

    delays = [i.delay for _, i in items if isinstance(i, RetryNotice)]
    ceilings = [1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))


async def test_failover_to_the_fallback_after_the_retries(autojump_clock: trio.abc.Clock) -> None:
    primary = ScriptedUpstream([[UpstreamStatusError("down", status=502)]] * 2)
    backup = ScriptedUpstream([[*tokens("from", " backup"), Delta(finish_reason="stop")]])
    retry = RetryConfig(max_retries=1, base_delay_ms=10, jitter=0)
    items, session = await run(pipeline(route(primary, retry=retry), route(backup, name="backup")))

    notices = [(i.kind, i.provider) for _, i in items if isinstance(i, RetryNotice)]
    assert notices == [("retry", "p"), ("failover", "backup")]
    assert (primary.calls, backup.calls) == (2, 1)
    assert texts(items) == "from backup"
    assert session.completed


async def test_no_connection_or_no_first_token_fails_over_at_once(autojump_clock: trio.abc.Clock) -> None:
    refused = ScriptedUpstream([[UpstreamConnectError("refused")]])
    silent = ScriptedUpstream([[OPENED, STALL]])
    backup = ScriptedUpstream([[*tokens("from", " backup"), Delta(finish_reason="stop")]])
    timeouts = Timeouts(first_token_timeout=10, heartbeat_interval=0)
    retry = RetryConfig(max_retries=3, base_delay_ms=500, jitter=0)
    items, session = await run(
        pipeline(
            route(refused, retry=retry, timeouts=timeouts),
            route(silent, name="silent", retry=retry, timeouts=timeouts),
            route(backup, name="backup", retry=retry, timeouts=timeouts),
        )
    )

    assert (refused.calls, silent.calls) == (1, 1)  # neither retried
    assert silent.cancelled == [10.0]
    assert backup.started == [10.0]  # no backoff before a failover
    notices = [(i.kind, i.provider) for _, i in items if isinstance(i, RetryNotice)]
    assert notices == [("failover", "silent"), ("failover", "backup")]
    assert texts(items) == "from backup"
    assert session.completed


async def test_a_first_token_timeout_is_retried_when_retry_on_names_it(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[OPENED, STALL], [*tokens("second"), Delta(finish_reason="stop")]])
    timeouts = Timeouts(first_token_timeout=10, heartbeat_interval=0)
    retry = RetryConfig(max_retries=1, base_delay_ms=500, jitter=0, retry_on=("first_token_timeout",))
    items, session = await run(pipeline(route(upstream, timeouts=timeouts, retry=retry)))

    assert upstream.cancelled == [10.0]
    assert upstream.started == [0.0, 10.5]
    assert [i for _, i in items if isinstance(i, Opened)] == [OPENED]  # committed once
    assert texts(items) == "second"
    assert session.completed


async def test_what_retry_on_leaves_out_is_not_retried(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[UpstreamStatusError("busy", status=503)]])
    retry = RetryConfig(max_retries=3, retry_on=("rate_limit",))
    items, _ = await run(pipeline(route(upstream, retry=retry)))
    assert upstream.calls == 1
    assert isinstance(items[-1][1], UpstreamStatusError)


async def test_a_client_error_is_neither_retried_nor_failed_over(autojump_clock: trio.abc.Clock) -> None:
    error = UpstreamStatusError("bad request", status=400)
    upstream = ScriptedUpstream([[error]])
    backup = ScriptedUpstream([])
    items, _ = await run(pipeline(route(upstream, retry=RetryConfig(max_retries=3)), route(backup, name="backup")))

    ((_, last),) = items
    assert type(last) is UpstreamStatusError
    assert last.message == "bad request"
    assert last.status == 400
    assert last.__cause__ is error  # a new error: the caught one is left as it was
    assert (upstream.calls, backup.calls) == (1, 0)


async def test_a_protocol_error_is_not_retried_but_fails_over(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[OPENED, UpstreamProtocolError("garbage")]])
    backup = ScriptedUpstream([[*tokens("clean"), Delta(finish_reason="stop")]])
    items, session = await run(
        pipeline(route(upstream, retry=RetryConfig(max_retries=3)), route(backup, name="backup"))
    )

    assert (upstream.calls, backup.calls) == (1, 1)
    assert [(i.kind, i.provider) for _, i in items if isinstance(i, RetryNotice)] == [("failover", "backup")]
    assert texts(items) == "clean"
    assert session.completed


async def test_no_code_path_sends_text_twice(autojump_clock: trio.abc.Clock) -> None:
    """Fail the upstream at every point of a stream, with retries and a fallback ready."""
    words = ["one", " two", " three", " four"]
    full = [*tokens(*words), Delta(finish_reason="stop")]
    for cut in range(len(full) + 1):
        failing = [*full[:cut], UpstreamBrokenError("connection reset")]
        upstream = ScriptedUpstream([failing, full, full, full])
        backup = ScriptedUpstream([full])
        retry = RetryConfig(max_retries=2, base_delay_ms=1, jitter=0)
        items, session = await run(pipeline(route(upstream, retry=retry), route(backup, name="backup")))

        text = texts(items)
        tokens_before_failure = sum(1 for step in full[:cut] if isinstance(step, Delta) and step.text)
        if tokens_before_failure == 0:
            # nothing reached the client: a retry is safe and the text arrives exactly once
            assert text == "".join(words), cut
            assert session.completed, cut
        else:
            # text reached the client: no replay, just an error after exactly what was sent
            assert text == "".join(words[:tokens_before_failure]), cut
            error = items[-1][1]
            assert isinstance(error, UpstreamBrokenError), cut
            assert error.characters_delivered == len(text), cut
            assert upstream.calls == 1, cut
            assert backup.calls == 0, cut


# --- validators --------------------------------------------------------------------------


async def test_a_failing_validator_withholds_the_chunk_and_cancels_the_upstream(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = ScriptedUpstream(
        [[*tokens("all", " fine", " then", " for"), 1.0, Delta(text="bidden"), 1.0, Delta(text=" more")]]
    )
    items, session = await run(pipeline(route(upstream), validators=(banned_phrases(["forbidden"]),)))

    t, error = items[-1]
    assert isinstance(error, ValidationError)
    assert "forbidden" in error.message
    assert t == 1.0
    assert upstream.cancelled == [1.0]
    assert texts(items) == "all fine then for"
    assert not session.completed


async def test_cancelling_the_session_cancels_the_upstream_at_once(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), STALL]])
    session = StreamSession(pipeline(route(upstream)), CHAT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.sleep(3)
        session.cancel()
    assert upstream.cancelled == [3.0]
    assert session.finished.is_set()


async def test_an_interrupted_session_ends_with_its_error_after_what_was_delivered(
    autojump_clock: trio.abc.Clock,
) -> None:
    """`interrupt` (the server shutting down) cancels the upstream and says why, as the last item."""
    upstream = ScriptedUpstream([[*tokens("ab", "cd"), STALL]])
    session = StreamSession(pipeline(route(upstream)), CHAT)
    received = []

    async def interrupt_at_2() -> None:
        await trio.sleep(2)
        session.interrupt(StreamInterrupted("the server is shutting down"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        nursery.start_soon(interrupt_at_2)
        async for item in session.output:
            received.append((trio.current_time(), item))

    assert upstream.cancelled == [2.0]
    assert [i.text for _, i in received if isinstance(i, Delta) and i.text] == ["ab", "cd"]
    last_at, last = received[-1]
    assert isinstance(last, StreamInterrupted)
    assert last_at == 2.0
    assert last.message == "the server is shutting down (after 4 characters were delivered; they are not repeated)"
    assert last.characters_delivered == 4  # type: ignore[attr-defined]
    assert not session.completed


async def test_an_interruption_is_not_delivered_to_a_client_that_left(autojump_clock: trio.abc.Clock) -> None:
    """The session may not wait for a reader that is gone: `cancel` (its response ended) wins."""
    upstream = ScriptedUpstream([[*tokens("ab"), STALL]])
    session = StreamSession(pipeline(route(upstream)), CHAT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.sleep(1)  # nobody reads the output: the session waits to hand over OPENED
        session.interrupt(StreamInterrupted("the server is shutting down"))
        await trio.sleep(5)
        assert not session.finished.is_set()  # its error waits for the client to read it
        session.cancel()
    assert session.finished.is_set()
    assert trio.current_time() == 6.0


async def test_a_slow_client_is_not_a_silent_upstream(autojump_clock: trio.abc.Clock) -> None:
    """The silence watchdog times the upstream only: waiting on the client does not count."""
    upstream = ScriptedUpstream([[*tokens("a", "b", "c", "d"), Delta(finish_reason="stop")]])
    timeouts = Timeouts(silence_timeout=5, first_token_timeout=5, heartbeat_interval=0)
    session = StreamSession(pipeline(route(upstream, timeouts=timeouts)), CHAT)
    received = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        async for item in session.output:
            received.append(item)
            await trio.sleep(30)  # the client reads one item every 30 s

    assert "".join(i.text for i in received if isinstance(i, Delta)) == "abcd"
    assert not any(isinstance(i, UpstreamTimeoutError) for i in received)
    assert upstream.cancelled == []
    assert session.completed


# --- direct delivery ------------------------------------------------------------------------


async def deliver_directly(
    p: Pipeline, *, write_time: float = 0.0
) -> tuple[list[tuple[float, Any]], list[tuple[float, Any]], StreamSession]:
    """
    Read the session's first item from `output`, then let it write the rest itself (as a
    committed response does), each write taking `write_time`; no two writes may overlap.
    """
    session = StreamSession(p, CHAT)
    read, written = [], []
    writing = False

    async def writer(item: Any) -> None:
        nonlocal writing
        assert not writing, "two writes at once"
        writing = True
        written.append((trio.current_time(), item))
        await trio.sleep(write_time)
        writing = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        read.append((trio.current_time(), await session.output.receive()))
        await trio.sleep(1)  # meanwhile the session's task waits, handing over its next item
        session.deliver_to(SimpleNamespace(send=writer))
        with pytest.raises(trio.ClosedResourceError):
            await session.output.receive()
    return read, written, session


async def test_direct_delivery_takes_over_with_the_item_that_was_being_handed_over(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = ScriptedUpstream([[*tokens("a", "b"), 2.0, Delta(text="c"), Delta(finish_reason="stop")]])
    read, written, session = await deliver_directly(pipeline(route(upstream)))

    assert [i for _, i in read] == [OPENED]
    assert [(t, i.text) for t, i in written if isinstance(i, Delta) and i.text] == [(1.0, "a"), (1.0, "b"), (3.0, "c")]
    assert isinstance(written[0][1], Delta)
    assert written[0][1].role == "assistant"  # the item that was waiting
    assert written[-1][1].finish_reason == "stop"
    assert session.completed
    assert not session.failed
    assert session.stats.ttft == 1.0  # a token counts when the client got it


@pytest.mark.parametrize(
    ("pause", "expected"),
    [
        # Each write takes 4 s: a heartbeat is due 5 s after the last write ended, and none is
        # sent while a write is under way (b's, from 29 to 33 s).
        (20.0, [(5.0, "a"), (14.0, "hb"), (23.0, "hb"), (29.0, "b"), (33.0, "c")]),
        # b comes at 24 s, while the heartbeat due at 23 s is being written: it waits until 27 s.
        (15.0, [(5.0, "a"), (14.0, "hb"), (23.0, "hb"), (27.0, "b"), (31.0, "c")]),
    ],
    ids=["a heartbeat waits for a write", "a token waits for a heartbeat's write"],
)
async def test_direct_delivery_writes_heartbeats_and_items_one_at_a_time(
    autojump_clock: trio.abc.Clock, pause: float, expected: list[tuple[float, str]]
) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), pause, Delta(text="b"), Delta(text="c")]])
    timeouts = Timeouts(heartbeat_interval=5)
    _, written, session = await deliver_directly(pipeline(route(upstream, timeouts=timeouts)), write_time=4.0)

    assert [(t, "hb" if i is HEARTBEAT else i.text) for t, i in written if i is HEARTBEAT or i.text] == expected
    assert session.completed


async def test_direct_delivery_ends_with_the_error_as_the_last_word(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), 1.0, UpstreamProtocolError("garbled")]])
    _, written, session = await deliver_directly(pipeline(route(upstream)))

    last = written[-1][1]
    assert isinstance(last, UpstreamProtocolError)
    assert "after 1 characters were delivered" in last.message
    assert session.failed
    assert not session.completed


async def test_word_buffer_times_each_chunk_from_its_own_oldest_character(autojump_clock: trio.abc.Clock) -> None:
    """In word mode the latest word is always held: its age, not the stream's, sets the deadline."""
    script = [OPENED]
    for word in ("one", " two", " three", " four"):
        script += [1.0, Delta(text=word)]
    upstream = ScriptedUpstream([[*script, STALL]])
    buffer = BufferConfig(buffer_by_word=True, flush_interval_ms=500)
    session = StreamSession(pipeline(route(upstream, timeouts=Timeouts(heartbeat_interval=0)), buffer=buffer), CHAT)
    chunks = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        async for item in session.output:
            if isinstance(item, Delta) and item.text:
                chunks.append((trio.current_time(), item.text))
                if len(chunks) == 4:
                    session.cancel()

    # each word waits for the next word's leading space, or for its 500 ms deadline
    assert chunks == [(1.5, "one"), (2.5, " two"), (3.5, " three"), (4.5, " four")]
    assert session.stats.buffer_waits == pytest.approx([0.5, 0.5, 0.5, 0.5])


# --- what the session tallies for logs and metrics (session.stats) ------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_completed_stream_has_its_timings(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream(
        [[OPENED, 0.5, Delta(text="a"), 0.02, Delta(text="b"), 0.03, Delta(text="c"), Delta(finish_reason="stop")]]
    )
    _, session = await run(pipeline(route(upstream)))

    stats = session.stats
    assert (stats.provider, stats.model) == ("p", "m")
    assert stats.ttft == pytest.approx(0.5)
    assert stats.token_gaps == pytest.approx([0.02, 0.03])
    assert stats.duration == pytest.approx(0.55)
    assert (stats.outcome, stats.retries, stats.failures, stats.cancelled) == ("completed", [], [], False)


async def test_retries_and_failovers_are_counted_against_the_provider_that_failed(
    autojump_clock: trio.abc.Clock,
) -> None:
    first = UpstreamStatusError("busy", status=429)
    second = UpstreamConnectError("refused")
    primary = ScriptedUpstream([[first], [second]])
    backup = ScriptedUpstream([[*tokens("ok"), Delta(finish_reason="stop")]])
    retry = RetryConfig(max_retries=1, base_delay_ms=100, jitter=0)
    _, session = await run(pipeline(route(primary, retry=retry), route(backup, name="backup")))

    stats = session.stats
    assert stats.failures == [("p", first), ("p", second)]
    assert (stats.retries, stats.providers_left, stats.provider) == (["p"], ["p"], "backup")
    assert stats.outcome == "completed"

    metrics = Metrics()
    metrics.observe_stream(session, key="none")
    assert sample(metrics, "trioproxy_upstream_errors_total", provider="p", status="429") == 1
    assert sample(metrics, "trioproxy_upstream_errors_total", provider="p", status="connect") == 1
    assert sample(metrics, "trioproxy_retries_total", provider="p") == 1
    assert sample(metrics, "trioproxy_failovers_total", provider="p") == 1
    assert sample(metrics, "trioproxy_streams_total", route="", provider="backup", outcome="completed") == 1


async def test_timeouts_are_counted_by_kind_and_end_the_stream_as_timeout(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[OPENED, STALL], [*tokens("x"), STALL]])
    timeouts = Timeouts(first_token_timeout=10, silence_timeout=5, heartbeat_interval=0)
    retry = RetryConfig(max_retries=1, base_delay_ms=0, jitter=0, retry_on=("first_token_timeout",))
    _, session = await run(pipeline(route(upstream, timeouts=timeouts, retry=retry)))

    failures = session.stats.failures
    assert all(isinstance(failure, UpstreamTimeoutError) for _, failure in failures)
    assert [failure.kind for _, failure in failures] == ["first_token_timeout", "silence_timeout"]  # type: ignore[attr-defined]
    assert session.stats.outcome == "timeout"
    metrics = Metrics()
    metrics.observe_stream(session, key="none")
    for kind in ("first_token_timeout", "silence_timeout"):
        assert sample(metrics, "trioproxy_timeouts_total", provider="p", kind=kind) == 1
    assert sample(metrics, "trioproxy_upstream_errors_total", provider="p", status="timeout") == 2


async def test_a_cancelled_session_counts_one_upstream_cancellation(autojump_clock: trio.abc.Clock) -> None:
    upstream = ScriptedUpstream([[*tokens("a"), STALL]])
    session = StreamSession(pipeline(route(upstream)), CHAT, heartbeats=False, endpoint="/v1/chat/completions")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        async for item in session.output:
            if isinstance(item, Delta) and item.text:
                await trio.sleep(1)
                session.cancel()

    assert upstream.cancelled == [1.0]
    assert (session.stats.cancelled, session.stats.outcome) == (True, "cancelled")
    metrics = Metrics()
    metrics.observe_stream(session, key="none")
    assert sample(metrics, "trioproxy_upstream_cancellations_total", provider="p") == 1
    labels = {"route": "/v1/chat/completions", "provider": "p", "model": "m"}
    assert sample(metrics, "trioproxy_stream_duration_seconds_sum", **labels) == pytest.approx(1.0)
    assert sample(metrics, "trioproxy_time_to_first_token_seconds_count", **labels) == 1


async def test_histograms_and_token_counters_move_as_the_stream_did(autojump_clock: trio.abc.Clock) -> None:
    script = [OPENED, 0.2, Delta(text="one")]
    script += [0.004, Delta(text=" two"), 0.004, Delta(text=" three")]
    script += [Delta(finish_reason="stop", usage=Usage(prompt_tokens=7, completion_tokens=3))]
    _, session = await run(pipeline(route(ScriptedUpstream([script]))))
    metrics = Metrics()
    for _ in range(3):
        metrics.stream_started()
    metrics.observe_stream(session, key="none")

    labels = {"route": "", "provider": "p", "model": "m"}
    ttft = "trioproxy_time_to_first_token_seconds_bucket"
    assert sample(metrics, ttft, le="0.1", **labels) == 0
    assert sample(metrics, ttft, le="0.25", **labels) == 1
    itl = "trioproxy_inter_token_latency_seconds_bucket"
    assert sample(metrics, itl, le="0.0025", **labels) == 0
    assert sample(metrics, itl, le="0.005", **labels) == 2
    assert sample(metrics, "trioproxy_buffer_latency_seconds_count", **labels) == 3
    assert sample(metrics, "trioproxy_tokens_total", provider="p", model="m", key="none", direction="in") == 7
    assert sample(metrics, "trioproxy_tokens_total", provider="p", model="m", key="none", direction="out") == 3
    assert sample(metrics, "trioproxy_active_streams") == 2  # three started, this one ended


async def test_model_labels_are_bounded_per_provider(autojump_clock: trio.abc.Clock) -> None:
    metrics = Metrics()
    labels = [metrics._model_label("p", f"model-{n}") for n in range(MAX_MODEL_LABELS + 5)]
    assert labels[:MAX_MODEL_LABELS] == [f"model-{n}" for n in range(MAX_MODEL_LABELS)]
    assert set(labels[MAX_MODEL_LABELS:]) == {"other"}
    assert metrics._model_label("p", "model-0") == "model-0"
    assert metrics._model_label("q", "model-99") == "model-99"


# --- hedged first tokens -----------------------------------------------------------------


def hedged(upstream: ScriptedUpstream, name: str = "p", hedge_after: float = 2.0, **policy: Any) -> Route:
    timeouts = Timeouts(heartbeat_interval=0, hedge_after=hedge_after)
    return route(upstream, name, timeouts=timeouts, **policy)


async def test_a_hedge_that_answers_first_wins_and_the_slow_route_is_cancelled(autojump_clock: trio.abc.Clock) -> None:
    slow = ScriptedUpstream([[OPENED, Delta(role="assistant"), 10.0, *tokens("slow")]])
    fast = ScriptedUpstream([[OPENED, Delta(role="assistant"), 0.5, Delta(text="fast"), Delta(finish_reason="stop")]])
    items, session = await run(pipeline(hedged(slow), route(fast, name="backup")))

    assert fast.started == [2.0]
    assert slow.cancelled == [2.5]  # at the hedge's first token
    assert texts(items) == "fast"
    assert [i for _, i in items if isinstance(i, Opened)] == [OPENED]
    assert [i.role for _, i in items if isinstance(i, Delta) and i.role] == ["assistant"]
    notices = [(t, i.kind, i.provider) for t, i in items if isinstance(i, RetryNotice)]
    assert notices == [(2.0, "hedge", "backup"), (2.5, "hedge_won", "backup")]
    assert session.completed
    assert (session.stats.provider, session.stats.recoveries) == ("backup", [("hedge", "p")])
    assert session.stats.failures == []


async def test_the_slow_route_wins_if_its_token_comes_first_and_the_hedge_is_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    slow = ScriptedUpstream([[OPENED, 3.0, Delta(text="first"), Delta(finish_reason="stop")]])
    slower = ScriptedUpstream([[OPENED, 5.0, *tokens("late")]])
    items, session = await run(pipeline(hedged(slow), route(slower, name="backup")))

    assert slower.cancelled == [3.0]
    assert texts(items) == "first"
    assert [i.kind for _, i in items if isinstance(i, RetryNotice)] == ["hedge"]
    assert session.stats.provider == "p"


async def test_no_hedge_when_the_first_token_comes_in_time_or_the_route_fails_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    quick = ScriptedUpstream([[OPENED, 1.0, Delta(text="ok"), Delta(finish_reason="stop")]])
    unused = ScriptedUpstream([])
    items, _ = await run(pipeline(hedged(quick), route(unused, name="backup")))
    assert (texts(items), unused.calls) == ("ok", 0)

    failing = ScriptedUpstream([[1.0, UpstreamStatusError("bad gateway", status=502)]])
    backup = ScriptedUpstream([[*tokens("b"), Delta(finish_reason="stop")]])
    start = trio.current_time()
    items, _ = await run(pipeline(hedged(failing), route(backup, name="backup")))
    assert backup.started == [start + 1.0]
    assert [i.kind for _, i in items if isinstance(i, RetryNotice)] == ["failover"]
    assert texts(items) == "b"


async def test_the_hedge_goes_on_when_the_slow_route_fails_and_both_failures_are_reported(
    autojump_clock: trio.abc.Clock,
) -> None:
    slow = ScriptedUpstream([[OPENED, 3.0, UpstreamStatusError("bad gateway", status=502)]])
    hedge = ScriptedUpstream([[OPENED, 5.0, UpstreamStatusError("down", status=503)]])
    last = ScriptedUpstream([[*tokens("third"), Delta(finish_reason="stop")]])
    items, session = await run(pipeline(hedged(slow), route(hedge, name="backup"), route(last, name="last")))

    assert last.started == [7.0]
    assert texts(items) == "third"
    assert [(i.kind, i.provider) for _, i in items if isinstance(i, RetryNotice)] == [
        ("hedge", "backup"),
        ("hedge_failed", "p"),
        ("failover", "last"),
    ]
    stats = session.stats
    assert [(provider, error.status) for provider, error in stats.failures] == [("p", 502), ("backup", 503)]
    assert (stats.provider, stats.providers_left) == ("last", ["backup"])


async def test_a_raced_route_that_answers_with_no_token_is_passed_on_whole(autojump_clock: trio.abc.Clock) -> None:
    empty = ScriptedUpstream([[OPENED, Delta(role="assistant"), 1.0, Delta(finish_reason="content_filter")]])
    unused = ScriptedUpstream([])
    items, session = await run(pipeline(hedged(empty), route(unused, name="backup")))

    assert unused.calls == 0
    assert [i for _, i in items if isinstance(i, Opened)] == [OPENED]
    finishes = [(i.role, i.finish_reason) for _, i in items if isinstance(i, Delta) and (i.role or i.finish_reason)]
    assert finishes == [("assistant", None), (None, "content_filter")]
    assert session.completed


async def test_one_hedge_per_request_by_default(autojump_clock: trio.abc.Clock) -> None:
    first = ScriptedUpstream([[OPENED, 1.0, UpstreamStatusError("down", status=503)]])
    second = ScriptedUpstream([[OPENED, 1.0, UpstreamStatusError("down", status=503)]])
    third = ScriptedUpstream([[OPENED, 100.0]])
    fourth = ScriptedUpstream([[OPENED, 100.0]])
    routes = (hedged(first, hedge_after=0.5), hedged(second, "b"), hedged(third, "c"), route(fourth, name="d"))
    items, _ = await run(pipeline(*routes))
    # first and second race (the one hedge); third is asked alone, and no hedge joins it
    assert third.started == [1.5]
    assert fourth.calls == 0
    assert [i.kind for _, i in items if isinstance(i, RetryNotice)].count("hedge") == 1


async def test_a_hedge_that_ends_by_the_client_leaving_cancels_both_requests(autojump_clock: trio.abc.Clock) -> None:
    slow = ScriptedUpstream([[OPENED, STALL]])
    slower = ScriptedUpstream([[OPENED, STALL]])
    session = StreamSession(pipeline(hedged(slow), route(slower, name="backup")), CHAT, heartbeats=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        with trio.move_on_after(5):
            async for _ in session.output:
                pass
        session.cancel()
    assert (slower.started, slow.cancelled, slower.cancelled) == ([2.0], [5.0], [5.0])


# --- context-window fallbacks ------------------------------------------------------------


def too_long() -> ContextLengthError:
    return ContextLengthError("This model's maximum context length is 8192 tokens", status=400)


async def test_a_prompt_too_long_goes_to_the_context_fallbacks_and_never_back(autojump_clock: trio.abc.Clock) -> None:
    small = ScriptedUpstream([[too_long()]])
    ordinary = ScriptedUpstream([])
    medium = ScriptedUpstream([[too_long()]])
    large = ScriptedUpstream([[*tokens("fits"), Delta(finish_reason="stop")]])
    small_route, medium_route, large_route = route(small), route(medium, "medium"), route(large, "large")
    p = Pipeline(
        routes=(small_route, route(ordinary, "ordinary")),
        buffer=BufferConfig(),
        transforms=(),
        validators=(),
        # medium lists small again: it is not asked twice
        context_fallbacks={"p": (medium_route, large_route), "medium": (small_route, large_route)},
    )
    items, session = await run(p)

    assert (small.calls, ordinary.calls, medium.calls, large.calls) == (1, 0, 1, 1)
    assert [(i.kind, i.provider) for _, i in items if isinstance(i, RetryNotice)] == [
        ("failover", "medium"),
        ("failover", "large"),
    ]
    assert texts(items) == "fits"
    assert session.completed


async def test_a_prompt_too_long_without_context_fallbacks_is_the_400(autojump_clock: trio.abc.Clock) -> None:
    small = ScriptedUpstream([[too_long()]])
    ordinary = ScriptedUpstream([])
    items, _ = await run(pipeline(route(small, retry=RetryConfig(max_retries=3)), route(ordinary, "ordinary")))
    ((_, error),) = items
    assert isinstance(error, ContextLengthError)
    assert error.status == 400
    assert (small.calls, ordinary.calls) == (1, 0)


# --- mid-stream continuation ---------------------------------------------------------------


def continuing(upstream: ScriptedUpstream, name: str = "p", way: str = "prefill", **policy: Any) -> Route:
    return route(upstream, name, continuation=way, **policy)


def prefix(chat: Any) -> Any:
    return chat.messages[-1]


async def test_a_broken_stream_is_continued_and_only_the_new_text_delivered(autojump_clock: trio.abc.Clock) -> None:
    cut = UpstreamBrokenError("the upstream connection broke")
    upstream = ScriptedUpstream(
        [
            [*tokens("Once", " upon "), cut],
            # the model continues "Once upon" (no trailing whitespace in a prefill): " a time"
            [
                OPENED,
                Delta(role="assistant"),
                Delta(text=" a"),
                Delta(text=" time"),
                Delta(finish_reason="stop"),
                Delta(usage=Usage(prompt_tokens=12, completion_tokens=2)),
            ],
        ]
    )
    items, session = await run(pipeline(continuing(upstream)))

    assert texts(items) == "Once upon a time"
    assert prefix(upstream.chats[1]) == {"role": "assistant", "content": "Once upon"}
    assert [i for _, i in items if isinstance(i, Opened)] == [OPENED]
    assert [i.role for _, i in items if isinstance(i, Delta) and i.role] == ["assistant"]
    notices = [(i.kind, i.provider, i.reason) for _, i in items if isinstance(i, RetryNotice)]
    assert notices == [("continuation", "p", "the upstream connection broke")]
    assert session.completed
    usage = session.accumulator.usage
    # both attempts: the first read 12 - 3 prompt tokens and wrote the 3 delivered (10 characters)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (21, 5, True)
    assert session.stats.recoveries == [("continuation", "p")]
    assert session.stats.failures == [("p", cut)]


async def test_a_stall_and_an_in_stream_overload_are_continued_too(autojump_clock: trio.abc.Clock) -> None:
    timeouts = Timeouts(silence_timeout=5, heartbeat_interval=0)
    overloaded = UpstreamStatusError("Overloaded", status=529, type="overloaded_error")
    upstream = ScriptedUpstream(
        [
            [*tokens("a", "b"), STALL],
            [OPENED, Delta(text="c"), overloaded],
            [OPENED, Delta(text="d"), Delta(finish_reason="stop")],
        ]
    )
    items, session = await run(pipeline(continuing(upstream, way="continue_final_message", timeouts=timeouts)))
    assert texts(items) == "abcd"
    assert [prefix(chat)["content"] for chat in upstream.chats[1:]] == ["ab", "abc"]
    assert upstream.chats[1].body["continue_final_message"] is True
    assert session.completed


async def test_a_refused_continuation_tells_the_original_failure_and_is_not_asked_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    cut = UpstreamBrokenError("the upstream connection broke")
    refusal = UpstreamStatusError("This model does not support assistant message prefill", status=400)
    upstream = ScriptedUpstream([[*tokens("half"), cut], [refusal], [*tokens("again"), cut]])
    backup = ScriptedUpstream([[refusal]])
    p = pipeline(continuing(upstream), continuing(backup, "backup"))
    items, session = await run(p)

    assert texts(items) == "half"
    error = items[-1][1]
    assert isinstance(error, UpstreamBrokenError)
    assert "prefill" not in error.message
    assert "after 4 characters were delivered" in error.message
    assert (upstream.calls, backup.calls) == (2, 1)  # the route itself, then the next
    assert [(provider, e.status) for provider, e in session.stats.failures] == [("p", 502), ("p", 400), ("backup", 400)]

    # Within the cooldown neither is asked to continue again: the failure ends the stream at once.
    items, _ = await run(p)
    assert (upstream.calls, backup.calls) == (3, 1)
    assert isinstance(items[-1][1], UpstreamBrokenError)


async def test_no_continuation_without_the_capability_after_a_tool_call_or_a_transform(
    autojump_clock: trio.abc.Clock,
) -> None:
    cut = UpstreamBrokenError("reset")
    none = ScriptedUpstream([[*tokens("x"), cut]])
    items, _ = await run(pipeline(route(none)))
    assert (none.calls, type(items[-1][1])) == (1, UpstreamBrokenError)

    call = Delta(tool_calls=(ToolCallDelta(index=0, id="c", name="f", arguments='{"a'),))
    tooling = ScriptedUpstream([[*tokens("x"), call, cut]])
    items, _ = await run(pipeline(continuing(tooling)))
    assert (tooling.calls, type(items[-1][1])) == (1, UpstreamBrokenError)

    rewritten = ScriptedUpstream([[*tokens("x"), cut]])
    p = Pipeline(routes=(continuing(rewritten),), buffer=BufferConfig(), transforms=(str.upper,), validators=())
    items, _ = await run(p)
    assert (rewritten.calls, texts(items)) == (1, "X")


async def test_a_refusal_after_the_first_token_is_never_continued(autojump_clock: trio.abc.Clock) -> None:
    refused = UpstreamStatusError("content filtered", status=400, code="content_filter")
    upstream = ScriptedUpstream([[*tokens("x"), refused]])
    items, _ = await run(pipeline(continuing(upstream)))
    assert upstream.calls == 1
    assert items[-1][1].status == 400


async def test_a_continuation_the_request_cannot_take_is_skipped_for_the_next_way(
    autojump_clock: trio.abc.Clock,
) -> None:
    cut = UpstreamBrokenError("reset")
    unportable = RequestError("'thinking' cannot go to this upstream", param="thinking")
    broken = ScriptedUpstream([[*tokens("a"), cut]])
    other_protocol = ScriptedUpstream([[unportable]])
    able = ScriptedUpstream([[OPENED, Delta(text="b"), Delta(finish_reason="stop")]])
    p = pipeline(route(broken), continuing(other_protocol, "other"), continuing(able, "able"))
    items, session = await run(p)
    assert texts(items) == "ab"
    assert session.completed
