"""
Sans-IO HTTP/1.1 for the benchmark's own upstream and load generator: message heads and body framing.

Why not h11, which both used before: h11 validates and re-frames every event, and at tens of
thousands of tokens a second that per-chunk cost made the harness, not the proxy, the
bottleneck. Here a head is parsed once per message and a body piece costs a `find` and a
slice. It is still real HTTP/1.1 framing (RFC 9112 §6): Content-Length, chunked with
extensions and trailers, read-until-close, `Connection: close` and HTTP/1.0, so the load
generator reads any server a `--compare` proxy runs on (uvicorn, hypercorn, aiohttp).

Everything is bounded: a head by `MAX_HEAD`, a chunk-size line by `MAX_CHUNK_LINE`, trailers
by `MAX_HEAD`. Bytes in, pieces out, no I/O: each framing is tested with plain bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HEAD",
    "Body",
    "ChunkedBody",
    "Head",
    "LengthBody",
    "ProtocolError",
    "UntilCloseBody",
    "find_head_end",
    "parse_head",
]

#: The longest message head (start line and headers) accepted, as h11's default.
MAX_HEAD: Final = 16 * 1024
#: The longest chunk-size line accepted (size, extensions and line end).
MAX_CHUNK_LINE: Final = 4096

_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")
_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")


class ProtocolError(Exception):
    """The peer broke HTTP/1.1: a malformed or oversized head, bad framing, or an early end of the body."""


def find_head_end(buffer: bytes) -> int:
    """
    Where the head in `buffer` ends (the index after its blank line), or -1 if it has not ended yet.

    Raises `ProtocolError` once `buffer` holds more than `MAX_HEAD` bytes without a blank line.
    """
    match = _HEAD_END.search(buffer)
    if match is None:
        if len(buffer) > MAX_HEAD:
            raise ProtocolError(f"a message head longer than {MAX_HEAD} bytes")
        return -1
    if match.end() > MAX_HEAD + 4:
        raise ProtocolError(f"a message head longer than {MAX_HEAD} bytes")
    return match.end()


@dataclass(frozen=True)
class Head:
    """A message's start line in its three parts, and its headers."""

    #: Request: (method, target, version); response: (version, status, reason).
    start: tuple[bytes, bytes, bytes]
    #: Names lower-cased; a repeated header's values joined with ", ".
    headers: dict[bytes, bytes]

    @property
    def version(self) -> bytes:
        """`HTTP/1.1` or `HTTP/1.0`, from whichever end of the start line holds it."""
        return self.start[0] if self.start[0].startswith(b"HTTP/") else self.start[2]

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated values of header `name`, lower-cased (e.g. `connection`)."""
        return {token.strip().lower() for token in self.headers.get(name, b"").split(b",") if token.strip()}

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another message after this one (RFC 9112 §9.3)."""
        connection = self.tokens(b"connection")
        if self.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection

    @property
    def status(self) -> int:
        """A response's status code."""
        return int(self.start[1])

    def request_body(self) -> Body:
        """The framing of a request's body (RFC 9112 §6.3): chunked, Content-Length, or none."""
        if b"transfer-encoding" in self.headers:
            if b"content-length" in self.headers:
                raise ProtocolError("both Transfer-Encoding and Content-Length")
            return self._chunked()
        if b"content-length" in self.headers:
            return LengthBody(self._content_length())
        return LengthBody(0)

    def response_body(self) -> Body:
        """The framing of a response's body to a request that was not HEAD (RFC 9112 §6.3)."""
        status = self.status
        if status < 200 or status in (204, 304):
            return LengthBody(0)
        if b"transfer-encoding" in self.headers:
            return self._chunked()
        if b"content-length" in self.headers:
            return LengthBody(self._content_length())
        return UntilCloseBody()

    def _chunked(self) -> ChunkedBody:
        codings = [coding.strip().lower() for coding in self.headers[b"transfer-encoding"].split(b",")]
        if codings != [b"chunked"]:
            # A compressed or otherwise coded body could not be read as text anyway.
            raise ProtocolError(f"unsupported Transfer-Encoding {self.headers[b'transfer-encoding']!r}")
        return ChunkedBody()

    def _content_length(self) -> int:
        # A repeated header arrives joined: "5, 5" is one length, "5, 6" is a framing attack.
        values = {value.strip() for value in self.headers[b"content-length"].split(b",")}
        if len(values) != 1 or not _DIGITS.fullmatch(value := values.pop()):
            raise ProtocolError(f"invalid Content-Length {self.headers[b'content-length']!r}")
        return int(value)


