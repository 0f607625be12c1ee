"""
The content stages between the upstream reader and the client: buffer, transform, validate.

Each is a task that reads one bounded channel and writes the next; the end of the stream is
the close of its input, which it passes on by closing its output. Items other than text
deltas (`OPENED`, notices, tool calls, errors) pass through in order; before any of them the
buffer sends what it holds, so nothing is lost or reordered.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import trio

from .._events import Delta
from .._exceptions import ValidationError
from .._policy import BufferConfig
from ._content import Transform, Validator
from ._items import SessionItem
from ._text_buffer import TextBuffer

__all__ = ["Receive", "Send", "ValidationError", "buffer_stage", "transform_stage", "validate_stage"]

Receive = trio.MemoryReceiveChannel[SessionItem]
Send = trio.MemorySendChannel[SessionItem]


async def buffer_stage(config: BufferConfig, receive: Receive, send: Send) -> None:
    """
    Merge text deltas into chunks. The flush timer is a deadline on this stage's receive:
    text waits at most `flush_interval_ms`, even if no further token ever comes.
    """
    buffer = TextBuffer(config)
    held = _Arrivals()
    interval = config.flush_interval_ms / 1000 or math.inf

    async def send_text(chunks: Sequence[str]) -> None:
        # A chunk is as old as the oldest character in it: that is what the client waited for.
        arrived = held.oldest
        held.trim_to(buffer.pending)
        for chunk in chunks:
            await send.send(Delta(text=chunk, arrived=arrived))

    async with receive, send:
        while True:
            with trio.move_on_at(held.oldest + interval) as timer:
                try:
                    item = await receive.receive()
                except trio.EndOfChannel:
                    break
            if timer.cancelled_caught:
                await send_text(buffer.flush())
                continue
            if isinstance(item, Delta) and item.text:
                held.add(len(item.text), trio.current_time() if item.arrived is None else item.arrived)
                await send_text(buffer.push(item.text))
                rest = replace(item, text="", raw=None, arrived=None)
                if not rest.says_anything:
                    continue
                item = rest
            await send_text(buffer.flush())
            await send.send(item)
        await send_text(buffer.flush())


class _Arrivals:
    """
    When each piece of the buffered text arrived, so that the buffer knows the age of its
    oldest held character: the flush deadline and the buffer latency are measured from it.
    """

    def __init__(self) -> None:
        self._pieces: collections.deque[tuple[int, float]] = collections.deque()
        self._chars = 0

    @property
    def oldest(self) -> float:
        return self._pieces[0][1] if self._pieces else math.inf

    def add(self, length: int, arrived: float) -> None:
        self._pieces.append((length, arrived))
        self._chars += length

    def trim_to(self, pending: int) -> None:
        """Forget the pieces sent: the `pending` characters still held are the newest."""
        while self._pieces and self._chars - self._pieces[0][0] >= pending:
            self._chars -= self._pieces.popleft()[0]


async def transform_stage(transforms: Sequence[Transform], receive: Receive, send: Send) -> None:
    async with receive, send:
        async for item in receive:
            if isinstance(item, Delta) and item.text:
                text = item.text
                for transform in transforms:
                    text = transform(text)
                if text != item.text:
                    item = replace(item, text=text, raw=None)
            await send.send(item)


async def validate_stage(
    validators: Sequence[Validator], abort_upstream: Callable[[], None], receive: Receive, send: Send
) -> None:
    """
    Check the text so far after each delta. On failure the delta is withheld, the upstream
    is cancelled at once, and the stream ends with a `ValidationError` saying why.
    """
    text = ""
    async with receive, send:
        async for item in receive:
            if isinstance(item, Delta) and item.text:
                text += item.text  # in place while nothing else holds `text`: linear overall
                for validator in validators:
                    reason = validator(text, item.text)
                    if reason is not None:
                        abort_upstream()
                        await send.send(ValidationError(f"stream stopped by a validator: {reason}"))
                        return
            await send.send(item)
