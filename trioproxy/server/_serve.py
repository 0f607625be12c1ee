"""
Serving the app with hypercorn's trio worker: the one place that touches hypercorn.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import h11
import hypercorn.protocol
import hypercorn.trio.run
import orjson
import trio
from h11._writers import ChunkedWriter
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer

from .._config import Config
from .._exceptions import RequestError
from .._router import Router
from ._app import create_app
from ._core import BODY_LANE
from ._openai_front import error_body
from ._shutdown import GracefulShutdown

__all__ = ["WEBSOCKET_PING_INTERVAL", "listening_socket", "serve"]

WEBSOCKET_PING_INTERVAL: Final = 20.0
"""Seconds between the server's WebSocket pings."""
BACKLOG: Final = 4096
"""
Connections the kernel queues before they are accepted. hypercorn's default (100) overflows
when hundreds of clients connect at once, and each refused SYN costs that client a one-second
retransmit.
"""

logger = logging.getLogger("trioproxy.server")


class _HypercornConfig(HypercornConfig):
    """
    hypercorn's config, with listening sockets whose connections give up on a peer that
    leaves our writes unacknowledged for `write_timeout` (TCP_USER_TIMEOUT, inherited by every
    accepted socket). hypercorn writes in a shielded scope with no deadline, so without this a
    client that stops reading would pin its connection's task, stream and upstream forever;
    with it the write fails, the stream ends and its upstream is cancelled. It also drops a
    WebSocket peer that vanished: the server's pings go unacknowledged.
    """

    def __init__(self, *, write_timeout: float) -> None:
        super().__init__()
        self._write_timeout_ms = max(1, round(write_timeout * 1000))

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self._write_timeout_ms)
        return sockets


class _H11ConnectionThatRefusesAmbiguousFraming(h11.Connection):
    """
    h11's server side, refusing the requests RFC 9112 says a server must not guess about.

    h11 frames a request that carries both `Content-Length` and `Transfer-Encoding` by the
    latter. A front proxy that frames it by the former forwards as one request what we read as
    two, the second hidden in the first one's body and served on the same connection (§6.3:
    such a request is refused, and its connection closed). h11 also takes any `HTTP/d.d`
    request line for HTTP/1.1, and `Transfer-Encoding` in an HTTP/1.0 request, which has no
    chunked framing (§6.1). Each is a `RemoteProtocolError` here, as h11's own refusals are:
    hypercorn answers it and closes the connection, and the app never sees the request.
    `refusal` keeps the reason for the answer.
    """

    refusal: str | None = None

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                _check_framing(event)
        except h11.RemoteProtocolError as exc:
            self.refusal = str(exc)
            raise
        return event


