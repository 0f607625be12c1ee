"""
Resumable, shareable streams: what lets a generation on the generic SSE endpoints outlive
the request that started it.

```
session.output ─► broadcast task (app nursery, one per stream)
                    renders each item once, as SSE events with `id:`s
                    ├─► replay log (bounded; `ReplayLog`, in-process `MemoryReplayLog`)
                    └─► each watcher's bounded queue ─► its response body
```

The POST that starts a generation is its first watcher; `GET /v1/streams/{id}` adds more,
replaying the log after their `Last-Event-ID` first. Fan-out never waits: a watcher whose
queue is full is disconnected (its response ends without `done`, so it resumes) and the others
go on. When the last watcher leaves, the generation keeps running for `resume_grace_period`;
after that its upstream is cancelled. A finished stream is kept for `retention` seconds. Once
the server shuts down nobody can attach any more (`stop_resuming`), so a stream nobody watches
is cancelled at once.

Event ids are the stream's sequence numbers, `1`, `2`, …; SSE comments (keep-alives) carry
none and are not logged.

The replay log is synchronous on purpose: attaching a watcher reads the log and joins the
live fan-out in one step, with no await in between, so no event can fall between the two.

With `[redis]`, each stream's events are also kept in a Redis Stream (`StreamStore`:
`RedisState`; in-process, `LOCAL_STORE` keeps nothing more), written by a mirror task beside
the broadcast, so that another process can replay them and follow the live ones
(`RemoteStream`) while this one runs the generation: the upstream is asked once. The mirror
never holds the broadcast back: it takes what was published since its last write, at most
`max_replay_bytes` of it (older unwritten events are dropped: a replay from before them is a
gap). If Redis fails, the stream goes on here, its watchers are told once with a comment line
(`SHARED_STATE_WARNING`), and the mirror writes again from where it was when Redis answers.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from .._events import StreamEvent
from .._exceptions import ReplayGapError, SharedStateError, StreamsFullError, TrioproxyError
from .._policy import StreamsConfig
from .._redis import LoggedEvents
from ..pipeline import Heartbeat, SessionItem
from ._events_front import SSE_KEEP_ALIVE, sse_frame
from ._generic import StreamInterrupted, last_word, render_for

if TYPE_CHECKING:
    from ..pipeline import StreamSession
    from ._generic import Renderer

__all__ = [
    "LOCAL_STORE",
    "SHARED_STATE_WARNING",
    "BroadcastStream",
    "MemoryReplayLog",
    "RemoteStream",
    "ReplayGapError",
    "ReplayLog",
    "StreamRegistry",
    "StreamStore",
    "StreamsFullError",
    "Watcher",
]

logger = logging.getLogger("trioproxy.streams")

RendererFactory = Callable[[str, Callable[[Any], bytes]], "Renderer"]
"""`(stream_id, frame) -> Renderer`: the front adapter of one stream, framing each event through `frame`."""

Encoder = Callable[[Any, int], bytes]
"""`(event, event_id) -> bytes`: how a stream's renderer's events are written, given their ids."""


FINAL_WRITE_RETRY: Final = 1.0
"""Seconds before a stream's last events are written to the store again, after the store failed
and said nothing of when to retry (Redis down: until it is back, or `[streams] retention`)."""

SHARED_STATE_WARNING: Final = (
    b": warning shared_state_unavailable: Redis failed;"
    b" this stream is resumable on this process only, until Redis answers\n\n"
)
"""
What a stream's watchers are told when its events cannot be written to Redis: a comment line,
which every SSE client skips.
"""


class StreamStore(Protocol):
    """
    Where streams' events are kept for other processes too. `shared`: False for the
    in-process store, which keeps nothing more than each stream's own replay log.
    `write_interval`: seconds between two writes of one stream, at least (what comes meanwhile
    goes in the next: each write costs a round trip). A stored response's conversation, what
    `previous_response_id` continues, is kept beside its events (`keep_conversation`). The
    calls raise `SharedStateError` when the store fails.
    """

    @property
    def shared(self) -> bool: ...
    @property
    def write_interval(self) -> float: ...

    async def append_events(self, stream_id: str, events: Sequence[tuple[int, bytes]], *, ended: bool) -> None: ...
    async def read_events(self, stream_id: str, after: int) -> LoggedEvents | None: ...
    async def follow_events(self, stream_id: str, after: int) -> LoggedEvents | None: ...
    async def delete_events(self, stream_id: str) -> None: ...
    async def keep_conversation(self, stream_id: str, conversation: bytes) -> None: ...
    async def read_conversation(self, stream_id: str) -> bytes | None: ...


class _LocalStore:
    """The in-process `StreamStore`: another process never finds a stream here."""

    shared = False
    write_interval = 0.0

    async def append_events(self, stream_id: str, events: Sequence[tuple[int, bytes]], *, ended: bool) -> None:
        pass

    async def read_events(self, stream_id: str, after: int) -> LoggedEvents | None:
        return None

    async def follow_events(self, stream_id: str, after: int) -> LoggedEvents | None:
        return None

    async def delete_events(self, stream_id: str) -> None:
        pass

    async def keep_conversation(self, stream_id: str, conversation: bytes) -> None:
        pass

    async def read_conversation(self, stream_id: str) -> bytes | None:
        return None


LOCAL_STORE: Final[StreamStore] = _LocalStore()


def sse_with_id(event: StreamEvent, event_id: int) -> bytes:
    """The generic endpoints' framing: each event an SSE event whose `id:` is its number."""
    return sse_frame(replace(event, id=str(event_id)))


