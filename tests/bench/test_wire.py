"""The runner ↔ load generator pipe: newline-framed JSON messages, however the bytes arrive."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioproxy._bench.stats import StreamRecord
from trioproxy._bench.wire import LineReader, PhaseResult, PhaseSpec, send_message


class Pieces(trio.abc.ReceiveStream):
    """A stream whose every read returns the next piece as it is, then end of stream."""

    def __init__(self, *pieces: bytes) -> None:
        self._pieces = list(pieces)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._pieces.pop(0) if self._pieces else b""

    async def aclose(self) -> None:
        pass


async def test_lines_split_across_reads_or_sharing_one_are_each_returned_once() -> None:
    reader = LineReader(Pieces(b'{"a"', b": 1}", b"\n{", b'"b": 2}\n{"c": 3}\n', b"unterminated"))
    assert [await reader.read_message() for _ in range(3)] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert await reader.readline() is None  # the unterminated last line is dropped
    with pytest.raises(EOFError):
        await reader.read_message()


async def test_a_phase_and_its_result_survive_the_pipe() -> None:
    send, receive = trio.testing.memory_stream_pair()
    reader = LineReader(receive)
    spec = PhaseSpec("http://127.0.0.1:1/v1", {"model": "m"}, "openai", 2, 3, 1, 16, 30.0)
    record = StreamRecord(None, 0.05, 0.4, [20_000], 2, 2, 0, 0, 0, {"p50": 1.0, "p99": 2.0, "max": 3.0})
    result = PhaseResult([record], wall_s=1.5, cpu_s=0.25)
    await send_message(send, spec.to_message())
    await send_message(send, result.to_message())
    assert PhaseSpec.from_message((await reader.read_message())["phase"]) == spec
    assert PhaseResult.from_message((await reader.read_message())["result"]) == result
