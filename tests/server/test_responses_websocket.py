"""
The WebSocket mode of the Responses front, driven through ASGI on trio's autojump clock (quart's
test client: no sockets, so that `write_timeout` passes on the mock clock).
"""

from __future__ import annotations

import logging

import orjson
import pytest
import trio

from trioproxy import parse_config
from trioproxy.server import create_app


async def test_a_peer_that_stops_reading_is_dropped_with_a_warning(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The test client's queue holds 10 frames: a longer answer that nobody reads stalls the writes."""
    config = parse_config(
        {
            "server": {"write_timeout": 5},
            "providers": {"sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0}},
        },
        environ={},
    )
    app = create_app(config)
    create = {"type": "response.create", "model": "sim/lorem", "input": "Hi", "max_output_tokens": 200}
    async with app.test_app(), app.test_client().websocket("/v1/responses") as peer:
        await peer.send(orjson.dumps(create).decode())
        await trio.sleep(2 * config.server.write_timeout)  # the mock clock's: the stalled write times out
    assert "dropping a WebSocket peer that stopped reading" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
