"""
The load generator: a process of its own that drives many streams and times every token.

Why not httpx or the openai SDK: at hundreds of concurrent streams their per-chunk cost would
make the client, not the proxy, the bottleneck, and the figures would describe the client. This
is a minimal HTTP/1.1 client on trio sockets with `h11`: one keep-alive connection per
concurrent stream (opened before the clock starts, as a client's pool would be), SSE parsed
with trioproxy's own `SSEDecoder`, and each token stamped with the time its bytes came off the
socket.

Every stream is bounded by its `stream_timeout_s`, every phase by `PhaseSpec.deadline_s`.

Run as `python -m trioproxy._bench.loadgen`; it speaks the protocol in `wire`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson
import trio

from .._sse import SSEDecodeError, SSEDecoder
from .stats import StreamRecord, check_tokens, gaps
from .wire import LineReader, PhaseResult, PhaseSpec, send_message

#: Bytes asked of the kernel per read.
RECEIVE_SIZE = 64 * 1024
#: An error response's body is kept up to this many bytes, for the error message.
MAX_ERROR_BODY = 2048
#: Longest NDJSON line accepted (as `SSEDecoder`'s default line bound): a longer one is malformed.
MAX_NDJSON_LINE = 1024 * 1024
#: Connections opened at once: a burst of thousands of SYNs would overflow a listen backlog.
CONNECT_PARALLELISM = 64


@dataclass(frozen=True)
class _Endpoint:
    """Where and what to send: the same request for every stream of a phase."""

    host: str
    port: int
    target: str
    body: bytes
    accept: str

    @classmethod
    def from_spec(cls, spec: PhaseSpec) -> _Endpoint:
        parts = urlsplit(spec.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the load generator speaks plain http:// only, not {spec.url!r}")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        accept = "text/event-stream" if spec.protocol == "openai" else "application/x-ndjson"
        return cls(parts.hostname, parts.port or 80, target, orjson.dumps(spec.payload), accept)

    def request(self) -> list[h11.Event]:
        headers = [
            ("host", f"{self.host}:{self.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(self.body))),
            ("accept", self.accept),
            # Proxies that insist on a key (LiteLLM's master key, say) get one to check.
            ("authorization", "Bearer sk-trioproxy-bench"),
        ]
        return [
            h11.Request(method="POST", target=self.target, headers=headers),
            h11.Data(data=self.body),
            h11.EndOfMessage(),
        ]


class _Connection:
    """One keep-alive HTTP/1.1 connection, reopened when it breaks or the server closes it."""

    def __init__(self, endpoint: _Endpoint, connect_timeout: float) -> None:
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self.stream: trio.SocketStream | None = None
        self.h11 = h11.Connection(h11.CLIENT)
        #: A request has been sent on this connection: the server may since have closed it.
        self.used = False

    async def open(self) -> trio.SocketStream:
        if self.stream is None:
            with trio.fail_after(self._connect_timeout):
                self.stream = await trio.open_tcp_stream(self._endpoint.host, self._endpoint.port)
            self.h11 = h11.Connection(h11.CLIENT)
            self.used = False
        return self.stream

    async def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await trio.aclose_forcefully(stream)


class _MalformedStream(Exception):
    """What the server sent is not the protocol the stream asked for."""


class _StaleConnection(Exception):
    """A kept-alive connection was closed by the server before this request: resend it on a new one."""


class _Body:
    """What one stream's response delivered, whatever the protocol."""

    def __init__(self) -> None:
        self.sent_at = 0.0
        self.ended_at: float | None = None
        self.status: int | None = None
        self.pieces: list[tuple[str, float]] = []
        self.done = False
        self.error: str | None = None
        self.buffer_latency: dict[str, float] | None = None
        self._error_body = bytearray()

    def feed(self, data: bytes, now: float) -> None:
        if self.status != 200:
            self._error_body += data[: MAX_ERROR_BODY - len(self._error_body)]
        else:
            self.parse(data, now)

    def parse(self, data: bytes, now: float) -> None:
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        self.error = self.error or reason

    def record(self, expected_tokens: int) -> StreamRecord:
        check = check_tokens(self.pieces, expected_tokens)
        error = self.error
        if error is None and self.status != 200:
            error = f"HTTP {self.status}: {self._error_body.decode('utf-8', 'replace')[:200]}"
        elif error is None and not self.done:
            error = "the stream ended without its end marker"
        elif error is None and check.unexpected:
            error = "unexpected text in the stream"
        complete = error is None
        return StreamRecord(
            error=error,
            ttft_s=check.arrivals[0] - self.sent_at if check.arrivals else None,
            duration_s=self.ended_at - self.sent_at if self.ended_at is not None else None,
            gaps_us=[round(gap * 1e6) for gap in gaps(check.arrivals)],
            tokens=len(check.indices),
            chunks=len(self.pieces),
            lost=check.lost if complete else 0,
            duplicated=check.duplicated if complete else 0,
            reordered=check.reordered if complete else 0,
            buffer_latency_ms=self.buffer_latency,
        )