def _check_framing(request: h11.Request) -> None:
    """Raise `RemoteProtocolError` for a request whose version or framing we do not serve."""
    h2_preface = (request.method, request.target, request.http_version) == (b"PRI", b"*", b"2.0")  # hypercorn's switch
    if request.http_version not in (b"1.0", b"1.1") and not h2_preface:
        raise h11.RemoteProtocolError(
            f"HTTP/{request.http_version.decode()} is not supported: this server speaks HTTP/1.0 and HTTP/1.1 "
            "(and HTTP/2)",
            error_status_hint=505,
        )
    names = {name for name, _ in request.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        raise h11.RemoteProtocolError(
            "a request may not carry both Content-Length and Transfer-Encoding (RFC 9112, section 6.3)"
        )
    if b"transfer-encoding" in names and request.http_version == b"1.0":
        raise h11.RemoteProtocolError("Transfer-Encoding is not HTTP/1.0 framing (RFC 9112, section 6.1)")


class _H11ProtocolThatRefusesAmbiguousFraming(H11Protocol):
    """hypercorn's HTTP/1.1 protocol over `_H11ConnectionThatRefusesAmbiguousFraming`, whose refusals say why."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection = _H11ConnectionThatRefusesAmbiguousFraming(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )

    async def _send_error_response(self, status_code: int) -> None:
        """hypercorn's refusal (the connection then closes), with OpenAI's error object naming the reason."""
        connection = self.connection
        refusal = connection.refusal if isinstance(connection, _H11ConnectionThatRefusesAmbiguousFraming) else None
        refusal = refusal or "the request is not valid HTTP/1.1"
        body = orjson.dumps(error_body(RequestError(refusal)))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    async def _create_stream(self, request: h11.Request) -> None:
        """hypercorn's, and each HTTP request's scope offers the app a `_ChunkedBodyLane` to its response."""
        await super()._create_stream(request)
        # Nothing above let the app's task run (it is only scheduled): it finds the lane there.
        stream, server = self.stream, getattr(self.send, "__self__", None)
        if isinstance(stream, HTTPStream) and isinstance(server, _TCPServerThatEndsWithItsClient) and not stream.closed:
            extensions = cast(dict[str, object], stream.scope["extensions"])  # hypercorn types it for its own
            extensions[BODY_LANE] = _ChunkedBodyLane(self, stream, server)


class _ChunkedBodyLane:
    """
    A way for a streamed response's body to bypass hypercorn and h11 once its head is written:
    a chunk framed here (`h11` frames it the same way) and written straight to the socket with
    one non-blocking `send`. Through the ASGI `send`, each token crossed the app's wrappers,
    hypercorn's stream and protocol, an h11 `Data` event and its writer: two thirds of the
    write path's CPU, the other third being the `send` itself.

    It takes a chunk only while nothing can tell the difference: the connection is this
    request's, h11 is writing its body in chunked framing (not HTTP/1.0, not a fixed length),
    the socket is plain TCP, and no write of hypercorn's is under way (its lock is free), so
    nothing is reordered. Otherwise `write` returns `None` and the chunk goes the ASGI way;
    the end of the body always does, so h11 writes the last chunk and counts the response
    done as before.
    """

    __slots__ = ("_protocol", "_server", "_stream")

    def __init__(self, protocol: H11Protocol, stream: HTTPStream, server: _TCPServerThatEndsWithItsClient) -> None:
        self._protocol = protocol
        self._stream = stream
        self._server = server

    def write(self, data: bytes) -> bytes | None:
        """
        Write `data` as one chunk. `None`: not taken, nothing written (send it the ASGI way).
        Else what the socket did not take at once, to be written with `write_rest` before
        anything else: `b""` when it took it all.
        """
        protocol = self._protocol
        connection = protocol.connection
        if (
            protocol.stream is not self._stream
            or self._stream.closed
            or not isinstance(connection, h11.Connection)
            or connection.our_state is not h11.SEND_BODY
            or type(connection._writer) is not ChunkedWriter
        ):
            return None
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        sent = self._server.write_now(frame)
        return None if sent is None else frame[sent:]

    async def write_rest(self, rest: bytes) -> None:
        """What `write` left, written hypercorn's way (its lock, its handling of a broken socket)."""
        await self._server.protocol_send(RawData(data=rest))


class _TCPServerThatEndsWithItsClient(TCPServer):
    """
    hypercorn's connection, ended as soon as its client closes it between requests.

    hypercorn's own stops reading at the client's EOF, but the connection (its tasks, buffers
    and socket, left in CLOSE_WAIT) lives on until its keep-alive timer runs out: with
    `keep_alive_timeout` at 75 s, every connection a client had closed held ~9 KB for 75 s,
    and a benchmark that opens 200 connections a phase grew the proxy by 3-4 MB a phase.
    Once nothing more can arrive, the timer has nothing left to wait for.
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        """
        hypercorn's write, with a way round it for bytes the socket takes at once. hypercorn
        writes each chunk of a stream under its send lock, in a shielded cancel scope, through
        trio's `send_all`: a third of the proxy's CPU per token. A plain socket whose last write
        is over (the lock is free) usually takes a token's chunk whole, written here as a
        non-blocking `send`; what it does not take (a full buffer, a closed or broken socket)
        goes hypercorn's way, after what was sent, so nothing is reordered and every failure is
        handled as hypercorn handles it.
        """
        if isinstance(event, RawData) and (sent := self.write_now(event.data)) is not None:
            if sent == len(event.data):
                return
            event = RawData(data=event.data[sent:])
        await super().protocol_send(event)

    def write_now(self, data: bytes) -> int | None:
        """
        How much of `data` the socket took at once, written with one non-blocking `send`; `None`
        when that way is closed (not plain TCP, a write of hypercorn's under way, the socket
        shut for writing): nothing was written. What is left must go hypercorn's way next.
        """
        if self.send_lock.locked() or not isinstance(self.stream, trio.SocketStream):
            return None
        sock = self.stream.socket
        if sock.did_shutdown_SHUT_WR:
            return None
        try:
            return os.write(sock.fileno(), data)
        except OSError:  # EAGAIN: the buffer is full; else hypercorn's way meets the error again
            return 0


class _ConnectionsThatEnd:
    """
    The app as hypercorn sees it, with two hypercorn behaviours worked around so that a
    connection whose work is over really ends — above all during a graceful shutdown, which
    waits for every connection.

    1. The last message of each HTTP response is sent in a shielded scope (bounded by
       `write_timeout`). hypercorn recycles a kept-alive connection, or closes it when shutting
       down, from inside that last `send`, after telling the app `http.disconnect`; quart-trio
       cancels the request's task on that disconnect, and the cancel lands in the middle of
       hypercorn's bookkeeping. The connection then never gets its idle timer: it is neither
       closed after `keep_alive_timeout` nor at shutdown, and a client that keeps it open holds
       the process until hypercorn's `graceful_timeout`.
    2. While the server drains, an HTTP/1.1 WebSocket connection whose close handshake is
       over is ended at once. hypercorn's ping task only looks whether the socket is closed
       every `websocket_ping_interval`, and until it does the connection's task (and so the
       process) lives on, up to 20 s. The task group cancelled here is that one connection's
       (the app runs in it, next to the ping task); over HTTP/2 it would be the whole
       connection's, so that case is left alone.
    """

    def __init__(self, app: Any, *, shutdown: GracefulShutdown, timeout: float) -> None:
        self.app = app
        self.shutdown = shutdown
        self.timeout = timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_a_shielded_end(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(self.timeout, shield=True):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive, send_with_a_shielded_end)

    async def _websocket(self, scope: Any, receive: Any, send: Any) -> None:
        disconnected = False

        async def receive_noting_the_disconnect() -> Any:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "websocket.disconnect"
            return message

        await self.app(scope, receive_noting_the_disconnect, send)
        if not self.shutdown.draining or scope.get("http_version") not in ("1.0", "1.1"):
            return
        with trio.move_on_after(self.timeout):  # the peer answers the server's close
            while not disconnected:
                await receive_noting_the_disconnect()
        connection = trio.lowlevel.current_task().parent_nursery
        if disconnected and connection is not None:
            connection.cancel_scope.cancel()


def _hypercorn_config(config: Config, *, host: str | None, port: int | None) -> _HypercornConfig:
    hypercorn_config = _HypercornConfig(write_timeout=config.server.write_timeout)
    hypercorn_config.bind = [f"{host or config.server.host}:{config.server.port if port is None else port}"]
    return hypercorn_config


def listening_socket(config: Config, *, host: str | None = None, port: int | None = None) -> socket.socket:
    """
    The socket `serve` would listen on, listening already, and inheritable: the workers of
    `serve --workers` all accept from it (`serve(listen_fd=...)`).
    """
    (sock,) = _hypercorn_config(config, host=host, port=port).create_sockets().insecure_sockets
    sock.listen(BACKLOG)
    return sock


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    router: Router | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    listen_fd: int | None = None,
    tracer_provider: Any = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Serve the proxy until cancelled. Reports the bound URLs through `task_status`, so
    `await nursery.start(serve, config, port=0)` returns once it accepts connections.

    `listen_fd`, instead of `host` and `port`: a listening socket this process inherited, which
    other processes accept from too (a worker of `serve --workers`, `_workers.py`).

    Each return of `shutdown_trigger` is one request to stop (the CLI's returns once per
    SIGINT or SIGTERM). The first starts a graceful shutdown (`_shutdown.py`): no new
    connections, 503 for new requests, in-flight streams finish within
    `[server] shutdown_grace_period` or end with an in-stream error; then `serve` returns.
    A second ends the streams still running at once.

    `tracer_provider`: an OpenTelemetry `TracerProvider` to trace with, instead of the one
    `[tracing]` describes (`create_app`).
    """
    shutdown = GracefulShutdown(config.server.shutdown_grace_period)
    app = create_app(config, router=router, shutdown=shutdown, tracer_provider=tracer_provider)
    hypercorn_config = _hypercorn_config(config, host=host, port=port)
    if listen_fd is not None:
        hypercorn_config.bind = [f"fd://{listen_fd}"]
    hypercorn_config.accesslog = None
    hypercorn_config.errorlog = logger
    hypercorn_config.keep_alive_timeout = config.server.keep_alive_timeout
    hypercorn_config.backlog = BACKLOG
    # WebSocket pings keep idle connections (and the load balancers in between) alive; the
    # streams themselves send no keep-alive events. See `_websocket.py` for dead peers.
    hypercorn_config.websocket_ping_interval = WEBSOCKET_PING_INTERVAL
    # Messages up to twice `max_body_bytes` are read and refused with an `error` event (413);
    # hypercorn closes the connection (1009) on anything larger, unread.
    hypercorn_config.websocket_max_message_size = 2 * config.limits.max_body_bytes
    # hypercorn cancels the connections still open this long after the trigger. Ours end the
    # streams at the grace period; each client then gets `write_timeout` to take its last
    # bytes (the error saying why its stream ended), which the kernel bounds anyway.
    hypercorn_config.graceful_timeout = config.server.shutdown_grace_period + config.server.write_timeout
    for warning in config.warnings:
        logger.warning("%s", warning)
    hypercorn.trio.run.TCPServer = _TCPServerThatEndsWithItsClient  # type: ignore[attr-defined]  # not exported; its worker uses it
    hypercorn.protocol.H11Protocol = _H11ProtocolThatRefusesAmbiguousFraming  # type: ignore[attr-defined]  # not exported; it speaks it
    async with trio.open_nursery() as nursery:
        drain_trigger = None
        if shutdown_trigger is not None:

            async def drain_trigger() -> None:
                """hypercorn's trigger: stop accepting once the drain has begun (nothing new is admitted)."""
                await shutdown_trigger()
                await nursery.start(shutdown.drain, shutdown_trigger)

        await hypercorn_serve(
            _ConnectionsThatEnd(app, shutdown=shutdown, timeout=config.server.write_timeout),
            hypercorn_config,
            shutdown_trigger=drain_trigger,
            task_status=task_status,
            mode="asgi",
        )
        nursery.cancel_scope.cancel()  # every connection is closed: a drain still waiting has nothing left to do
