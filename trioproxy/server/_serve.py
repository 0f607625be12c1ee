"""
Serving the app with hypercorn's trio worker: the one place that touches hypercorn.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._config import Config
from .._router import Router
from ._app import create_app

__all__ = ["WEBSOCKET_PING_INTERVAL", "serve"]

WEBSOCKET_PING_INTERVAL: Final = 20.0
"""Seconds between the server's WebSocket pings."""

logger = logging.getLogger("trioproxy.server")


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    router: Router | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Serve the proxy until cancelled. Reports the bound URLs through `task_status`, so
    `await nursery.start(serve, config, port=0)` returns once it accepts connections.
    When `shutdown_trigger` returns, the server stops accepting and lets in-flight requests
    finish (hypercorn's graceful shutdown).
    """
    app = create_app(config, router=router)
    hypercorn_config = HypercornConfig()
    hypercorn_config.bind = [f"{host or config.server.host}:{config.server.port if port is None else port}"]
    hypercorn_config.accesslog = None
    hypercorn_config.errorlog = logger
    hypercorn_config.keep_alive_timeout = 75  # longer than common load balancers' idle timeout
    # hypercorn's default backlog (100) overflows when hundreds of clients connect at once, and
    # each refused SYN costs that client a one-second retransmit.
    hypercorn_config.backlog = 4096
    # WebSocket pings keep idle connections (and the load balancers in between) alive; the
    # streams themselves send no keep-alive events. See `_websocket.py` for dead peers.
    hypercorn_config.websocket_ping_interval = WEBSOCKET_PING_INTERVAL
    for warning in config.warnings:
        logger.warning("%s", warning)
    await hypercorn_serve(
        app, hypercorn_config, shutdown_trigger=shutdown_trigger, task_status=task_status, mode="asgi"
    )
