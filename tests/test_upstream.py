"""
The upstream layer's own pool (`_PooledTransport`), against `trioproxy.testing`'s fake
upstream on 127.0.0.1, port 0.
"""

from __future__ import annotations

import httpx
import trio

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