def parse_head(raw: bytes) -> Head:
    """
    Parse a head (as delimited by `find_head_end`, blank line included).

    Lines may end with CRLF or a bare LF (RFC 9112 §2.2 lets a recipient accept both).
    Obsolete line folding and a field name with whitespace before its colon are rejected.
    """
    lines = raw.split(b"\n")
    start = lines[0].rstrip(b"\r").split(b" ", 2)
    if len(start) == 2:
        start.append(b"")  # a status line whose reason phrase is empty
    if len(start) != 3 or not (start[0].startswith(b"HTTP/1.") or start[2].startswith(b"HTTP/1.")):
        raise ProtocolError(f"not an HTTP/1.x start line: {lines[0][:100]!r}")
    if start[0].startswith(b"HTTP/") and not (len(start[1]) == 3 and start[1].isdigit()):
        raise ProtocolError(f"invalid status code {start[1][:10]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProtocolError(f"malformed header line {line[:100]!r}")
        name, value = name.lower(), value.strip(b" \t")
        headers[name] = headers[name] + b", " + value if name in headers else value
    return Head((start[0], start[1], start[2]), headers)


class Body:
    """
    One message body's framing: `feed` takes the bytes that follow the head, returns the payload in them.

    `feed(b"")` means the connection has ended. Once `done`, `trailing` holds any bytes that
    came after the body (the start of another message, or garbage) and `feed` must not be
    called again.
    """

    __slots__ = ()

    done: bool
    trailing: bytes

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError


class LengthBody(Body):
    """A body of exactly Content-Length bytes."""

    __slots__ = ("_remaining", "done", "trailing")

    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0
        self.trailing = b""

    def feed(self, data: bytes) -> bytes:
        if not data:
            raise ProtocolError(f"the connection ended {self._remaining} bytes before the body's end")
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            return data
        self._remaining, self.done, self.trailing = 0, True, data[remaining:]
        return data[:remaining]


class UntilCloseBody(Body):
    """A response body without length or chunks: it ends when the connection does."""

    __slots__ = ("done", "trailing")

    def __init__(self) -> None:
        self.done = False
        self.trailing = b""

    def feed(self, data: bytes) -> bytes:
        if not data:
            self.done = True
        return data


_SIZE, _DATA, _DATA_END, _TRAILERS = range(4)


class ChunkedBody(Body):
    """
    A chunked body (RFC 9112 §7.1), decoded incrementally: the payload of a chunk is returned as
    soon as its bytes arrive, whatever way the chunks are split across reads.

    Chunk extensions are ignored, trailers read and dropped.
    """

    __slots__ = ("_held", "_remaining", "_state", "_trailer_bytes", "done", "trailing")

    def __init__(self) -> None:
        self.done = False
        self.trailing = b""
        #: An unfinished size line, chunk end or trailer line, kept for the next read.
        self._held = b""
        #: Payload bytes of the current chunk still to come.
        self._remaining = 0
        self._state = _SIZE
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> bytes:  # noqa: C901 - the body parser's one pass per read (the bench's hot path)
        if not data:
            raise ProtocolError("the connection ended inside a chunked body")
        if self._held:
            data, self._held = self._held + data, b""
        elif self._state == _SIZE:
            # The read a streaming server sends most: one whole chunk, `size CRLF payload CRLF`.
            line_end = data.find(b"\r\n", 0, 18)
            size = _chunk_size(data[:line_end]) if line_end > 0 else None
            if size and len(data) == line_end + size + 4 and data.endswith(b"\r\n"):
                return data[line_end + 2 : -2]
        pieces: list[bytes] = []
        position, end = 0, len(data)
        while position < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - position)
                pieces.append(data[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
                continue
            line_end = data.find(b"\n", position)
            if line_end < 0:
                self._hold(data[position:])
                break
            line = data[position:line_end].removesuffix(b"\r")
            position = line_end + 1
            if state == _SIZE:
                chunk_end = position + self._start_chunk(line)
                if chunk_end > position and data.startswith(b"\r\n", chunk_end):  # the whole chunk is here
                    pieces.append(data[position:chunk_end])
                    position = chunk_end + 2
                    self._state = _SIZE
            elif state == _DATA_END:
                if line:
                    raise ProtocolError(f"a chunk longer than its size line said: {line[:40]!r}")
                self._state = _SIZE
            else:
                self._trailer_bytes += len(line)
                if self._trailer_bytes > MAX_HEAD:
                    raise ProtocolError(f"chunked trailers longer than {MAX_HEAD} bytes")
                if not line:
                    self.done, self.trailing = True, data[position:]
                    break
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _start_chunk(self, line: bytes) -> int:
        """Take a chunk-size line (extensions and whitespace allowed); return the chunk's size."""
        size = _chunk_size(line)
        if size is None:
            size = _chunk_size(line.partition(b";")[0].strip(b" \t"))
        if size is None:
            raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
        self._remaining = size
        self._state = _DATA if size else _TRAILERS
        return size

    def _hold(self, rest: bytes) -> None:
        if len(rest) > MAX_CHUNK_LINE:
            raise ProtocolError(f"a chunk-size or trailer line longer than {MAX_CHUNK_LINE} bytes")
        self._held = rest


def _chunk_size(text: bytes) -> int | None:
    """
    The size a chunk-size line's number gives, or None if it is not 1-16 hex digits (`int`
    alone takes "0x", "+", "_").
    """
    if not 0 < len(text) <= 16 or text.strip(_HEX_DIGITS):
        return None
    return int(text, 16)