class ReplayLog(Protocol):
    """
    A stream's events by sequence number, bounded. `append` takes ids in increasing order;
    `read_after(n)` returns every event with an id above `n`, or raises `ReplayGapError` if
    some of them were dropped to keep the log within its bounds.
    """

    def append(self, event_id: int, data: bytes) -> None: ...
    def read_after(self, last_id: int) -> list[bytes]: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...


class MemoryReplayLog:
    """The in-process `ReplayLog`: at most `max_bytes` (and `max_events`); the oldest go first."""

    def __init__(self, max_bytes: int, max_events: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_events = max_events
        self._entries: deque[tuple[int, bytes]] = deque()
        self._nbytes = 0
        self._dropped_through = 0
        """The highest id dropped from the front (0: nothing dropped)."""

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, event_id: int, data: bytes) -> None:
        self._entries.append((event_id, data))
        self._nbytes += len(data)
        while self._entries and (
            self._nbytes > self.max_bytes or (self.max_events is not None and len(self._entries) > self.max_events)
        ):
            dropped_id, dropped = self._entries.popleft()
            self._nbytes -= len(dropped)
            self._dropped_through = dropped_id

    def read_after(self, last_id: int) -> list[bytes]:
        if last_id < self._dropped_through:
            raise ReplayGapError(
                f"events after id {last_id} are no longer kept (the replay log starts after id {self._dropped_through})"
            )
        return [data for event_id, data in self._entries if event_id > last_id]


class Watcher:
    """One response following a stream: a bounded queue of SSE bytes."""

    def __init__(self, queue_size: int) -> None:
        self._send, self.receive = trio.open_memory_channel[bytes](queue_size)
        self.dropped = False
        """The watcher fell `queue_size` writes behind and was disconnected."""

    def offer(self, data: bytes) -> bool:
        """Queue `data` without waiting; False if the watcher is gone or too far behind."""
        try:
            self._send.send_nowait(data)
        except trio.WouldBlock:
            self.dropped = True
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def close(self) -> None:
        self._send.close()


