"""The proxy's client connections, seen from the process: what a closed connection leaves behind."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import h11
import trio

from tests.conftest import wait_until


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def get_health(stream: trio.SocketStream, host: str) -> int:
    """One keep-alive `GET /health` on `stream`; the response's status."""
    connection = h11.Connection(h11.CLIENT)
    await stream.send_all(connection.send(h11.Request(method="GET", target="/health", headers=[("host", host)])))
    await stream.send_all(connection.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status


async def test_a_connection_its_client_closed_between_requests_ends_at_once(proxy_url: str) -> None:
    """Not after `keep_alive_timeout` (75 s): its socket, tasks and buffers are freed now."""
    address = urlsplit(proxy_url)
    assert address.hostname is not None and address.port is not None
    clients = [await trio.open_tcp_stream(address.hostname, address.port) for _ in range(20)]
    for client in clients:
        assert await get_health(client, address.netloc) == 200
    with_server_ends = open_descriptors()  # both ends of each connection live in this process
    for client in clients:
        await client.aclose()

    await wait_until(lambda: open_descriptors() <= with_server_ends - 2 * len(clients))
