"""
Tests for `trioproxy._sse`, the sans-IO SSE codec.

Every decoder case runs three ways (the `decode` fixture): the chunks as the case gives them,
the whole stream as one chunk, and one byte at a time. Chunk boundaries are where incremental
parsers break (a CRLF, a BOM or a multi-byte character split in two), and the byte-at-a-time run
puts a boundary everywhere. Expected values come from WHATWG HTML §9.2.6 and the WPT/
eventsource-parser cases listed in `/work/shared/sse_protocol.md`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from trioproxy._sse import (
    ServerSentEvent,
    SSEDecodeError,
    SSEDecoder,
    encode_comment,
    encode_event,
    encode_typed_event,
)

Decode = Callable[..., tuple[list[ServerSentEvent], SSEDecoder]]


def decode_all(
    chunks: Sequence[bytes], *, max_line_size: int | None = None, max_event_size: int | None = None
) -> tuple[list[ServerSentEvent], SSEDecoder]:
    """Feed `chunks` to a fresh decoder, close it, and return every event plus the decoder."""
    limits: dict[str, int] = {}
    if max_line_size is not None:
        limits["max_line_size"] = max_line_size
    if max_event_size is not None:
        limits["max_event_size"] = max_event_size
    decoder = SSEDecoder(**limits)
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events, decoder


def _as_given(chunks: Sequence[bytes]) -> list[bytes]:
    return list(chunks)


def _one_chunk(chunks: Sequence[bytes]) -> list[bytes]:
    return [b"".join(chunks)]


def _byte_by_byte(chunks: Sequence[bytes]) -> list[bytes]:
    whole = b"".join(chunks)
    return [whole[i : i + 1] for i in range(len(whole))]


STRATEGIES: dict[str, Callable[[Sequence[bytes]], list[bytes]]] = {
    "as_given": _as_given,
    "one_chunk": _one_chunk,
    "byte_by_byte": _byte_by_byte,
}


@pytest.fixture(params=list(STRATEGIES))
def decode(request: pytest.FixtureRequest) -> Decode:
    """`decode(*chunks, **limits)`: `decode_all` with the chunks re-cut by one strategy."""
    split = STRATEGIES[request.param]

    def run(*chunks: bytes, **limits: int) -> tuple[list[ServerSentEvent], SSEDecoder]:
        return decode_all(split(chunks), **limits)

    return run


def datas(events: list[ServerSentEvent]) -> list[str]:
    return [e.data for e in events]


# --------------------------------------------------------------------------------------------
# BOM and character decoding


def test_bom_stripped_once(decode: Decode) -> None:
    events, _ = decode(b"\xef\xbb\xbfdata: 1\n\n", b"data: 2\n\n")
    assert events == [ServerSentEvent("1"), ServerSentEvent("2")]


def test_second_bom_poisons_first_field(decode: Decode) -> None:
    # WPT format-bom-2: the second U+FEFF is part of the field name "\ufeffdata".
    events, _ = decode(b"\xef\xbb\xbf\xef\xbb\xbfdata:1\n\ndata:2\n\ndata:3\n\n")
    assert datas(events) == ["2", "3"]


def test_bom_split_across_chunks(decode: Decode) -> None:
    events, _ = decode(b"\xef", b"\xbb", b"\xbfdata: 1\n\n")
    assert datas(events) == ["1"]


def test_bom_only_at_stream_start_not_chunk_start(decode: Decode) -> None:
    events, _ = decode(b"data: 1\n\n", b"\xef\xbb\xbfdata: 2\n\n", b"data: 3\n\n")
    assert datas(events) == ["1", "3"]


def test_bom_prefix_that_is_not_a_bom(decode: Decode) -> None:
    # EF BB followed by "d" is an invalid sequence: one U+FFFD, which poisons the field name.
    events, _ = decode(b"\xef\xbb", b"data: 1\n\ndata: 2\n\n")
    assert datas(events) == ["2"]


@pytest.mark.parametrize("bom", [b"\xff\xfe", b"\xfe\xff"], ids=["utf16le", "utf16be"])
def test_utf16_bom_becomes_replacement_and_poisons_field(decode: Decode, bom: bytes) -> None:
    events, _ = decode(bom + b"data:1\n\n", b"data:2\n\n")
    assert datas(events) == ["2"]


def test_utf16_bom_is_two_replacement_characters(decode: Decode) -> None:
    # Neither stripped nor dropped: a data line shows exactly what the bytes decode to.
    events, _ = decode(b"\n\xff\xfe\n\ndata:\xff\xfe\n\n")
    assert datas(events) == ["\ufffd\ufffd"]


def test_invalid_utf8_becomes_replacement_character(decode: Decode) -> None:
    events, _ = decode(b"data: a\xffb\xc3\n", b"event: e\x80\n\n")
    assert events == [ServerSentEvent("a\ufffdb\ufffd", event="e\ufffd")]


def test_multibyte_characters_split_across_chunks(decode: Decode) -> None:
    raw = "data: é€😀\n\n".encode()
    # Cut inside the 2-, 3- and 4-byte sequences.
    cuts = [7, 9, 11, 13, 15]
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert b"".join(chunks) == raw
    events, _ = decode(*chunks)
    assert datas(events) == ["é€😀"]


# --------------------------------------------------------------------------------------------
# Line endings


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_line_endings(decode: Decode, eol: bytes) -> None:
    body = b"data: a" + eol + b"data: b" + eol + eol + b"event: x" + eol + b"data: c" + eol + eol
    events, _ = decode(body)
    assert events == [ServerSentEvent("a\nb"), ServerSentEvent("c", event="x")]


def test_mixed_line_endings(decode: Decode) -> None:
    events, _ = decode(b"data: a\rdata: b\ndata: c\r\n\rdata: d\n\r\ndata: e\r\r")
    assert datas(events) == ["a\nb\nc", "d", "e"]


def test_crlf_split_across_chunks(decode: Decode) -> None:
    # The LF that finishes the CRLF must not become a blank line (which would dispatch "a").
    events, _ = decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert datas(events) == ["a\nb"]


def test_blank_cr_line_at_chunk_end(decode: Decode) -> None:
    events, _ = decode(b"data: 1\r\r", b"\ndata: 2\r\r", b"data: 3\r\r")
    assert datas(events) == ["1", "2", "3"]


def test_cr_at_chunk_end_dispatches_without_waiting() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\r") == []
    assert decoder.feed(b"\r") == [ServerSentEvent("1")]
    assert decoder.feed(b"\n") == []  # second half of the CRLF: no extra blank line
    assert decoder.feed(b"data: 2\r\r") == [ServerSentEvent("2")]


def test_comment_ending_in_bare_cr(decode: Decode) -> None:
    events, _ = decode(b": comment\r", b"data: x\r\r", b": c2\r", b"\ndata: y\n\n")
    assert datas(events) == ["x", "y"]


def test_only_cr_lf_end_lines(decode: Decode) -> None:
    value = "a\u2028b\u2029c\u0085d\x0be\x0cf\x1cg\x1dh\x1ei"
    events, _ = decode(f"data: {value}\n\n".encode())
    assert datas(events) == [value]


def test_wpt_comment_fest(decode: Decode) -> None:
    # WPT format-comments: comments between data lines, ending in CR, LF and CRLF, with NUL.
    long = b"x" * 2048
    body = b"data:1\r:\0\n:\r\ndata:2\n:" + long + b"\rdata:3\n:data:fail\r:" + long + b"\ndata:4\n\n"
    events, _ = decode(body[:10], body[10:2000], body[2000:])
    assert datas(events) == ["1\n2\n3\n4"]


# --------------------------------------------------------------------------------------------
# Lines and fields


def test_comments_are_ignored(decode: Decode) -> None:
    events, _ = decode(b": hello\0 world\n", b"data: x\n:\n\n", b": keep-alive\n\n")
    assert datas(events) == ["x"]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"data:x", "x"),
        (b"data: x", "x"),
        (b"data:  x", " x"),
        (b"data:\tx", "\tx"),
        (b"data: \tx", "\tx"),
        (b"data:x ", "x "),
        (b"data: a: b:c", "a: b:c"),
        (b"data:: x", ": x"),
    ],
)
def test_one_leading_space_removed(decode: Decode, line: bytes, value: str) -> None:
    events, _ = decode(line + b"\n\n")
    assert datas(events) == [value]


def test_one_leading_space_removed_for_other_fields(decode: Decode) -> None:
    events, _ = decode(b"event:  x\nid:  7\ndata\n\n")
    assert events == [ServerSentEvent("", event=" x", id=" 7")]


def test_field_without_colon_has_empty_value(decode: Decode) -> None:
    events, _ = decode(b"data\n\n", b"data\ndata\n\n")
    assert datas(events) == ["", "\n"]


def test_wpt_unknown_fields_and_parsing_fun(decode: Decode) -> None:
    events, _ = decode(b"data:test\n data\ndata\nfoobar:xxx\njustsometext\n:thisisacommentyay\ndata:test\n\n")
    assert datas(events) == ["test\n\ntest"]


@pytest.mark.parametrize(
    "line",
    [b"Data: x", b"DATA: x", b"data : x", b" data: x", b"data\0: x", b"\0data: x", b"\xef\xbb\xbfdata: x"],
)
def test_field_names_are_case_sensitive_and_literal(decode: Decode, line: bytes) -> None:
    # A leading "\n" keeps the stream-start BOM rule out of the BOM-prefixed case.
    events, _ = decode(b"\n" + line + b"\n\ndata: ok\n\n")
    assert datas(events) == ["ok"]


def test_multiple_data_lines_joined_with_lf(decode: Decode) -> None:
    events, _ = decode(b"data: a\n", b"data: b\ndata:\ndata: c\n\n")
    assert datas(events) == ["a\nb\n\nc"]


def test_empty_data_dispatches_empty_string(decode: Decode) -> None:
    events, _ = decode(b"data:\n\n", b"data: \n\n")
    assert events == [ServerSentEvent(""), ServerSentEvent("")]


def test_block_without_data_dispatches_nothing_and_clears_event_type(decode: Decode) -> None:
    events, _ = decode(b"event: x\n\n", b"data: y\n\n", b"event: ping\n\nevent:\ndata: z\n\n")
    assert events == [ServerSentEvent("y"), ServerSentEvent("z")]


def test_event_type_applies_to_one_event_only(decode: Decode) -> None:
    events, _ = decode(b"event: a\nevent: b\ndata: 1\n\ndata: 2\n\n")
    assert events == [ServerSentEvent("1", event="b"), ServerSentEvent("2")]


def test_blank_lines_alone_dispatch_nothing(decode: Decode) -> None:
    events, decoder = decode(b"\n\n\r\n\r\r\n")
    assert events == []
    assert decoder.last_event_id == ""


# --------------------------------------------------------------------------------------------
# id and retry


def test_id_persists_across_events_and_resets(decode: Decode) -> None:
    events, decoder = decode(b"id: 1\ndata: a\n\n", b"data: b\n\nid\ndata: c\n\nid: 2\ndata: d\n\nid:\ndata: e\n\n")
    assert [(e.data, e.id) for e in events] == [("a", "1"), ("b", "1"), ("c", ""), ("d", "2"), ("e", "")]
    assert decoder.last_event_id == ""


def test_id_committed_at_blank_line_even_without_data(decode: Decode) -> None:
    events, decoder = decode(b"id: 7\n\n", b": ping\n\n")
    assert events == []
    assert decoder.last_event_id == "7"


def test_id_containing_nul_is_ignored(decode: Decode) -> None:
    events, decoder = decode(b"id: 1\ndata: a\n\n", b"id: x\0y\ndata: b\n\n")
    assert [(e.data, e.id) for e in events] == [("a", "1"), ("b", "1")]
    assert decoder.last_event_id == "1"


def test_last_event_id_property_tracks_dispatch() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n")
    assert decoder.last_event_id == ""  # not yet committed
    decoder.feed(b"\n")
    assert decoder.last_event_id == "1"


@pytest.mark.parametrize(("value", "expected"), [(b"02000", 2000), (b"0", 0), (b"1000", 1000), (b"", None)])
def test_retry_ascii_digits(decode: Decode, value: bytes, expected: int | None) -> None:
    events, decoder = decode(b"retry: " + value + b"\ndata: x\n\n")
    assert decoder.retry == expected
    assert events == [ServerSentEvent("x", retry=expected)]


@pytest.mark.parametrize(
    "value",
    ["1000x", " 5", "5 ", "+5", "-5", "1_000", "\u0661\u0662", "\uff15", "1.5", "", "x"],
)
def test_retry_invalid_values_ignored(decode: Decode, value: str) -> None:
    events, decoder = decode(b"retry: 300\n\n", b"retry: " + value.encode() + b"\ndata: x\n\n")
    assert decoder.retry == 300
    assert events == [ServerSentEvent("x", retry=300)]


def test_retry_without_space_and_bare_retry(decode: Decode) -> None:
    events, decoder = decode(b"retry:15\ndata: a\n\nretry\ndata: b\n\n")
    assert [(e.data, e.retry) for e in events] == [("a", 15), ("b", 15)]
    assert decoder.retry == 15


# --------------------------------------------------------------------------------------------
# End of stream


def test_incomplete_event_at_eof_is_dropped(decode: Decode) -> None:
    events, decoder = decode(b"data: a\n\n", b"id: 9\ndata: b\n")
    assert datas(events) == ["a"]
    assert decoder.last_event_id == ""


def test_final_unterminated_line_is_dropped(decode: Decode) -> None:
    events, decoder = decode(b"id: 1\ndata: a\n\n", b"data: b\n\nid: 2")
    assert datas(events) == ["a", "b"]
    assert decoder.last_event_id == "1"


def test_wpt_data_before_final_empty_line(decode: Decode) -> None:
    # The message is never dispatched: the stream ends with a single LF after it.
    events, decoder = decode(b"retry:1000\nid:1\ndata:test\n")
    assert events == []
    assert decoder.last_event_id == ""


def test_close_returns_nothing_and_feed_after_close_fails() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [ServerSentEvent("a")]
    assert decoder.close() == []
    assert decoder.close() == []
    with pytest.raises(RuntimeError):
        decoder.feed(b"\n")


def test_empty_feed_is_not_eof() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [ServerSentEvent("a")]


def test_feed_accepts_bytearray_and_memoryview() -> None:
    decoder = SSEDecoder()
    # Typed as `bytes`, but a buffer from a socket read may well be one of these.
    assert decoder.feed(bytearray(b"data: a\n")) == []  # type: ignore[arg-type]
    assert decoder.feed(memoryview(b"\ndata: b\n\n")) == [  # type: ignore[arg-type]
        ServerSentEvent("a"),
        ServerSentEvent("b"),
    ]


# --------------------------------------------------------------------------------------------
# Bounds


def test_line_at_max_line_size_is_accepted(decode: Decode) -> None:
    line = b"data: " + b"x" * 14  # 20 characters
    events, _ = decode(line + b"\n\n", max_line_size=20)
    assert datas(events) == ["x" * 14]


def test_max_line_size_counts_characters_not_bytes(decode: Decode) -> None:
    line = "data: " + "€" * 14  # 20 characters, 48 bytes
    events, _ = decode(line.encode() + b"\n\n", max_line_size=20)
    assert datas(events) == ["€" * 14]


def test_bom_does_not_count_towards_first_line(decode: Decode) -> None:
    events, _ = decode(b"\xef\xbb\xbfdata: " + b"x" * 14 + b"\n\n", max_line_size=20)
    assert datas(events) == ["x" * 14]


def test_line_over_max_line_size_raises(decode: Decode) -> None:
    with pytest.raises(SSEDecodeError, match="line longer than 20"):
        decode(b"data: ok\n\n", b"data: " + b"x" * 15 + b"\n\n", max_line_size=20)


def test_comment_over_max_line_size_raises(decode: Decode) -> None:
    with pytest.raises(SSEDecodeError, match="line longer than 20"):
        decode(b": " + b"x" * 100 + b"\n", max_line_size=20)


def test_line_without_newline_raises_before_eof() -> None:
    # The bound must hold while the decoder is still waiting for a line end.
    decoder = SSEDecoder(max_line_size=1000)
    decoder.feed(b"data: " + b"x" * 994)
    with pytest.raises(SSEDecodeError, match="line longer than 1000"):
        decoder.feed(b"x")


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_endless_line_raises_for_every_chunk_size(chunk_size: int) -> None:
    decoder = SSEDecoder(max_line_size=10_000)
    chunk = b"y" * chunk_size

    def feed_100k() -> None:
        for _ in range(100_000 // chunk_size + 1):
            decoder.feed(chunk)

    with pytest.raises(SSEDecodeError, match="line longer than 10000"):
        feed_100k()


def test_endless_multibyte_line_raises() -> None:
    decoder = SSEDecoder(max_line_size=100)
    chunk = "😀".encode()
    for _ in range(100):
        assert decoder.feed(chunk) == []
    with pytest.raises(SSEDecodeError, match="line longer than 100 "):
        decoder.feed(chunk)  # the 101st character is the one too many


def test_unfinished_line_at_bound_does_not_raise() -> None:
    decoder = SSEDecoder(max_line_size=10)
    assert decoder.feed("data: éééé".encode()) == []  # 10 characters, 14 bytes
    assert decoder.feed(b"\n\n") == [ServerSentEvent("éééé")]


def test_event_at_max_event_size_is_accepted(decode: Decode) -> None:
    # The data buffer is "aaaa\nbbbb\n": 10 characters.
    events, _ = decode(b"data: aaaa\ndata: bbbb\n\n", max_event_size=10)
    assert datas(events) == ["aaaa\nbbbb"]


def test_event_over_max_event_size_raises(decode: Decode) -> None:
    with pytest.raises(SSEDecodeError, match="event data longer than 10 "):
        decode(b"data: aaaa\ndata: bbbb\ndata:\n\n", max_event_size=10)


def test_event_size_resets_after_each_event(decode: Decode) -> None:
    body = b"data: aaaa\ndata: bbbb\n\n" * 5
    events, _ = decode(body, max_event_size=10)
    assert datas(events) == ["aaaa\nbbbb"] * 5


def test_decoder_stays_failed_after_error() -> None:
    decoder = SSEDecoder(max_line_size=5)
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: toolong\n\n")
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: 1\n\n")


def test_sse_decode_error_is_value_error() -> None:
    assert issubclass(SSEDecodeError, ValueError)


@pytest.mark.parametrize("kwargs", [{"max_line_size": 0}, {"max_event_size": 0}])
def test_limits_must_be_positive(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        SSEDecoder(**kwargs)


# --------------------------------------------------------------------------------------------
# Recorded LLM streams

OPENAI_STREAM = (
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini",'
    b'"system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini",'
    b'"system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini",'
    b'"system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini",'
    b'"system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,'
    b'"total_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)


def _cut(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def test_openai_stream(decode: Decode) -> None:
    events, decoder = decode(*_cut(OPENAI_STREAM, 37))
    assert [e.event for e in events] == ["message"] * 5
    assert events[-1] == ServerSentEvent("[DONE]")
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {},
    ]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"] == []
    assert chunks[3]["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert decoder.last_event_id == ""
    assert decoder.retry is None


def test_openai_stream_with_crlf(decode: Decode) -> None:
    raw = OPENAI_STREAM.replace(b"\n", b"\r\n")
    events, _ = decode(*_cut(raw, 64))
    assert datas(events) == datas(decode_all([OPENAI_STREAM])[0])


# sse_protocol.md §5.2 (anthropic-sdk-python tests/lib/streaming/fixtures/basic_response.txt).
ANTHROPIC_STREAM = (Path(__file__).parent / "fixtures" / "anthropic" / "basic_response.sse").read_bytes()


def test_anthropic_stream(decode: Decode) -> None:
    events, _ = decode(*_cut(ANTHROPIC_STREAM, 53))
    assert [e.event for e in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(e.data) for e in events]
    assert [p["type"] for p in payloads] == [e.event for e in events]
    text = "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta")
    assert text == "Hello there!"
    assert payloads[7]["usage"] == {"output_tokens": 6}


def test_anthropic_stream_without_final_blank_line_loses_message_stop(decode: Decode) -> None:
    events, _ = decode(*_cut(ANTHROPIC_STREAM[:-1], 53))
    assert len(events) == 8
    assert events[-1].event == "message_delta"


# --------------------------------------------------------------------------------------------
# Differential check against a literal, character-by-character reading of §9.2.6


def reference_lines(text: str) -> list[str]:
    """The lines of `text`, each ended by CRLF, LF or CR; a final line without a line end is discarded (EOF)."""
    lines: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            lines.append("".join(current))
            current = []
            if ch == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
        else:
            current.append(ch)
        i += 1
    return lines


def reference_decode(raw: bytes) -> tuple[list[ServerSentEvent], str, int | None]:
    """
    The spec's algorithm done the slow, obvious way, on the whole stream at once.

    "utf-8-sig" is the UTF-8 decode algorithm: it strips one leading BOM and nothing else.
    """
    lines = reference_lines(raw.decode("utf-8-sig", "replace"))
    events: list[ServerSentEvent] = []
    data, event_type, id_buffer, last_id, retry = "", "", "", "", None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data == "":
                event_type = ""
                continue
            events.append(ServerSentEvent(data.removesuffix("\n"), event_type or "message", last_id, retry))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data += value + "\n"
        elif field == "event":
            event_type = value
        elif field == "id" and "\0" not in value:
            id_buffer = value
        elif field == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events, last_id, retry


_TOKENS = [
    b"data",
    b"data:",
    b"data: ",
    b"event:",
    b"event: e",
    b"id:",
    b"id: 7",
    b"retry:",
    b"retry: 12",
    b":",
    b": c",
    b" ",
    b"x",
    b"1",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n",
    b"\n\n",
    b"\0",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\xc3",
    b"\xa9",
    "\u20ac".encode(),
    "\u2028".encode(),
    b"\x85",
]


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_on_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        raw = b"".join(rng.choice(_TOKENS) for _ in range(rng.randrange(1, 60)))
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randrange(0, 8)))) if len(raw) > 1 else []
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        expected_events, expected_id, expected_retry = reference_decode(raw)
        for strategy in STRATEGIES.values():
            events, decoder = decode_all(strategy(chunks))
            assert events == expected_events, raw
            assert decoder.last_event_id == expected_id, raw
            assert decoder.retry == expected_retry, raw


# --------------------------------------------------------------------------------------------
# Encoder


def test_encode_simple_event() -> None:
    assert encode_event("hello") == "data: hello\n\n"


def test_encode_field_order() -> None:
    assert encode_event("x", retry=5, id="7", event="e") == "event: e\nid: 7\nretry: 5\ndata: x\n\n"


def test_encode_empty_data() -> None:
    assert encode_event("") == "data: \n\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("foo\r\nbar\r\nxyz", "data: foo\ndata: bar\ndata: xyz\n\n"),
        ("a\rb\nc\r\nd", "data: a\ndata: b\ndata: c\ndata: d\n\n"),
        ("a\n", "data: a\ndata: \n\n"),
        ("\r\n\r", "data: \ndata: \ndata: \n\n"),
        ("a\u2028b\u0085c", "data: a\u2028b\u0085c\n\n"),
    ],
)
def test_encode_multiline_data(data: str, expected: str) -> None:
    assert encode_event(data) == expected


def test_encode_value_starting_with_space_keeps_it() -> None:
    encoded = encode_event(" x", event="e", id=" 1")
    assert encoded == "event: e\nid:  1\ndata:  x\n\n"
    events, decoder = decode_all([encoded.encode()])
    assert events == [ServerSentEvent(" x", event="e", id=" 1")]
    assert decoder.last_event_id == " 1"


def test_encode_without_data_requires_id_or_retry() -> None:
    assert encode_event(id="5") == "id: 5\n\n"
    assert encode_event(retry=100) == "retry: 100\n\n"
    assert encode_event(id="") == "id: \n\n"
    with pytest.raises(ValueError, match="needs data"):
        encode_event()
    with pytest.raises(ValueError, match="must have data"):
        encode_event(event="ping")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "a\nb"},
        {"event": "a\rb"},
        {"event": " lead"},
        {"id": "1\n2"},
        {"id": "1\r2"},
        {"id": "1\x002"},
        {"retry": -1},
        {"retry": 1.5},
        {"retry": "100"},
        {"retry": True},
    ],
)
def test_encode_rejects_what_a_decoder_would_misread(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"SSE (event name|id|retry) must"):
        encode_event("x", **kwargs)  # type: ignore[arg-type]


def test_encode_comment() -> None:
    assert encode_comment("keep-alive") == ": keep-alive\n\n"
    assert encode_comment() == ": \n\n"
    events, _ = decode_all([encode_comment("x: y").encode(), encode_event("after").encode()])
    assert events == [ServerSentEvent("after")]


def test_encode_typed_event_is_named_by_its_type_and_reads_back_as_its_payload() -> None:
    payload = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a\nb\r\n"}}
    encoded = encode_typed_event(payload)
    assert encoded.startswith(b"event: content_block_delta\ndata: {")
    events, _ = decode_all([encoded])
    assert [(event.event, json.loads(event.data)) for event in events] == [("content_block_delta", payload)]


@pytest.mark.parametrize("text", ["a\nb", "a\rb", "\r\n"])
def test_encode_comment_rejects_line_ends(text: str) -> None:
    with pytest.raises(ValueError, match="must not contain CR or LF"):
        encode_comment(text)


ROUND_TRIP_PAYLOADS = [
    "",
    "plain",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "\ttab",
    "a: b: c",
    ":starts with colon",
    "data: looks like a field",
    "event: fake\nid: fake\nretry: 1",
    "\n",
    "\n\n\n",
    "line1\nline2\n",
    "unicode é 中文 😀 \u2028 \u0085 \ufeff",
    "\ufeffbom first",
    "nul \x00 inside",
    '{"choices":[{"delta":{"content":"Hi"}}]}',
    "[DONE]",
]


@pytest.mark.parametrize("payload", ROUND_TRIP_PAYLOADS)
def test_round_trip(decode: Decode, payload: str) -> None:
    encoded = encode_event(payload, event="ev:1", id="id 1", retry=2500) + encode_event(payload)
    events, decoder = decode(*_cut(encoded.encode(), 5))
    assert events == [
        ServerSentEvent(payload, event="ev:1", id="id 1", retry=2500),
        ServerSentEvent(payload, event="message", id="id 1", retry=2500),
    ]
    assert decoder.last_event_id == "id 1"


def test_round_trip_normalises_cr_and_crlf(decode: Decode) -> None:
    events, _ = decode(encode_event("a\r\nb\rc\nd").encode())
    assert datas(events) == ["a\nb\nc\nd"]


def test_round_trip_stream_starting_with_bom_payload(decode: Decode) -> None:
    # A payload starting with U+FEFF is safe even as the first event: the BOM follows "data: ".
    events, _ = decode(encode_event("\ufeffx").encode())
    assert datas(events) == ["\ufeffx"]
