"""The WebSocket front's framing (sans-IO part): each event one JSON line tagged with its id."""

from __future__ import annotations

import orjson

from trioproxy import StreamEvent
from trioproxy.server._websocket import _tagged


def test_an_event_is_one_json_line_with_the_request_id() -> None:
    framed = _tagged(StreamEvent("token", "a\nb\r\nc"), "r1")
    assert framed.endswith(b"\n")
    assert framed.count(b"\n") == 1
    assert b"\r" not in framed
    assert orjson.loads(framed) == {"type": "token", "data": "a\nb\r\nc", "metadata": {}, "id": "r1"}


def test_client_id_goes_into_stream_start_only() -> None:
    start = StreamEvent("metadata", "stream_start", {"provider": "up"})
    assert orjson.loads(_tagged(start, 7, {"client_id": "alice"}))["metadata"] == {
        "provider": "up",
        "client_id": "alice",
    }
    token = StreamEvent("token", "x")
    assert "client_id" not in orjson.loads(_tagged(token, 7, {"client_id": "alice"}))["metadata"]


def test_an_error_about_no_request_has_no_id() -> None:
    assert "id" not in orjson.loads(_tagged(StreamEvent("error", {"message": "bad"}), None))
