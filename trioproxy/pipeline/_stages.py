"""
The content stages between the upstream reader and the client: buffer, transform, validate.

Each is a task that reads one bounded channel and writes the next; the end of the stream is
the close of its input, which it passes on by closing its output. Items other than text
deltas (`OPENED`, notices, tool calls, errors) pass through in order; before any of them the
buffer sends what it holds, so nothing is lost or reordered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from .._events import Delta
from .._exceptions import TrioproxyError
from .._policy import BufferConfig
from ._content import Transform, Validator
from ._text_buffer import TextBuffer

if TYPE_CHECKING:
    from ._session import SessionItem  # noqa: F401 (named in the channel aliases below)

__all__ = ["ValidationError", "buffer_stage", "transform_stage", "validate_stage"]

Receive = trio.MemoryReceiveChannel["SessionItem"]
Send = trio.MemorySendChannel["SessionItem"]


class ValidationError(TrioproxyError):
    status = 422
    type = "validation_error"


async def buffer_stage(config: BufferConfig, receive: Receive, send: Send) -> None:
    """
    Merge text deltas into chunks. The flush timer is a deadline on this stage's receive:
    text waits at most `flush_interval_ms`, even if no further token ever comes.
    """
    buffer = TextBuffer(config)
    interval = config.flush_interval_ms / 1000 or math.inf
    held_since = math.inf  # when the oldest held character arrived

    async def send_text(chunks: Sequence[str]) -> None:
        # A chunk is as old as the oldest character in it: that is what the client waited for.
        arrived = held_since
        for chunk in chunks:
            await send.send(Delta(text=chunk, arrived=arrived))

    async with receive, send:
        while True:
            with trio.move_on_at(held_since + interval) as timer:
                try:
                    item = await receive.receive()
                except trio.EndOfChannel:
                    break
            if timer.cancelled_caught:
                await send_text(buffer.flush())
                held_since = math.inf
                continue
            if isinstance(item, Delta) and item.text:
                if not buffer.pending:
                    held_since = trio.current_time()
                await send_text(buffer.push(item.text))
                if not buffer.pending:
                    held_since = math.inf
                rest = replace(item, text="", raw=None)
                if not (rest.role or rest.tool_calls or rest.finish_reason or rest.usage):
                    continue
                item = rest
            await send_text(buffer.flush())
            held_since = math.inf
            await send.send(item)
        await send_text(buffer.flush())


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
