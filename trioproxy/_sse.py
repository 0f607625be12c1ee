"""
Server-sent events: a sans-IO decoder and encoder.

The decoder follows the WHATWG HTML Standard §9.2.5/§9.2.6 ("Parsing an event stream",
"Interpreting an event stream") to the letter, because a proxy sits between two parties that each
expect the standard: whatever an upstream sends, trioproxy must see exactly the events a browser
would see. The Python SDK decoders (openai, anthropic, httpx-sse all share one) are not used: they
keep a leading BOM (losing the first event), yield events for blocks without data, keep the event
type of such blocks, accept `retry` values that `int()` accepts (`"+5"`, `" 7"`, `"١٢"`), and two
of them raise on invalid UTF-8 (the project's SSE protocol notes, "Python SDK decoders").

Sans-IO in the manner of h11 and httpx's `_decoders.py`: bytes in, events out, no trio and no
httpx, so every rule can be tested with plain bytes and every transport can reuse the code.

The encoder writes only constructs every client handles: `\\n` separators, exactly one space
after each colon, one `data:` line per line of the payload, and never an event without data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, final

import orjson

__all__ = [
    "SSEDecodeError",
    "SSEDecoder",
    "ServerSentEvent",
    "encode_comment",
    "encode_event",
    "encode_typed_event",
]

# Only CRLF, lone CR and lone LF end a line (§9.2.6). `str.splitlines()` would also split on
# U+2028, U+0085, VT, FF, ... which are ordinary characters in an event stream.
_LINE_END: Final = re.compile(r"\r\n|\r|\n")
_BOM: Final = "\ufeff"
_BOM_BYTES: Final = b"\xef\xbb\xbf"

_DEFAULT_MAX_LINE_SIZE: Final = 1_048_576
_DEFAULT_MAX_EVENT_SIZE: Final = 8_388_608


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """
    One dispatched event.

    `id` is the stream's last-event-ID string at dispatch time (it persists across events, as
    in a browser's `MessageEvent.lastEventId`); `retry` is the reconnection time in
    milliseconds in force at dispatch time, or `None` if the stream never set one.
    """

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEDecodeError(ValueError):
    """
    A line or an event exceeded the decoder's bound.

    The WHATWG rules never reject a stream; this error exists only so that a hostile or broken
    upstream cannot make the proxy buffer without limit while it waits for a line end or a
    blank line.
    """


@final
class SSEDecoder:
    """
    Incremental event-stream decoder: feed it bytes as they arrive, get back finished events.

    Lines are found in bytes and decoded afterwards, which is safe because the bytes CR and LF
    never occur inside a multi-byte UTF-8 sequence: a character split across two chunks simply
    stays in the buffer of the unfinished line. A CR ends its line at once, even at the end of a
    chunk; if the next chunk starts with LF, that LF is the second half of a CRLF and is
    skipped (so no phantom blank line, and no event is held back waiting for the next chunk).

    `max_line_size` and `max_event_size` are in characters. The event size is the size of the
    data buffer as the standard defines it: each `data` value plus the LF appended after it.
    After an `SSEDecodeError` the decoder is unusable: `feed()` raises it again.
    """

    __slots__ = (
        "_bom_checked",
        "_buf",
        "_closed",
        "_data",
        "_data_size",
        "_error",
        "_event_type",
        "_id_buffer",
        "_last_event_id",
        "_max_event_size",
        "_max_line_size",
        "_pending_check_at",
        "_retry",
        "_skip_lf",
    )

    def __init__(
        self,
        *,
        max_line_size: int = _DEFAULT_MAX_LINE_SIZE,
        max_event_size: int = _DEFAULT_MAX_EVENT_SIZE,
    ) -> None:
        if max_line_size < 1 or max_event_size < 1:
            raise ValueError("max_line_size and max_event_size must be positive")
        self._max_line_size = max_line_size
        self._max_event_size = max_event_size
        # Bytes of the line not yet ended by CR/LF.
        self._buf = bytearray()
        # The unfinished line's size is only measured in characters once its byte count passes
        # this mark (bytes >= characters, so below it the line cannot be too long).
        self._pending_check_at = max_line_size
        # The previous chunk ended with CR: an LF starting the next chunk completes a CRLF.
        self._skip_lf = False
        self._bom_checked = False
        self._closed = False
        self._error: SSEDecodeError | None = None
        # The three buffers of §9.2.6, plus the committed last event ID and reconnection time.
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._id_buffer = ""
        self._last_event_id = ""
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """
        The last event ID string: committed at each blank line, never by an unfinished event.

        This is what a client would send back as `Last-Event-ID` when it reconnects.
        """
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The reconnection time in milliseconds set by the last valid `retry` field, if any."""
        return self._retry

    def feed(self, data: bytes) -> list[ServerSentEvent]:  # noqa: C901 - one pass per chunk, the hot path (benchmarks/cpu_per_stream.py measures it)
        """
        Take the next chunk of the stream and return the events it completes, in order.

        An empty chunk is not EOF (call `close()` for that). Other bytes-like objects
        (`bytearray`, `memoryview`) are accepted and copied. Raises `SSEDecodeError` when a
        line or an event exceeds its bound.
        """
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("SSEDecoder.feed() called after close()")
        if not data:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
                if not data:
                    return []

        end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if end < 0:
            # No line end in this chunk: the whole chunk belongs to the unfinished line.
            self._buf += data
            self._check_pending()
            return []

        # Everything up to and including the last line end is a run of complete lines. Decode
        # it in one call: decoding at CR/LF boundaries gives the same text as decoding the
        # whole stream, because CR and LF bytes never sit inside a UTF-8 sequence.
        head: bytes | bytearray = data[: end + 1]
        if self._buf:
            self._buf += head
            head = self._buf
        text = head.decode("utf-8", "replace")
        self._buf = bytearray(data[end + 1 :])
        self._skip_lf = end == len(data) - 1 and data[end] == 0x0D
        self._pending_check_at = self._max_line_size

        if not self._bom_checked:
            # The UTF-8 decode algorithm strips one BOM, at the start of the stream only.
            self._bom_checked = True
            if text.startswith(_BOM):
                text = text[1:]

        lines = _LINE_END.split(text) if "\r" in text else text.split("\n")
        lines.pop()  # `text` ends with a line end, so the last piece is always "".
        if len(head) > self._max_line_size:
            self._check_lines(lines)
        events = self._process(lines)
        if self._buf:
            self._check_pending()
        return events

    def close(self) -> list[ServerSentEvent]:
        """
        Mark the end of the stream.

        Always returns `[]`: per §9.2.6 an event not yet ended by a blank line is discarded,
        and so is a final line without a line end. A pending `id:` of such an event never
        becomes `last_event_id`. The return value keeps the h11-style shape `feed()` has, so
        callers need not special-case EOF.
        """
        self._closed = True
        self._buf = bytearray()
        self._skip_lf = False
        self._data = []
        self._data_size = 0
        self._event_type = ""
        return []

    def _fail(self, message: str) -> SSEDecodeError:
        self._error = SSEDecodeError(message)
        self._buf = bytearray()
        self._data = []
        return self._error

    def _check_pending(self) -> None:
        """Raise if the unfinished line is already longer than `max_line_size` characters."""
        size = len(self._buf)
        if size <= self._pending_check_at:
            return
        # Invalid or truncated sequences decode to at most one U+FFFD each, so this is never
        # more than the characters the finished line will have.
        chars = len(self._buf.decode("utf-8", "replace"))
        if not self._bom_checked and self._buf.startswith(_BOM_BYTES):
            chars -= 1
        if chars > self._max_line_size:
            raise self._fail(f"SSE line longer than {self._max_line_size} characters")
        # Every further character takes at least one more byte: no need to decode again until
        # enough bytes have arrived to possibly cross the bound. This keeps a long line fed in
        # tiny chunks from being decoded over and over.
        self._pending_check_at = size + (self._max_line_size - chars)

    def _check_lines(self, lines: list[str]) -> None:
        limit = self._max_line_size
        for line in lines:
            if len(line) > limit:
                raise self._fail(f"SSE line longer than {limit} characters")

    def _process(self, lines: list[str]) -> list[ServerSentEvent]:
        """Interpret complete lines (§9.2.6) and return the events they dispatch."""
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line.startswith("data:"):
                # Fast path: nearly every line of an LLM stream is `data: {json}`.
                value = line[6:] if line.startswith(" ", 5) else line[5:]
                self._append_data(value)
            elif line[0] == ":":
                continue  # A comment; it may contain anything, NUL included.
            else:
                colon = line.find(":")
                if colon < 0:
                    field, value = line, ""
                else:
                    field = line[:colon]
                    value = line[colon + 2 :] if line.startswith(" ", colon + 1) else line[colon + 1 :]
                self._process_field(field, value)
        return events

    def _process_field(self, field: str, value: str) -> None:
        # Field names are compared literally: `Data`, `data ` and `\ufeffdata` are unknown.
        if field == "data":
            self._append_data(value)
        elif field == "event":
            self._event_type = value
        elif field == "id":
            # An ID with NUL could never be sent back as `Last-Event-ID`, so it is ignored.
            if "\0" not in value:
                self._id_buffer = value
        # `retry` takes ASCII digits only: `int()` would also take " 7", "+5", "1_000", "١٢".
        elif field == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # Any other field is ignored.

    def _append_data(self, value: str) -> None:
        self._data_size += len(value) + 1
        if self._data_size > self._max_event_size:
            raise self._fail(f"SSE event data longer than {self._max_event_size} characters")
        self._data.append(value)

    def _dispatch(self) -> ServerSentEvent | None:
        """Handle a blank line: commit the ID, then emit the event if it has data."""
        self._last_event_id = self._id_buffer
        if not self._data:
            self._event_type = ""
            return None
        # Joining with LF is the data buffer with its final LF removed.
        event = ServerSentEvent(
            data="\n".join(self._data),
            event=self._event_type or "message",
            id=self._last_event_id,
            retry=self._retry,
        )
        self._data = []
        self._data_size = 0
        self._event_type = ""
        return event