class _OpenAIBody(_Body):
    """`chat.completion.chunk`s over SSE, ended by `data: [DONE]`."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = SSEDecoder()

    def parse(self, data: bytes, now: float) -> None:
        for event in self._decoder.feed(data):
            if event.data == "[DONE]":
                self.done = True
                continue
            chunk = orjson.loads(event.data)
            if "error" in chunk:
                self.fail(f"in-stream error: {str(chunk['error'])[:200]}")
                continue
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    self.pieces.append((content, now))


class _NDJSONBody(_Body):
    """trioproxy's generic events, one JSON object a line, ended by a `done` event."""

    def __init__(self) -> None:
        super().__init__()
        self._partial = b""

    def parse(self, data: bytes, now: float) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._event(orjson.loads(line), now)
        if len(self._partial) > MAX_NDJSON_LINE:
            raise _MalformedStream(f"an NDJSON line longer than {MAX_NDJSON_LINE} bytes")

    def _event(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("type")
        if kind in ("token", "chunk"):
            self.pieces.append((event["data"], now))
        elif kind == "done":
            self.done = True
            self.buffer_latency = event.get("metadata", {}).get("buffer_latency_ms")
        elif kind == "error":
            self.fail(f"in-stream error: {str(event.get('data'))[:200]}")


def _new_body(spec: PhaseSpec) -> _Body:
    return _OpenAIBody() if spec.protocol == "openai" else _NDJSONBody()


async def _exchange(connection: _Connection, endpoint: _Endpoint, body: _Body) -> None:
    """Send the request and read the whole response into `body`, stamping each read."""
    stream = await connection.open()
    reused, connection.used = connection.used, True
    protocol = connection.h11
    request = b"".join(protocol.send(event) or b"" for event in endpoint.request())
    body.sent_at = now = time.perf_counter()
    try:
        await stream.send_all(request)
    except trio.BrokenResourceError:
        if reused:
            raise _StaleConnection from None
        raise
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError:
                data = b""
            now = time.perf_counter()
            if not data and reused and body.status is None:
                raise _StaleConnection
            protocol.receive_data(data)
        elif isinstance(event, h11.Response):
            body.status = event.status_code
        elif isinstance(event, h11.Data):
            body.feed(event.data, now)
        elif isinstance(event, h11.EndOfMessage):
            body.ended_at = now
            break
    if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
        protocol.start_next_cycle()
    else:
        await connection.close()


async def _run_stream(connection: _Connection, endpoint: _Endpoint, spec: PhaseSpec) -> StreamRecord:
    """One stream, start to end, within its timeout; every failure ends up in the record."""
    body = _new_body(spec)
    with trio.move_on_after(spec.stream_timeout_s) as scope:
        try:
            try:
                await _exchange(connection, endpoint, body)
            except _StaleConnection:
                await connection.close()
                body = _new_body(spec)
                await _exchange(connection, endpoint, body)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError, _StaleConnection) as exc:
            body.fail(f"connection: {type(exc).__name__}: {exc}"[:200])
        except (_MalformedStream, orjson.JSONDecodeError, SSEDecodeError, AttributeError, KeyError, TypeError) as exc:
            body.fail(f"malformed stream: {type(exc).__name__}: {exc}"[:200])
    if scope.cancelled_caught:
        body.fail(f"no end within the stream timeout ({spec.stream_timeout_s:g} s)")
    if body.error is not None:
        await connection.close()
    return body.record(spec.tokens)


