"""
A request's session: the nursery in which its pipeline's tasks run.

The HTTP response body is produced by an async generator, and a generator must never yield
from inside a nursery or cancel scope (PEP 789). So the session runs as its own task, in the
server's nursery, and hands the response its items through a bounded channel; the response
generator only iterates that channel and, in its `finally`, cancels the session. When the
client goes away, the server cancels the response, the generator's `finally` cancels the
session, and the upstream reader unwinds through httpx, which closes the upstream connection.

Items on `output`: `OPENED` (the upstream accepted: commit HTTP 200), `Delta`s, and at most
one `TrioproxyError`, always last. The end of the stream is the close of the channel; a
channel that closes with `completed` still false was cut short (the server is shutting down),
and the client must be told so rather than shown a truncated answer as whole.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .._events import Delta, Opened
from .._exceptions import TrioproxyError
from .._request import ChatRequest

if TYPE_CHECKING:
    from .._router import Route

__all__ = ["SessionItem", "StreamSession", "start_session"]

logger = logging.getLogger("trioproxy.session")

SessionItem = Opened | Delta | TrioproxyError


class StreamSession:
    """One generation in flight. Create with `start_session`; always end with `cancel()`."""

    def __init__(self, route: Route, chat: ChatRequest) -> None:
        self.route = route
        self.chat = chat
        self._cancel_scope = trio.CancelScope()
        self._send, self.output = trio.open_memory_channel[SessionItem](0)
        self.completed = False
        self.finished = trio.Event()

    async def run(self) -> None:
        """The session's task; returns when the stream ends or the session is cancelled."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_upstream, self._send)
        finally:
            self.finished.set()

    def cancel(self) -> None:
        """End the session now: every task stops and the upstream connection closes."""
        self._cancel_scope.cancel()

    async def _read_upstream(self, send: trio.MemorySendChannel[SessionItem]) -> None:
        """Pump the upstream into `send`; a failure becomes the stream's last item."""
        chat = self.chat
        async with send:
            try:
                await self.route.upstream.stream(chat, send)  # type: ignore[arg-type]
                self.completed = True
                return
            except TrioproxyError as exc:
                error = exc
            except trio.BrokenResourceError:
                return  # the response stopped reading: the session is being cancelled
            except Exception:
                # A bug, not an upstream failure: log it whole, and still tell the client.
                logger.exception("upstream reader for %s failed", chat.model)
                error = TrioproxyError("internal error while streaming")
            try:
                await send.send(error)
            except trio.BrokenResourceError:
                pass  # nobody is listening any more: the client left


def start_session(nursery: trio.Nursery, route: Route, chat: ChatRequest) -> StreamSession:
    session = StreamSession(route, chat)
    nursery.start_soon(session.run, name=f"session {chat.model}")
    return session