class BroadcastStream:
    """
    One generation, shared. Create with `StreamRegistry.open`, publish its first item, then
    run `run()` in the app's nursery.
    """

    def __init__(
        self,
        stream_id: str,
        session: StreamSession,
        renderer_for: RendererFactory,
        log: ReplayLog,
        config: StreamsConfig,
        encode: Encoder = sse_with_id,
        store: StreamStore = LOCAL_STORE,
    ) -> None:
        self.id = stream_id
        self.session = session
        self._encode = encode
        self.renderer = renderer_for(stream_id, self._frame)
        self.log = log
        self.config = config
        self.last_id = 0
        self.finished_at: float | None = None
        self.watchers: set[Watcher] = set()
        self.resume_grace_period = config.resume_grace_period
        self.resumable = True
        """False once the server shuts down: nobody can attach any more."""
        self._grace = trio.CancelScope()
        self._pending: list[tuple[int, bytes]] = []
        self._ended = False
        """The stream's last event (`done` or `error`) was published."""
        self._cancelled_with: TrioproxyError | None = None
        self.finished_event = trio.Event()
        """Set once the stream is finished (its last event published)."""
        self._store = store
        self._unwritten: deque[tuple[int, bytes]] = deque()
        """Events published and not yet in the store, at most `max_replay_bytes` of them."""
        self._unwritten_bytes = 0
        self._published = trio.Event()
        """Set when there is something for the mirror to write."""
        self._mirror_scope = trio.CancelScope()

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def _frame(self, event: Any) -> bytes:
        """The renderer's framing: each event gets the next id, and is kept for the log."""
        self.last_id += 1
        data = self._encode(event, self.last_id)
        self._pending.append((self.last_id, data))
        return data

    def attach(self, after: int = 0) -> tuple[list[bytes], Watcher]:
        """
        A new watcher: the logged events after id `after`, then the live ones on its queue
        (closed at once if the stream is over). Raises `ReplayGapError`.
        """
        backlog = self.log.read_after(after)
        watcher = Watcher(self.config.watcher_queue)
        if self.finished:
            watcher.close()
        else:
            self.watchers.add(watcher)
            self._grace.deadline = math.inf
        return backlog, watcher

    def detach(self, watcher: Watcher) -> None:
        """The watcher's response ended; the last one out starts the grace period."""
        watcher.receive.close()
        self._remove(watcher)

    def _remove(self, watcher: Watcher) -> None:
        watcher.close()
        if watcher not in self.watchers:
            return  # dropped earlier: its grace period, if any, already started then
        self.watchers.discard(watcher)
        if not self.watchers and not self.finished:
            self._grace.deadline = trio.current_time() + self.resume_grace_period

    def stop_resuming(self) -> None:
        """No watcher can come any more (the server shuts down): run on only while watched."""
        self.resumable = False
        self.resume_grace_period = 0.0
        if not self.watchers and not self.finished:
            self._grace.deadline = trio.current_time()

    def cancel(self, reason: TrioproxyError) -> None:
        """Stop the generation (and its upstream request); its last event is `reason`."""
        if not self.finished and self._cancelled_with is None:
            self._cancelled_with = reason
            self.session.cancel()

    def publish(self, item: SessionItem | None) -> None:
        """Render `item` (None: the stream's last word), log it, and hand it to every watcher."""
        if self._ended:
            return
        if isinstance(item, Heartbeat):
            self._fan_out(SSE_KEEP_ALIVE)
            return
        if item is None:
            self._ended = True
            self._finish_events()
        else:
            render_for(self.session, self.renderer, item)  # framed into `_pending` by `_frame`
            self._ended = self.session.failed  # its error, or the renderer's refusal of the item
        pending, self._pending = self._pending, []
        for event_id, data in pending:
            self.log.append(event_id, data)
        if self._store.shared and (pending or self._ended):
            self._keep_for_store(pending)
        if pending:
            self._fan_out(b"".join(data for _, data in pending))

    def _keep_for_store(self, events: list[tuple[int, bytes]]) -> None:
        self._unwritten.extend(events)
        self._unwritten_bytes += sum(len(data) for _, data in events)
        while self._unwritten_bytes > self.config.max_replay_bytes and len(self._unwritten) > 1:
            _, dropped = self._unwritten.popleft()
            self._unwritten_bytes -= len(dropped)
        self._published.set()

    def stop_sharing(self) -> None:
        """Write nothing more to the store (the stream is being deleted)."""
        self._mirror_scope.cancel()

    async def _mirror(self) -> None:
        """
        Write what is published to the store, until the stream's end is written: at most once
        every `write_interval`, what was published since the last write. While the store
        fails, try again likewise (and every second after the end, for `retention` seconds
        at most).
        """
        with self._mirror_scope:
            await self._write_to_store()

    async def _write_to_store(self) -> None:
        warned = False
        next_write = -math.inf
        while True:
            await self._published.wait()
            with trio.move_on_at(next_write):  # the write interval, unless the stream ends: that goes at once
                await self.finished_event.wait()
            next_write = trio.current_time() + self._store.write_interval
            self._published = trio.Event()
            events, ended = list(self._unwritten), self._ended
            try:
                await self._store.append_events(self.id, events, ended=ended)
            except SharedStateError as failure:
                if not warned:
                    warned = True
                    logger.warning("stream %s: %s; it is resumable on this process only", self.id, failure.message)
                    self._fan_out(SHARED_STATE_WARNING)
                if ended:
                    await trio.sleep(failure.retry_after or FINAL_WRITE_RETRY)
                    self._published.set()
                continue
            written_through = events[-1][0] if events else 0
            while self._unwritten and self._unwritten[0][0] <= written_through:  # (some may have been dropped)
                _, data = self._unwritten.popleft()
                self._unwritten_bytes -= len(data)
            if ended:
                return

    def _finish_events(self) -> None:
        if self._cancelled_with is not None and not self.session.completed:
            self.renderer.error(self._cancelled_with)
        elif self._grace.cancelled_caught and not self.session.completed:
            interrupted = StreamInterrupted(
                f"no client watched the stream for {self.resume_grace_period:g} s: it was cancelled"
                if self.resumable
                else "the server is shutting down and no client watched the stream: it was cancelled"
            )
            self.renderer.error(self.session.ended_with(interrupted))
        else:
            last_word(self.renderer, self.session)

    def _fan_out(self, data: bytes) -> None:
        for watcher in list(self.watchers):
            if not watcher.offer(data):
                if watcher.dropped:
                    logger.info("stream %s: a watcher fell behind and was disconnected", self.id)
                self._remove(watcher)

    async def run(self) -> None:
        """
        The broadcast task: relay the session until it ends or nobody watches any more; with a
        shared store, its mirror runs beside it until the end is written there (for
        `retention` seconds at most).
        """
        if not self._store.shared:
            await self._broadcast()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mirror, name=f"stream {self.id} mirror")
            await self._broadcast()
            nursery.cancel_scope.deadline = trio.current_time() + self.config.retention

    async def _broadcast(self) -> None:
        try:
            with self._grace:
                if not self.watchers:
                    self._grace.deadline = trio.current_time() + self.resume_grace_period
                async for item in self.session.output:
                    self.publish(item)
                    if self._ended:
                        break
        except Exception:  # a bug here must not take the app's nursery (every stream) down
            logger.exception("the broadcast of stream %s failed", self.id)
        finally:
            self.session.cancel()
            if not self._ended:  # publishing does not wait: this works while cancelled too
                try:
                    self.publish(None)
                except Exception:
                    logger.exception("the broadcast of stream %s failed", self.id)
            self.finished_at = trio.current_time()
            for watcher in list(self.watchers):
                watcher.close()
            self.watchers.clear()
            self.finished_event.set()