def encode_event(  # noqa: C901 - its checks and encoding in one pass: once per token on the generic SSE stream
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> str:
    """
    Encode one event, ending with a blank line.

    Fields come in the order `event`, `id`, `retry`, `data`, separated by `\\n`. `data` is split
    on CRLF, CR and LF into one `data: ` line per piece, so a decoder gives back the payload
    with every line end turned into LF. There is always one space after the colon, so a value
    that itself starts with a space survives the decoder's removal of one space.

    `data=None` writes no `data` line; that is only allowed for a block that sets `id` or
    `retry`, because a block without data dispatches nothing and an `event:` without data makes
    openai-python crash with `JSONDecodeError` (checked against openai 3.54.0).

    Raises `ValueError` for anything a decoder would read differently from what was meant:
    CR or LF in `event` or `id`, NUL in `id`, an `event` starting with a space, a `retry` that
    is not a non-negative `int`, or no data where data is required.
    """
    if data is None:
        if event is not None:
            raise ValueError("an SSE event with an event name must have data")
        if id is None and retry is None:
            raise ValueError("an SSE event needs data (or at least an id or retry field)")
    parts: list[str] = []
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError(f"SSE event name must not contain CR or LF: {event!r}")
        if event.startswith(" "):
            raise ValueError(f"SSE event name must not start with a space: {event!r}")
        parts.append(f"event: {event}\n")
    if id is not None:
        if "\r" in id or "\n" in id or "\0" in id:
            raise ValueError(f"SSE id must not contain CR, LF or NUL: {id!r}")
        parts.append(f"id: {id}\n")
    if retry is not None:
        if type(retry) is not int or retry < 0:
            raise ValueError(f"SSE retry must be a non-negative int: {retry!r}")
        parts.append(f"retry: {retry}\n")
    if data is not None:
        if "\r" in data:
            pieces = _LINE_END.split(data)
        elif "\n" in data:
            pieces = data.split("\n")
        else:
            pieces = [data]
        parts.extend(f"data: {piece}\n" for piece in pieces)
    parts.append("\n")
    return "".join(parts)


def encode_comment(text: str = "") -> str:
    """
    Encode a comment block, `": text\\n\\n"`: decoders ignore it, so it is the safe keep-alive.

    Raises `ValueError` if `text` contains CR or LF, which would end the comment early and turn
    the rest into a field.
    """
    if "\r" in text or "\n" in text:
        raise ValueError(f"SSE comment must not contain CR or LF: {text!r}")
    return f": {text}\n\n"


def encode_typed_event(payload: Mapping[str, Any]) -> bytes:
    """
    An event named by its payload's `type`, its one `data:` line the payload's JSON: how the
    Messages and Responses APIs stream, the name repeated in the data. Unlike `encode_event` it
    checks nothing, for the renderers' hot path: compact JSON has no line end, and the names are
    the protocols' own event types.
    """
    name: str = payload["type"]
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