async def _connect_all(connections: list[_Connection]) -> None:
    """Open every connection, a bounded number at a time; a failure leaves that one closed (retried per stream)."""
    limiter = trio.CapacityLimiter(CONNECT_PARALLELISM)

    async def connect(connection: _Connection) -> None:
        # A failure is not fatal here: its streams will try again and record the failure.
        async with limiter:
            with contextlib.suppress(OSError, trio.TooSlowError):
                await connection.open()

    async with trio.open_nursery() as nursery:
        for connection in connections:
            nursery.start_soon(connect, connection)


async def _run_rounds(
    connections: list[_Connection], endpoint: _Endpoint, spec: PhaseSpec, rounds: int, records: list[StreamRecord]
) -> None:
    """Every connection runs `rounds` streams back to back; they start together, or staggered (`stagger_s`)."""

    async def drive(connection: _Connection, start_after: float) -> None:
        await trio.sleep(start_after)
        for _ in range(rounds):
            records.append(await _run_stream(connection, endpoint, spec))

    async with trio.open_nursery() as nursery:
        for index, connection in enumerate(connections):
            nursery.start_soon(drive, connection, spec.stagger_s * index / len(connections))


async def run_phase(spec: PhaseSpec, wait_for_go: Callable[[], Awaitable[None]]) -> PhaseResult:
    """
    Connect, warm up, wait for `wait_for_go`, then run and time the measured rounds.

    Streams still running at the phase deadline leave no record; the runner counts them as
    errors from the number expected.
    """
    endpoint = _Endpoint.from_spec(spec)
    connections = [_Connection(endpoint, spec.connect_timeout_s) for _ in range(spec.concurrency)]
    try:
        with trio.move_on_after(spec.deadline_s):
            await _connect_all(connections)
            await _run_rounds(connections, endpoint, spec, spec.warmup_rounds, [])
        await wait_for_go()
        records: list[StreamRecord] = []
        cpu_before, started = time.process_time(), time.perf_counter()
        with trio.move_on_after(spec.deadline_s):
            await _run_rounds(connections, endpoint, spec, spec.rounds, records)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    finally:
        with trio.CancelScope(shield=True):
            for connection in connections:
                await connection.close()
    return PhaseResult(records=records, wall_s=wall, cpu_s=cpu)


async def serve_commands(stdin: trio.abc.ReceiveStream, stdout: trio.abc.SendStream) -> None:
    """Announce readiness, then run each phase the runner sends until it closes the pipe."""
    reader = LineReader(stdin)
    await send_message(stdout, b'{"loadgen": "ready"}')
    while True:
        try:
            message = await reader.read_message()
        except EOFError:
            return
        spec = PhaseSpec.from_message(message["phase"])

        async def wait_for_go() -> None:
            await send_message(stdout, b'{"ready": true}')
            if not (await reader.read_message()).get("go"):
                raise ValueError("expected {'go': true}")

        result = await run_phase(spec, wait_for_go)
        await send_message(stdout, result.to_message())


def main() -> None:
    """Entry point of the load-generator process: the protocol runs on its stdin and stdout."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    trio.run(serve_commands, stdin, stdout)


if __name__ == "__main__":
    main()
