"""
The WebSocket endpoints: `/v1/chat/ws` and `/v1/stream/ws/{client_id}`.

(Being built for issue 4: `register_websocket_routes` is called by `create_app`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart_trio import QuartTrio

__all__ = ["register_websocket_routes"]


def register_websocket_routes(app: QuartTrio, *, start: Callable[..., Any], router: Any) -> None:
    """Add the WebSocket routes to `app`; `start(pipeline, chat)` starts a session."""
