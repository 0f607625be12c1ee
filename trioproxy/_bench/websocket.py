"""
Sans-IO WebSocket (RFC 6455), the client side only, for the load generator's WebSocket mode of
the Responses front: the opening handshake, masked client frames, and server messages.

Why not wsproto (which hypercorn uses): the load generator reads every token of every stream
in one task (`loadgen`), where wsproto's events cost several times a frame header's parse. A
client frame is rendered once per phase (the same `response.create` every stream), so its mask
is fixed: the mask exists to defeat cache poisoning by a browser's scripts, and a server may
not check how it was chosen (RFC 6455 §5.3).

No extensions (no permessage-deflate is offered), no subprotocol. Bounded: a message by
`MAX_MESSAGE`. Bytes in, messages out, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Final

__all__ = [
    "CLOSE",
    "MAX_MESSAGE",
    "PING",
    "PONG",
    "TEXT",
    "MessageDecoder",
    "WebSocketError",
    "accept_key",
    "client_frame",
    "handshake_request",
    "new_key",
]

#: The longest message accepted (as `loadgen.MAX_SSE_EVENT` bounds an SSE event).
MAX_MESSAGE: Final = 8 * 1024 * 1024

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MASK: Final = b"\x5a\xc3\x17\x8e"


class WebSocketError(Exception):
    """The server broke the protocol: a masked or oversized frame, a bad opcode or fragment."""


def handshake_request(host: str, port: int, target: str, key: bytes, headers: str = "") -> bytes:
    """The opening handshake's GET: `key` is 16 random bytes in base64; `headers`, lines each ending CRLF."""
    return (
        f"GET {target} HTTP/1.1\r\n"
        f"host: {f'[{host}]' if ':' in host else host}:{port}\r\n"
        "upgrade: websocket\r\n"
        "connection: Upgrade\r\n"
        f"sec-websocket-key: {key.decode('ascii')}\r\n"
        "sec-websocket-version: 13\r\n"
        f"{headers}"
        "\r\n"
    ).encode("latin-1")


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_key(key: bytes) -> bytes:
    """The `sec-websocket-accept` a server must answer `key` with."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One whole (FIN) frame, masked as a client's must be (a phase renders its one message once)."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + _MASK + bytes(byte ^ _MASK[i % 4] for i, byte in enumerate(payload))


class MessageDecoder:
    """
    The server's messages from its bytes: `feed` returns each whole message as (opcode,
    payload), a fragmented one joined, control frames (ping, pong, close) as they come, even
    between fragments.
    """

    __slots__ = ("_buffer", "_fragments", "_opcode")

    def __init__(self) -> None:
        self._buffer = b""
        #: The message being fragmented: its opcode and the payloads so far.
        self._opcode: int | None = None
        self._fragments: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        messages: list[tuple[int, bytes]] = []
        start = 0
        while (sizes := _frame_sizes(buffer, start)) is not None:
            header, length = sizes
            end = start + header + length
            if len(buffer) < end:
                break
            first = buffer[start]
            message = self._frame(first & 0x80 != 0, first & 0x0F, buffer[start + header : end])
            if message is not None:
                messages.append(message)
            start = end
        self._buffer = buffer[start:]
        return messages

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= CLOSE:
            if not fin or opcode > PONG:
                raise WebSocketError(f"a bad control frame (opcode {opcode:#x})")
            return opcode, payload
        if opcode == CONTINUATION:
            if self._opcode is None:
                raise WebSocketError("a continuation frame with no message to continue")
            self._fragments.append(payload)
            if sum(map(len, self._fragments)) > MAX_MESSAGE:
                raise WebSocketError(f"a message longer than {MAX_MESSAGE} bytes")
            if not fin:
                return None
            message = self._opcode, b"".join(self._fragments)
            self._opcode, self._fragments = None, []
            return message
        if opcode not in (TEXT, BINARY) or self._opcode is not None:
            raise WebSocketError(f"a bad data frame (opcode {opcode:#x}) or a new message inside another")
        if fin:
            return opcode, payload
        self._opcode, self._fragments = opcode, [payload]
        return None


def _frame_sizes(buffer: bytes, start: int) -> tuple[int, int] | None:
    """The header's and the payload's lengths of the frame at `start`, or None until its header is whole."""
    if len(buffer) - start < 2:
        return None
    first, second = buffer[start], buffer[start + 1]
    if second & 0x80:
        raise WebSocketError("a server frame must not be masked")
    if first & 0x70:
        raise WebSocketError("a frame with reserved bits set (no extension was agreed)")
    length, header = second & 0x7F, 2
    if length >= 126:
        header = 4 if length == 126 else 10
        if len(buffer) - start < header:
            return None
        length = int.from_bytes(buffer[start + 2 : start + header])
    if length > MAX_MESSAGE:
        raise WebSocketError(f"a frame longer than {MAX_MESSAGE} bytes")
    return header, length
