"""
The conversation between the runner and its load-generator process: JSON lines over pipes.

The load generator runs in its own process so that it has a core of its own and its work
never slows the runner (which reads /proc and talks to the other children meanwhile). A phase
is three messages, so the runner can read the proxy's CPU counters exactly around the
measured part:

    runner → loadgen   {"phase": PhaseSpec}        connect, run the warm-up round(s)
    loadgen → runner   {"ready": true}             runner reads the CPU counters
    runner → loadgen   {"go": true}                the measured rounds
    loadgen → runner   {"result": PhaseResult}     runner reads the CPU counters again
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
import trio

from .stats import StreamRecord

#: The longest message accepted: a result for thousands of streams with every gap is a few MB.
MAX_LINE = 512 * 1024 * 1024

Protocol = Literal["openai", "anthropic", "responses", "responses-ws", "ndjson"]


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: `concurrency` connections, each running `rounds` streams back to back."""

    #: `http://host:port/path`: the streaming endpoint.
    url: str
    #: The JSON request body.
    payload: dict[str, Any]
    #: `openai`: SSE `chat.completion.chunk`s; `anthropic`: SSE Messages events; `responses`:
    #: SSE Responses events; `responses-ws`: the same over a WebSocket, the payload sent as a
    #: `response.create` message; `ndjson`: trioproxy's generic events.
    protocol: Protocol
    concurrency: int
    rounds: int
    #: Unmeasured rounds first, so pools, caches and keep-alive connections are warm.
    warmup_rounds: int
    #: Tokens each stream must deliver (" tok0" … " tok{tokens-1}").
    tokens: int
    stream_timeout_s: float
    connect_timeout_s: float = 10.0
    #: Connection `i` of `n` starts its first stream `i * stagger_s / n` after the others' (0: all at once).
    stagger_s: float = 0.0

    def to_message(self) -> bytes:
        return orjson.dumps({"phase": self})

    @classmethod
    def from_message(cls, fields: dict[str, Any]) -> PhaseSpec:
        return cls(**fields)

    @property
    def deadline_s(self) -> float:
        """Bound on a whole phase: every round may take its full stream timeout, plus connecting."""
        return (self.rounds + self.warmup_rounds) * self.stream_timeout_s + 2 * (
            self.connect_timeout_s + self.stagger_s
        )


@dataclass(frozen=True)
class PhaseResult:
    """The measured rounds of a phase."""

    records: list[StreamRecord]
    #: From the first request sent to the last stream's end.
    wall_s: float
    #: The load generator's own CPU time (user + system) during the measured rounds.
    cpu_s: float

    def to_message(self) -> bytes:
        return orjson.dumps({"result": self})

    @classmethod
    def from_message(cls, fields: dict[str, Any]) -> PhaseResult:
        records = [StreamRecord(**record) for record in fields["records"]]
        return cls(records=records, wall_s=fields["wall_s"], cpu_s=fields["cpu_s"])


class LineReader:
    """Newline-terminated messages from a trio stream, each bounded by `MAX_LINE`."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream (a last unterminated line is dropped)."""
        scanned = 0  # bytes already searched for the newline: a long message is not searched again per read
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_LINE:
                raise ValueError(f"message longer than {MAX_LINE} bytes")
            scanned = len(self._buffer)
            data = await self._stream.receive_some(1024 * 1024)
            if not data:
                return None
            self._buffer += data

    async def read_message(self) -> dict[str, Any]:
        """The next JSON object; EOFError when the other side has gone."""
        line = await self.readline()
        if line is None:
            raise EOFError("the other process closed the pipe")
        message = orjson.loads(line)
        if not isinstance(message, dict):
            raise ValueError(f"expected a JSON object, got {line[:80]!r}")
        return message


async def send_message(stream: trio.abc.SendStream, message: bytes) -> None:
    """Write one message (already JSON) and its newline."""
    await stream.send_all(message + b"\n")
