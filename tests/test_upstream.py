"""
The upstream layer's own pool (`_PooledTransport`), against `trioproxy.testing`'s fake
upstream on 127.0.0.1, port 0.
"""

from __future__ import annotations

import socket
import struct

import httpcore
import httpx
import pytest
import trio
import trio.testing

from trioproxy._upstream import _PooledTransport
from trioproxy.testing import Reply, open_fake_upstream

BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_response_that_ends_after_the_pool_closed_closes_its_connection(nursery: trio.Nursery) -> None:
    """It may not go back to the pool: nobody would ever close it there."""
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b")))
    transport = _PooledTransport(httpx.Limits(max_connections=4))
    released = []
    release = transport.release

    async def recording_release(connection: object, origin: object) -> None:
        released.append(connection)
        await release(connection, origin)  # type: ignore[arg-type]

    transport.release = recording_release  # type: ignore[method-assign]
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("POST", upstream.url + "/v1/chat/completions", json=BODY) as response:
            await transport.aclose()  # the server shuts down while the stream is in flight
            await response.aread()  # then the stream ends well, and its response closes
        [connection] = released
        assert transport._idle == {}
        assert connection.is_closed()  # type: ignore[attr-defined]


async def test_a_plain_socket_read_waits_for_data_and_maps_a_reset() -> None:
    from trioproxy._upstream import _read_when_readable

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    ours = trio.socket.socket()
    with listener, ours:
        await ours.connect(listener.getsockname())
        theirs, _ = await listener.accept()
        with theirs:
            async with trio.open_nursery() as nursery:

                async def send_once_it_waits() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    await theirs.send(b"data: x\n\n")

                nursery.start_soon(send_once_it_waits)
                assert await _read_when_readable(ours, 1024) == b"data: x\n\n"
            # Closed with SO_LINGER 0: the peer resets the connection.
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with pytest.raises(httpcore.ReadError):
            await _read_when_readable(ours, 1024)
