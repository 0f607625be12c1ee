"""
`ChunkedDecoder`: a chunked response body (RFC 9112 §7.1) decoded, sans-IO, for the pool's
body reader.

h11 decoded it before, one `Data` event per chunk, each through its event machinery (the
reader, the receive buffer, the state transitions): 9-10% of the proxy's busy CPU at 200
concurrent 64-token streams (py-spy, cProfile), the largest Python cost left on the way of a
token. A chunk costs here a `find`, an `int` and a slice, and its CRLF a `find`: in one
`benchmarks/cpu_per_stream.py` phase at 200 streams under cProfile, the proxy made 11.72 M
function calls where it made 12.62 M, h11 0.39 M of them (the heads) where it made 1.29 M,
this decoder 0.13 M.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_FRAMING_SIZE", "ChunkedDecodeError", "ChunkedDecoder"]

MAX_FRAMING_SIZE: Final = 64 * 1024
"""
The most bytes a chunk-size line, or the whole trailer section, may take: what the decoder
holds at most while a line has no CRLF yet (h11, as httpcore sets it up, held up to 100 KiB
of an incomplete event).
"""

_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"

# What the framing line the decoder waits for is.
_SIZE: Final = 0
_DATA_END: Final = 1  # the empty line that ends a chunk's data
_TRAILER: Final = 2


class ChunkedDecodeError(Exception):
    """The body is not valid chunked framing, or it ended before its last chunk."""


class ChunkedDecoder:
    """
    Bytes of a chunked body in, its data out, as it comes: `feed` takes what a read gave
    (`b""` when the connection closed) and returns the body data in it, in order.

    Strict where a lenient reading would change the body's meaning (a size is hex digits
    only, every chunk's data ends with CRLF, a trailer line is a field line), lenient where
    h11 was (whitespace after a size); extensions and trailer fields are read and dropped.
    Once `ended`, what followed the body is `trailing` (its first `MAX_FRAMING_SIZE` bytes).
    """

    def __init__(self) -> None:
        self.ended = False
        self.trailing = b""
        self._expected = _SIZE
        self._in_chunk = 0
        """The current chunk's data bytes still to come."""
        self._held = b""
        """The start of a framing line whose CRLF has not come yet (at most `MAX_FRAMING_SIZE`)."""
        self._trailer_size = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.ended:
            self.trailing += data[: MAX_FRAMING_SIZE - len(self.trailing)]  # enough to tell there was some
            return []
        if not data:
            raise ChunkedDecodeError("the body ended before its last chunk")
        if self._held:
            data, self._held = self._held + data, b""
        body = []
        at = 0
        while at < len(data) and not self.ended:
            if self._in_chunk:
                piece = data[at : at + self._in_chunk]
                body.append(piece)
                at += len(piece)
                self._in_chunk -= len(piece)
            else:
                at = self._framing_line(data, at)
        return body

    def _framing_line(self, data: bytes, at: int) -> int:
        """The framing line at `at` read: where the data after it starts (its end, held, if it is incomplete)."""
        end = data.find(b"\r\n", at)
        if end < 0:
            self._hold(data[at:])
            return len(data)
        if end - at > MAX_FRAMING_SIZE - self._trailer_size:
            raise ChunkedDecodeError(f"a chunk-size or trailer line longer than {MAX_FRAMING_SIZE} bytes")
        line = data[at:end]
        if self._expected == _SIZE:
            self._in_chunk = _chunk_size(line)
            self._expected = _DATA_END if self._in_chunk else _TRAILER
        elif self._expected == _DATA_END:
            if line:
                raise ChunkedDecodeError(f"a chunk's data is not followed by CRLF: {line[:20]!r}")
            self._expected = _SIZE
        elif line:
            if b":" not in line or b"\r" in line or b"\n" in line:
                raise ChunkedDecodeError(f"malformed trailer line: {line[:40]!r}")
            self._trailer_size += end + 2 - at
        else:  # the empty line that ends the trailer section, and the body
            self.ended = True
            self.trailing = data[end + 2 :]
            return len(data)
        return end + 2

    def _hold(self, start: bytes) -> None:
        if self._expected == _DATA_END and not b"\r\n".startswith(start):
            raise ChunkedDecodeError(f"a chunk's data is not followed by CRLF: {start[:20]!r}")
        if len(start) > MAX_FRAMING_SIZE - self._trailer_size:
            raise ChunkedDecodeError(f"a chunk-size or trailer line longer than {MAX_FRAMING_SIZE} bytes")
        self._held = start


def _chunk_size(line: bytes) -> int:
    """The size on a chunk-size line: hex digits, then optionally whitespace and extensions (dropped)."""
    size, semicolon, extensions = line.partition(b";")
    if semicolon or size[-1:] in (b" ", b"\t"):
        size = size.rstrip(b" \t")
        if b"\r" in extensions or b"\n" in extensions:
            raise ChunkedDecodeError(f"malformed chunk size line: {line[:40]!r}")
    if not size or size.translate(None, _HEX_DIGITS):
        raise ChunkedDecodeError(f"malformed chunk size line: {line[:40]!r}")
    return int(size, 16)
