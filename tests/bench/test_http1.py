"""The harness's sans-IO HTTP/1.1: heads, framing rules, and bodies however their bytes are split."""

from __future__ import annotations

import pytest

from trioproxy._bench.http1 import (
    MAX_HEAD,
    Body,
    ChunkedBody,
    Head,
    LengthBody,
    ProtocolError,
    UntilCloseBody,
    find_head_end,
    parse_head,
)


def head(raw: bytes) -> Head:
    return parse_head(raw[: find_head_end(raw)])


def feed_in_pieces(body: Body, data: bytes, size: int) -> tuple[bytes, bytes]:
    """Feed `data` `size` bytes at a time, as reads deliver it; return the payload and what came after the body."""
    payload = b""
    for start in range(0, len(data), size):
        payload += body.feed(data[start : start + size])
        if body.done:
            return payload, body.trailing + data[start + size :]
    return payload, b""


def test_a_request_head_is_parsed_with_repeated_headers_joined() -> None:
    parsed = head(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a:  2 \r\n\r\nbody")
    assert parsed.start == (b"POST", b"/v1/chat/completions?x=1", b"HTTP/1.1")
    assert parsed.headers == {b"host": b"a", b"x-a": b"1, 2"}
    assert parsed.version == b"HTTP/1.1"
    assert parsed.keep_alive


def test_a_status_line_without_reason_and_bare_lf_line_ends_are_accepted() -> None:
    parsed = head(b"HTTP/1.0 204\nConnection: keep-alive\n\n")
    assert parsed.status == 204
    assert parsed.start[2] == b""
    assert parsed.keep_alive  # HTTP/1.0 only with an explicit keep-alive


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_keep_alive_follows_the_version_and_connection_header(raw: bytes, keep_alive: bool) -> None:
    assert head(raw).keep_alive is keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"GET /\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : value\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: line\r\n\r\n",
    ],
)
def test_a_malformed_head_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        head(raw)


def test_a_head_is_bounded() -> None:
    assert find_head_end(b"HTTP/1.1 200 OK\r\n" + b"x" * 100) == -1
    with pytest.raises(ProtocolError):
        find_head_end(b"HTTP/1.1 200 OK\r\nx: " + b"x" * MAX_HEAD)


@pytest.mark.parametrize(
    ("raw", "framing"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", ChunkedBody),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", LengthBody),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", LengthBody),
        (b"HTTP/1.1 200 OK\r\n\r\n", UntilCloseBody),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", LengthBody),
    ],
)
def test_the_response_framing_follows_rfc_9112(raw: bytes, framing: type) -> None:
    assert type(head(raw).response_body()) is framing


def test_a_response_without_a_body_is_done_at_once() -> None:
    assert head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").response_body().done


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 0x10\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
    ],
)
def test_conflicting_or_unsupported_framing_is_a_protocol_error(headers: bytes) -> None:
    with pytest.raises(ProtocolError):
        head(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n").response_body()


def test_a_request_with_both_lengths_is_refused_and_one_with_none_has_no_body() -> None:
    with pytest.raises(ProtocolError):
        head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n").request_body()
    assert head(b"GET / HTTP/1.1\r\n\r\n").request_body().done


CHUNKED = b"5\r\nhello\r\n1;name=value\r\n \r\n6\r\nworld!\r\n0\r\nx-trailer: 1\r\n\r\nNEXT"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, len(CHUNKED)])
def test_a_chunked_body_decodes_the_same_however_it_is_split(size: int) -> None:
    body = ChunkedBody()
    assert feed_in_pieces(body, CHUNKED, size) == (b"hello world!", b"NEXT")
    assert body.done


def test_a_whole_chunk_per_read_is_returned_as_it_comes() -> None:
    body = ChunkedBody()
    assert body.feed(b"3\r\nabc\r\n") == b"abc"
    assert body.feed(b"2\r\nde\r\n0\r\n\r\n") == b"de"
    assert body.done
    assert body.trailing == b""


@pytest.mark.parametrize(
    "data",
    [
        b"x\r\nabc\r\n",  # not a hex size
        b"+3\r\nabc\r\n",  # int() would take it
        b"3\r\nabcd\r\n",  # longer than its size line
        b"1" * 5000,  # a size line without end
    ],
)
def test_a_broken_chunked_body_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ChunkedBody().feed(data)


def test_the_connection_ending_inside_a_body_is_a_protocol_error() -> None:
    chunked = ChunkedBody()
    chunked.feed(b"5\r\nhel")
    with pytest.raises(ProtocolError):
        chunked.feed(b"")
    length = LengthBody(5)
    assert length.feed(b"hel") == b"hel"
    with pytest.raises(ProtocolError):
        length.feed(b"")


def test_a_length_body_stops_at_its_length_and_keeps_what_follows() -> None:
    body = LengthBody(5)
    assert body.feed(b"hel") == b"hel"
    assert body.feed(b"loHTTP/1.1") == b"lo"
    assert body.done
    assert body.trailing == b"HTTP/1.1"


def test_a_body_until_close_ends_with_the_connection() -> None:
    body = UntilCloseBody()
    assert body.feed(b"abc") == b"abc"
    assert not body.done
    assert body.feed(b"") == b""
    assert body.done
