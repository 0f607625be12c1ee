"""The upstream's chunked body decoder (`_upstream/_chunked.py`), sans-IO: bytes in, body data out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._upstream._chunked import MAX_FRAMING_SIZE, ChunkedDecodeError, ChunkedDecoder


def encoded(parts: list[bytes], *, extension: bytes = b"", trailer: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(part), extension, part) for part in parts) + b"0\r\n" + trailer + b"\r\n"


def decoded(*feeds: bytes) -> tuple[bytes, ChunkedDecoder]:
    """`feeds` decoded in turn; an empty one is skipped (`b""` is the end of the input)."""
    decoder = ChunkedDecoder()
    return b"".join(data for feed in feeds if feed for data in decoder.feed(feed)), decoder


def test_one_chunk_per_feed_is_one_piece_of_data() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5\r\nhello\r\n") == [b"hello"]
    assert decoder.feed(b"6\r\n world\r\n") == [b" world"]
    assert not decoder.ended
    assert decoder.feed(b"0\r\n\r\n") == []
    assert decoder.ended
    assert decoder.trailing == b""


def test_many_chunks_in_one_feed() -> None:
    body, decoder = decoded(encoded([b"a", b"bc", b"def"]))
    assert body == b"abcdef"
    assert decoder.ended


def test_uppercase_hex_leading_zeros_and_a_size_beyond_one_feed() -> None:
    part = bytes(range(256)) * 70  # 17920 bytes: 0x4600
    body, decoder = decoded(b"0004600\r\n", part[:100], part[100:] + b"\r\n", b"A\r\n0123456789\r\n0\r\n\r\n")
    assert body == part + b"0123456789"
    assert decoder.ended


def test_extensions_are_ignored_with_whitespace_before_them() -> None:
    body, decoder = decoded(b"5;name=value\r\nhello\r\n", b'1 \t;a;b="c d"\r\n!\r\n', b"0;last\r\n\r\n")
    assert body == b"hello!"
    assert decoder.ended


def test_whitespace_after_the_size_is_tolerated_as_h11_does() -> None:
    """Some servers send it; h11 (the reader before this one) accepts it."""
    body, decoder = decoded(b"5 \r\nhello\r\n0\r\n\r\n")
    assert (body, decoder.ended) == (b"hello", True)


def test_trailers_are_skipped() -> None:
    body, decoder = decoded(encoded([b"hello"], trailer=b"x-checksum: 1\r\nx-other: two\r\n"))
    assert body == b"hello"
    assert decoder.ended
    assert decoder.trailing == b""


def test_bytes_after_the_end_are_kept_as_trailing() -> None:
    body, decoder = decoded(encoded([b"hello"]) + b"HTTP/1.1 200", b" OK\r\n")
    assert body == b"hello"
    assert decoder.ended
    assert decoder.trailing == b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    "size_line",
    [b"-1", b"+1", b"0x10", b" 5", b"\t5", b"", b"g", b"5g", b"1_0", b";ext", b"5\n;x", b"\xd9\xa3"],
)
def test_a_malformed_size_line_is_refused(size_line: bytes) -> None:
    with pytest.raises(ChunkedDecodeError, match="chunk size"):
        ChunkedDecoder().feed(size_line + b"\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize("after_data", [b"XY", b"\n\r", b"\r\r", b"!\r\n"])
def test_chunk_data_not_followed_by_crlf_is_refused(after_data: bytes) -> None:
    with pytest.raises(ChunkedDecodeError, match="CRLF"):
        ChunkedDecoder().feed(b"5\r\nhello" + after_data + b"0\r\n\r\n")


def test_a_missing_crlf_is_refused_as_soon_as_its_first_byte_is_wrong() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5\r\nhello\r") == [b"hello"]
    with pytest.raises(ChunkedDecodeError, match="CRLF"):
        decoder.feed(b"X")


def test_a_malformed_trailer_line_is_refused() -> None:
    with pytest.raises(ChunkedDecodeError, match="trailer"):
        ChunkedDecoder().feed(b"0\r\nno colon here\r\n\r\n")


def test_the_end_of_input_before_the_last_chunk_is_an_error() -> None:
    for cut in (b"", b"5\r\nhel", b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n", b"0\r\nx-t: 1\r\n"):
        _, decoder = decoded(cut)
        with pytest.raises(ChunkedDecodeError, match="before its last chunk"):
            decoder.feed(b"")  # b"": the connection closed


def test_the_end_of_input_after_the_end_is_not_an_error() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\n")
    assert decoder.feed(b"") == []


def fed_before_refusal(decoder: ChunkedDecoder, piece: bytes) -> int:
    """How many bytes `decoder` took, as `piece` after `piece`, before it refused one as longer than its bound."""
    fed = 0
    with pytest.raises(ChunkedDecodeError, match="longer than"):  # noqa: PT012  # the feed that crosses it
        while fed <= 2 * MAX_FRAMING_SIZE:
            decoder.feed(piece)
            fed += len(piece)
    return fed


def test_an_overlong_size_line_is_refused_without_growing_beyond_the_bound() -> None:
    # A valid size so far (leading zeros), but never a CRLF: held up to the bound, not beyond.
    assert fed_before_refusal(ChunkedDecoder(), b"0" * 1024) == MAX_FRAMING_SIZE


def test_an_overlong_size_line_in_one_feed_is_refused() -> None:
    with pytest.raises(ChunkedDecodeError, match="longer than"):
        ChunkedDecoder().feed(b"1;" + b"x" * MAX_FRAMING_SIZE + b"\r\na\r\n0\r\n\r\n")


def test_an_overlong_trailer_line_is_refused_without_growing_beyond_the_bound() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\nx-long: ")
    fed = fed_before_refusal(decoder, b"v" * 1024)
    assert fed + len(b"x-long: ") <= MAX_FRAMING_SIZE < fed + len(b"x-long: ") + 1024


def test_a_trailer_section_of_many_lines_is_bounded_too() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n")
    assert fed_before_refusal(decoder, b"x-t: 1\r\n") == MAX_FRAMING_SIZE


@st.composite
def bodies_and_splits(draw: st.DrawFn) -> tuple[list[bytes], bytes, bytes, list[int]]:
    parts = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    extension = draw(st.sampled_from([b"", b";a=b", b" ;x"]))
    trailer = draw(st.sampled_from([b"", b"x-t: 1\r\n", b"a: b\r\nc: d\r\n"]))
    after = draw(st.binary(max_size=10))
    wire = encoded(parts, extension=extension, trailer=trailer) + after
    cuts = draw(st.sets(st.integers(min_value=1, max_value=len(wire) - 1), max_size=12))
    return parts, wire, after, sorted(cuts)  # every feed holds at least a byte


@given(bodies_and_splits())
def test_any_split_into_feeds_decodes_the_same_and_ends_at_the_same_place(
    case: tuple[list[bytes], bytes, bytes, list[int]],
) -> None:
    parts, wire, after, cuts = case
    end = len(wire) - len(after)
    decoder = ChunkedDecoder()
    body = b""
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        assert not decoder.ended
        body += b"".join(decoder.feed(wire[start:stop]))
        assert decoder.ended == (stop >= end)  # ended by the feed that holds its last byte
        if decoder.ended:
            rest = wire[stop:]
            break
    else:
        rest = b""
    assert body == b"".join(parts)
    assert decoder.trailing + rest == after


def test_every_split_of_one_body_into_two_and_three_feeds() -> None:
    wire = encoded([b"hello", b" ", b"world"], extension=b";e=1", trailer=b"x-t: 1\r\n")
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            body, decoder = decoded(wire[:i], wire[i:j], wire[j:])
            assert (body, decoder.ended, decoder.trailing) == (b"hello world", True, b"")


def test_what_follows_the_body_is_kept_up_to_the_framing_bound() -> None:
    """Enough to tell there was something after the body; never a buffer that grows with each feed."""
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\nmore")
    for _ in range(3):
        decoder.feed(b"x" * MAX_FRAMING_SIZE)
    assert decoder.trailing == (b"more" + b"x" * MAX_FRAMING_SIZE)[:MAX_FRAMING_SIZE]