class StreamRegistry:
    """The streams of one app, by id: at most `max_streams`, finished ones for `retention` s."""

    def __init__(
        self,
        config: StreamsConfig,
        *,
        log_factory: Callable[[], ReplayLog] | None = None,
        store: StreamStore = LOCAL_STORE,
    ) -> None:
        self.config = config
        self.store = store
        """Where the streams are kept for other processes too (Redis), or not (`LOCAL_STORE`)."""
        self._log_factory = log_factory or (lambda: MemoryReplayLog(config.max_replay_bytes))
        self._streams: dict[str, BroadcastStream] = {}
        self._resuming = True

    def stop_resuming(self) -> None:
        """The server shuts down: no watcher can attach any more, so no stream waits for one."""
        self._resuming = False
        for stream in self._streams.values():
            stream.stop_resuming()

    def __len__(self) -> int:
        self._sweep()
        return len(self._streams)

    def open(
        self,
        session: StreamSession,
        renderer_for: RendererFactory,
        *,
        prefix: str = "st_",
        encode: Encoder = sse_with_id,
    ) -> BroadcastStream:
        """
        A new stream for `session`, rendered by `renderer_for(stream_id, frame)` and written
        by `encode`; its id starts with `prefix`. Raises `StreamsFullError` when `max_streams`
        are running.
        """
        self._sweep()
        if len(self._streams) >= self.config.max_streams:
            finished = [s for s in self._streams.values() if s.finished_at is not None]
            if not finished:
                raise StreamsFullError(f"{self.config.max_streams} streams are running; try again later")
            oldest = min(finished, key=lambda s: s.finished_at or 0.0)
            del self._streams[oldest.id]
        stream_id = prefix + secrets.token_hex(12)
        stream = BroadcastStream(stream_id, session, renderer_for, self._log_factory(), self.config, encode, self.store)
        if not self._resuming:
            stream.stop_resuming()
        self._streams[stream_id] = stream
        return stream

    def get(self, stream_id: str) -> BroadcastStream | None:
        """The stream, if it is running or finished less than `retention` seconds ago."""
        self._sweep()
        return self._streams.get(stream_id)

    async def remote(self, stream_id: str, after: int) -> RemoteStream | None:
        """
        A stream another process runs (or ran), from the store, with its events after id
        `after`: `None` if the store keeps no such stream. Raises `ReplayGapError`, or
        `SharedStateError` when the store fails.
        """
        logged = await self.store.read_events(stream_id, after)
        if logged is None:
            return None
        return RemoteStream(stream_id, self.store, logged, after)

    async def delete(self, stream_id: str) -> None:
        """
        Forget a stream here and in the store (cancelling it if it runs). Raises
        `SharedStateError` when the store fails: the stream is then still kept here.
        """
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.stop_sharing()
        await self.store.delete_events(stream_id)
        self.remove(stream_id)

    def remove(self, stream_id: str) -> BroadcastStream | None:
        """Forget a stream (cancelling it if it runs); the stream, if there was one."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.session.cancel()
        return stream

    def _sweep(self) -> None:
        now = trio.current_time()
        for stream_id, stream in list(self._streams.items()):
            if stream.finished_at is not None and now - stream.finished_at >= self.config.retention:
                del self._streams[stream_id]


class RemoteStream:
    """
    A stream run by another process, read from the shared store: `backlog`, its events after
    the watcher's last, then each `next()` write, the live ones, until its end. Redis failing
    ends the following with a comment line (`SHARED_STATE_WARNING`) and no end: the client
    resumes (`Last-Event-ID`), here or on the process that runs the stream.
    """

    def __init__(self, stream_id: str, store: StreamStore, logged: LoggedEvents, after: int) -> None:
        self.id = stream_id
        self._store = store
        self.backlog = [data for _, data in logged.events]
        self.last_id = max(after, logged.last_id)
        """
        The last event this watcher has: its client may hold events not yet written to Redis
        (they go every `write_interval`), which it is then not sent again.
        """
        self.last_written = logged.last_id
        """The last event Redis has (so far)."""
        self.ended = logged.ended
        """The stream's end was written to Redis: it has no event after `last_written`."""
        self._over = logged.ended

    async def next(self) -> bytes | None:
        """
        The next write: the events that came, or `SSE_KEEP_ALIVE` when none did within
        `[redis] follow_block`; `None` once the stream is over for this watcher.
        """
        if self._over:
            return None
        try:
            logged = await self._store.follow_events(self.id, self.last_id)
        except SharedStateError:
            self._over = True
            return SHARED_STATE_WARNING
        if logged is None:  # expired meanwhile: it ended long ago, or its process died
            return None
        self._over = logged.ended
        if logged.events:
            self.last_id = logged.events[-1][0]
            return b"".join(data for _, data in logged.events)
        return None if logged.ended else SSE_KEEP_ALIVE
