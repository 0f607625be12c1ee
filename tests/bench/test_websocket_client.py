"""The load generator's sans-IO WebSocket client: frames as RFC 6455 writes them, however they are split."""

from __future__ import annotations

import pytest

from trioproxy._bench.websocket import (
    CLOSE,
    MAX_MESSAGE,
    PING,
    TEXT,
    MessageDecoder,
    WebSocketError,
    accept_key,
    client_frame,
)


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    length = len(payload)
    if length < 126:
        size = bytes((length,))
    elif length < 1 << 16:
        size = bytes((126,)) + length.to_bytes(2, "big")
    else:
        size = bytes((127,)) + length.to_bytes(8, "big")
    return bytes(((0x80 if fin else 0) | opcode,)) + size + payload


def test_the_accept_key_is_rfc_6455_s_example() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("length", [0, 5, 125, 126, 65535, 65536])
def test_a_client_frame_is_masked_and_unmasks_to_its_payload(length: int) -> None:
    payload = bytes(i % 251 for i in range(length))
    frame = client_frame(TEXT, payload)
    assert frame[0] == 0x81
    assert frame[1] & 0x80  # FIN text, masked
    header = {0: 2, 5: 2, 125: 2, 126: 4, 65535: 4, 65536: 10}[length]
    mask, masked = frame[header : header + 4], frame[header + 4 :]
    assert bytes(byte ^ mask[i % 4] for i, byte in enumerate(masked)) == payload


def test_messages_are_the_same_however_the_bytes_are_split() -> None:
    stream = (
        server_frame(TEXT, b'{"type":"response.created"}')
        + server_frame(TEXT, b"frag", fin=False)
        + server_frame(PING, b"p")  # a control frame between fragments
        + server_frame(0x0, b"mented", fin=False)
        + server_frame(0x0, b"!")
        + server_frame(TEXT, b"x" * 300)
        + server_frame(CLOSE, b"\x03\xe8bye")
    )
    expected = [
        (TEXT, b'{"type":"response.created"}'),
        (PING, b"p"),
        (TEXT, b"fragmented!"),
        (TEXT, b"x" * 300),
        (CLOSE, b"\x03\xe8bye"),
    ]
    for size in range(1, 40):
        decoder = MessageDecoder()
        found = [m for start in range(0, len(stream), size) for m in decoder.feed(stream[start : start + size])]
        assert found == expected, size


@pytest.mark.parametrize(
    "stream",
    [
        b"\x81\x85" + b"\x00" * 9,  # masked by the server
        b"\xc1\x01x",  # a reserved bit, no extension agreed
        server_frame(0x0, b"x"),  # a continuation of nothing
        server_frame(TEXT, b"a", fin=False) + server_frame(TEXT, b"b"),  # a new message inside another
        server_frame(PING, b"", fin=False),  # a fragmented control frame
        b"\x81\x7f" + (MAX_MESSAGE + 1).to_bytes(8, "big"),  # over the bound, refused before it is read
    ],
)
def test_a_server_that_breaks_the_protocol_is_an_error(stream: bytes) -> None:
    with pytest.raises(WebSocketError):
        MessageDecoder().feed(stream)
