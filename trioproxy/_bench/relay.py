"""
A relay of HTTP/1.1 on trio with nothing else in it: the floor under any proxy written on trio.

Each client connection gets one upstream connection of its own. A request goes upstream as its
bytes, and the response's bytes come back as they arrive, each read written at once; messages
are only framed (the harness's own parser, `http1`), never translated. No pool, limits,
metrics, timeouts or recovery: what is left is what every proxy on trio pays per token (a
`receive_some`, a `send_all` and trio's scheduler around them) and per request (reading and
writing two connections). `cpu_per_stream.py --reference trio-relay` measures it beside
trioproxy, so that the part of trioproxy's CPU and latency that is its own shows. It is a
measuring instrument, not a proxy: loopback only, and any framing error ends the connection.

    python -m trioproxy._bench.relay --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import functools
import re

import trio

from .http1 import Head, ProtocolError, find_head_end, parse_head

READ_SIZE = 65536


async def _head(stream: trio.SocketStream, pending: bytes) -> tuple[Head, bytes, bytes] | None:
    """
    The next message's head on `stream`, its bytes and the bytes read after it (`pending`: what
    was read past the last message); `None` at the stream's end.
    """
    buffer = pending
    while (end := find_head_end(buffer)) < 0:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return None
        buffer += data
    return parse_head(buffer[:end]), buffer[:end], buffer[end:]


async def _forward(head: Head, raw: bytes, rest: bytes, source: trio.SocketStream, sink: trio.SocketStream) -> bytes:
    """Write one message (its head, then its body as it is read) from `source` to `sink`; return the bytes after it."""
    body = head.response_body() if head.start[0].startswith(b"HTTP/") else head.request_body()
    await sink.send_all(raw)
    data = rest
    while not body.done:
        if not data:
            data = await source.receive_some(READ_SIZE)
        body.feed(data)  # `b""`, the connection's end, ends only a body read until then
        if body.trailing:
            data = data[: len(data) - len(body.trailing)]
        if data:
            await sink.send_all(data)
        data = b""
    return body.trailing


async def _serve_connection(host: str, port: int, client: trio.SocketStream) -> None:
    async with client:
        try:
            upstream = await trio.open_tcp_stream(host, port)
        except OSError:
            return
        async with upstream:
            pending = b""
            upstream_pending = b""
            try:
                while (request := await _head(client, pending)) is not None:
                    pending = await _forward(*request, client, upstream)
                    response = await _head(upstream, upstream_pending)
                    if response is None:
                        return
                    upstream_pending = await _forward(*response, upstream, client)
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the connection ends; the load generator counts what it lost


async def main(upstream: str, port: int) -> None:
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)?", upstream)
    if match is None:
        raise SystemExit(f"--upstream must be http://HOST:PORT, not {upstream!r}")
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    print(f"listening on http://127.0.0.1:{bound}", flush=True)  # the ready line, as the proxy's
    await trio.serve_listeners(functools.partial(_serve_connection, match.group(1), int(match.group(2))), listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, http://HOST:PORT")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    trio.run(main, arguments.upstream, arguments.port)
