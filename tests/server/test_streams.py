"""
The stream registry, broadcast and replay log (`server/_streams.py`), without sockets: a fake
session feeds a `BroadcastStream` through a channel, on trio's autojump clock.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import trio

from trioproxy import SSEDecoder, StreamEvent, StreamsFullError
from trioproxy._accumulator import Accumulator
from trioproxy._events import OPENED, Delta
from trioproxy._exceptions import SharedStateError, TrioproxyError
from trioproxy._policy import StreamsConfig
from trioproxy._redis import LoggedEvents
from trioproxy.pipeline import SessionItem
from trioproxy.server._events_front import EventRenderer
from trioproxy.server._streams import (
    SHARED_STATE_WARNING,
    BroadcastStream,
    MemoryReplayLog,
    ReplayGapError,
    StreamRegistry,
    Watcher,
)


class FakeSession:
    """What a `BroadcastStream` uses of a `StreamSession`."""

    def __init__(self) -> None:
        self.send, self.output = trio.open_memory_channel[SessionItem](0)
        self.accumulator = Accumulator()
        self.stats = SimpleNamespace(buffer_waits=[])
        self.completed = False
        self.failed = False  # it sends no error
        self.cancelled_at: float | None = None

    def ended_with(self, error: TrioproxyError) -> TrioproxyError:
        return self.accumulator.ended_with(error)  # a streamed session's

    def cancel(self) -> None:
        if self.cancelled_at is None:
            self.cancelled_at = trio.current_time()
        self.output.close()  # the upstream stops

    async def play(self, texts: list[str], interval: float) -> None:
        async with self.send:
            try:
                await self.send.send(OPENED)
                for text in texts:
                    await trio.sleep(interval)
                    delta = Delta(text=text)
                    self.accumulator.add(delta)
                    await self.send.send(delta)
            except trio.BrokenResourceError:
                return
            self.completed = True


def renderer_for(stream_id: str, frame) -> EventRenderer:
    return EventRenderer(frame=frame, provider="p", model="m", request_id="req_1", prompt_chars=1, stream_id=stream_id)


def events_of(data: bytes) -> list[StreamEvent]:
    return [StreamEvent.from_json(e.data, id=e.id or None) for e in SSEDecoder().feed(data)]


async def drain(watcher: Watcher, into: list[bytes]) -> None:
    async for data in watcher.receive:
        into.append(data)


def open_stream(session: FakeSession, **config: float) -> tuple[StreamRegistry, BroadcastStream]:
    registry = StreamRegistry(StreamsConfig(**config))
    return registry, registry.open(session, renderer_for)  # type: ignore[arg-type]


# -- the replay log ---------------------------------------------------------------------------


def test_replay_log_reads_after_an_id() -> None:
    log = MemoryReplayLog(max_bytes=100)
    for i in range(1, 4):
        log.append(i, b"e%d" % i)
    assert log.read_after(0) == [b"e1", b"e2", b"e3"]
    assert log.read_after(2) == [b"e3"]
    assert log.read_after(3) == []
    assert (len(log), log.nbytes) == (3, 6)


def test_replay_log_is_bounded_by_bytes_and_count_and_refuses_a_gap() -> None:
    log = MemoryReplayLog(max_bytes=10, max_events=3)
    for i in range(1, 11):
        log.append(i, b"abcd")
        assert log.nbytes <= 10
        assert len(log) <= 3
    assert log.read_after(8) == [b"abcd", b"abcd"]
    assert log.read_after(9) == [b"abcd"]
    with pytest.raises(ReplayGapError):
        log.read_after(7)
    with pytest.raises(ReplayGapError):
        log.read_after(0)


# -- fan-out ----------------------------------------------------------------------------------


async def test_a_stalled_watcher_is_dropped_and_never_slows_the_others(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession()
    registry, stream = open_stream(session, watcher_queue=4, max_replay_bytes=2000)
    texts = [f" t{i}" for i in range(50)]
    fast_a: list[bytes] = []
    fast_b: list[bytes] = []
    _, a = stream.attach()
    _, b = stream.attach()
    _, stalled = stream.attach()  # attached, never read
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, a, fast_a)
        nursery.start_soon(drain, b, fast_b)
        nursery.start_soon(session.play, texts, 0.01)
        await stream.run()
    # The stream ran at the upstream's pace: 50 intervals, not a moment waiting for anyone.
    assert trio.current_time() - started == pytest.approx(0.5, abs=0.02)
    assert stalled.dropped
    assert stalled not in stream.watchers
    assert stalled.receive.statistics().current_buffer_used == 4  # the bound it was held to
    assert events_of(b"".join(fast_a)) == events_of(b"".join(fast_b))
    everything = events_of(b"".join(fast_a))
    assert "".join(e.data for e in everything if e.type == "token") == "".join(texts)
    assert everything[-1].type == "done"
    assert stream.log.nbytes <= 2000

    # The dropped watcher resumes from the last event it holds, as far as the log still reaches.
    held = events_of(b"".join(stalled.receive.receive_nowait() for _ in range(4)))
    assert [e.id for e in held] == ["1", "2", "3", "4"]
    with pytest.raises(ReplayGapError):  # 2000 bytes no longer reach back to event 4
        stream.attach(after=4)
    backlog, late = stream.attach(after=stream.last_id - 3)
    assert [e.type for e in events_of(b"".join(backlog))] == ["token", "token", "done"]
    with pytest.raises(trio.EndOfChannel):
        late.receive.receive_nowait()  # the stream is over: nothing live follows
    assert registry.get(stream.id) is stream


async def test_the_last_watcher_leaving_starts_the_grace_period(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession()
    _, stream = open_stream(session, resume_grace_period=2)
    _, watcher = stream.attach()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.play, [" a"] * 100, 0.1)
        nursery.start_soon(stream.run)
        await trio.sleep(1)
        stream.detach(watcher)
        left_at = trio.current_time()
        await trio.sleep(1)
        _, back = stream.attach()  # a reconnect within the grace period keeps it going
        await trio.sleep(3)
        assert session.cancelled_at is None
        stream.detach(back)
        left_at = trio.current_time()
    assert session.cancelled_at == pytest.approx(left_at + 2, abs=0.01)
    assert stream.finished
    (last,) = events_of(b"".join(stream.log.read_after(stream.last_id - 1)))
    assert last.type == "error"
    assert "no client watched" in last.data["message"]


async def test_once_the_server_drains_a_stream_runs_on_only_while_watched(autojump_clock: trio.abc.Clock) -> None:
    """Nobody can attach during a shutdown: waiting `resume_grace_period` for a reconnect is pointless."""
    watched, unwatched = FakeSession(), FakeSession()
    registry = StreamRegistry(StreamsConfig(resume_grace_period=30))
    kept = registry.open(watched, renderer_for)  # type: ignore[arg-type]
    dropped = registry.open(unwatched, renderer_for)  # type: ignore[arg-type]
    _, watcher = kept.attach()
    _, gone = dropped.attach()
    async with trio.open_nursery() as nursery:
        for session, stream in ((watched, kept), (unwatched, dropped)):
            nursery.start_soon(session.play, [" a"] * 20, 0.1)
            nursery.start_soon(stream.run)
        await trio.sleep(0.5)
        dropped.detach(gone)  # its client went away: it would wait 30 s for a reconnect
        await trio.sleep(0.5)
        assert unwatched.cancelled_at is None
        registry.stop_resuming()
        stopped_at = trio.current_time()
        received: list[bytes] = []
        await drain(watcher, received)
    assert unwatched.cancelled_at == stopped_at
    (last,) = events_of(b"".join(dropped.log.read_after(dropped.last_id - 1)))
    assert last.type == "error"
    assert "shutting down" in last.data["message"]
    assert watched.completed  # the watched one ran to its end
    assert [e.type for e in events_of(b"".join(received))][-1] == "done"


async def test_finished_streams_expire_after_their_retention(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession()
    registry, stream = open_stream(session, retention=10)
    stream.attach()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.play, [" a"], 0)
        await stream.run()
    await trio.sleep(9.9)
    assert registry.get(stream.id) is stream
    await trio.sleep(0.2)
    assert registry.get(stream.id) is None
    assert len(registry) == 0


async def test_a_full_registry_of_running_streams_refuses_another() -> None:
    registry = StreamRegistry(StreamsConfig(max_streams=1))
    registry.open(FakeSession(), renderer_for)  # type: ignore[arg-type]
    with pytest.raises(StreamsFullError) as info:
        registry.open(FakeSession(), renderer_for)  # type: ignore[arg-type]
    assert info.value.status == 503


async def test_heartbeats_reach_watchers_without_an_id_and_are_not_logged() -> None:
    from trioproxy.pipeline import HEARTBEAT

    session = FakeSession()
    _, stream = open_stream(session)
    _, watcher = stream.attach()
    stream.publish(OPENED)
    stream.publish(HEARTBEAT)
    assert watcher.receive.receive_nowait().startswith(b"id: 1\n")
    assert watcher.receive.receive_nowait() == b": keep-alive\n\n"
    assert len(stream.log) == 1
    assert stream.last_id == 1


async def test_a_broadcast_cancelled_by_shutdown_tells_its_watchers(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession()
    _, stream = open_stream(session)
    _, watcher = stream.attach()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.play, [" a"] * 100, 0.1)
        nursery.start_soon(stream.run)
        await trio.sleep(0.55)
        nursery.cancel_scope.cancel()  # the app's nursery at shutdown; responses drain after it
    received: list[bytes] = []
    await drain(watcher, received)
    events = events_of(b"".join(received))
    assert [e.type for e in events] == ["metadata"] + ["token"] * 5 + ["error"]
    assert "ended the stream before it completed" in events[-1].data["message"]
    assert session.cancelled_at is not None
    assert stream.finished


# -- the shared store (Redis, with [redis]) ---------------------------------------------------


class RecordingStore:
    """A `StreamStore` that keeps each write, and fails while `failing` says so."""

    shared = True

    def __init__(self, write_interval: float) -> None:
        self.write_interval = write_interval
        self.writes: list[tuple[float, list[int], bool]] = []
        self.failing = False

    async def append_events(self, stream_id: str, events, *, ended: bool) -> None:  # type: ignore[no-untyped-def]
        await trio.sleep(0.001)  # a round trip
        if self.failing:
            raise SharedStateError("Redis failed: down", code="shared_state_unavailable", retry_after=1)
        self.writes.append((trio.current_time(), [event_id for event_id, _ in events], ended))

    async def read_events(self, stream_id: str, after: int) -> None:
        return None

    async def follow_events(self, stream_id: str, after: int) -> None:
        return None

    async def delete_events(self, stream_id: str) -> None:
        pass


async def test_a_stream_is_written_to_the_store_in_batches_at_most_every_write_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    """50 tokens 10 ms apart, a write every 0.2 s at most: a handful of writes, every event once, in order."""
    session = FakeSession()
    store = RecordingStore(write_interval=0.2)
    registry = StreamRegistry(StreamsConfig(), store=store)  # type: ignore[arg-type]
    stream = registry.open(session, renderer_for)  # type: ignore[arg-type]
    stream.publish(OPENED)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.play, [f" t{i}" for i in range(50)], 0.01)
        await stream.run()
    written = [event_id for _, ids, _ in store.writes for event_id in ids]
    assert written == list(range(1, stream.last_id + 1))
    assert store.writes[-1][2]
    assert not any(ended for _, _, ended in store.writes[:-1])
    assert len(store.writes) <= 0.5 / 0.2 + 2
    times = [at for at, _, _ in store.writes]
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times[:-1]))
    assert times[-1] - stream.finished_at < 0.01  # the end went at once


async def test_a_failing_store_warns_the_watchers_once_and_the_stream_goes_on(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession()
    store = RecordingStore(write_interval=0.05)
    store.failing = True
    registry = StreamRegistry(StreamsConfig(), store=store)  # type: ignore[arg-type]
    stream = registry.open(session, renderer_for)  # type: ignore[arg-type]
    _, watcher = stream.attach()
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, watcher, seen)
        nursery.start_soon(session.play, [f" t{i}" for i in range(30)], 0.01)

        async def recover() -> None:
            await trio.sleep(0.2)
            store.failing = False  # Redis is back

        nursery.start_soon(recover)
        await stream.run()
    body = b"".join(seen)
    assert body.count(SHARED_STATE_WARNING) == 1
    assert events_of(body)[-1].type == "done"
    assert len([e for e in events_of(body) if e.type == "token"]) == 30
    written = [event_id for _, ids, _ in store.writes for event_id in ids]
    assert written == sorted(set(written))
    assert written[-1] == stream.last_id
    assert store.writes[-1][2]


async def test_a_watcher_ahead_of_what_the_store_has_follows_from_its_own_last_event() -> None:
    """Its client saw events the running process has not written yet: it is neither refused nor sent them twice."""
    asked: list[int] = []

    class Store(RecordingStore):
        async def read_events(self, stream_id: str, after: int) -> LoggedEvents:  # type: ignore[override]
            return LoggedEvents([], ended=False, last_id=2)

        async def follow_events(self, stream_id: str, after: int) -> LoggedEvents:  # type: ignore[override]
            asked.append(after)
            return LoggedEvents([(5, b"five")], ended=True, last_id=5)

    registry = StreamRegistry(StreamsConfig(), store=Store(write_interval=0.2))  # type: ignore[arg-type]
    remote = await registry.remote("st_x", 4)
    assert remote is not None
    assert (remote.last_id, remote.last_written, remote.ended) == (4, 2, False)
    assert await remote.next() == b"five"
    assert asked == [4]
    assert await remote.next() is None
