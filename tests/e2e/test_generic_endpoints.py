"""
The generic event endpoints end to end: `POST /v1/chat/stream` and `/v1/stream/sse` (SSE of
`StreamEvent` JSON) and `/v1/chat/stream/json` (NDJSON), read with the project's own decoder.
"""

from __future__ import annotations

import httpx
import pytest

from trioproxy import SSEDecoder, StreamEvent
from trioproxy.testing import FakeUpstream, Reply

TOKENS = ("The", " quick", " brown", " fox")
MESSAGES = [{"role": "user", "content": "go"}]


async def post_events(url: str, body: dict) -> tuple[httpx.Response, list[StreamEvent]]:
    async with httpx.AsyncClient() as http:
        response = await http.post(url, json=body)
    if url.endswith("/json"):
        assert response.headers["content-type"].startswith("application/x-ndjson")
        events = [StreamEvent.from_json(line) for line in response.text.splitlines()]
    else:
        assert response.headers["content-type"].startswith("text/event-stream")
        decoder = SSEDecoder()
        events = [StreamEvent.from_json(e.data, id=e.id or None) for e in decoder.feed(response.content)]
    return response, events


PATHS = pytest.mark.parametrize("path", ["/v1/chat/stream", "/v1/stream/sse", "/v1/chat/stream/json"])


@PATHS
async def test_events_carry_the_upstreams_text(proxy_url: str, upstream: FakeUpstream, path: str) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(3, 4)))
    response, events = await post_events(
        proxy_url + path, {"provider": "up", "model": "m", "messages": MESSAGES, "max_tokens": 20}
    )

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"].startswith("req_")
    assert [e.type for e in events] == ["metadata"] + ["token"] * len(TOKENS) + ["done"]
    start = {"provider": "up", "model": "m", "request_id": response.headers["x-request-id"]}
    if path.endswith("/json"):  # NDJSON streams are not resumable: no stream id, no event ids
        assert events[0].metadata == start
        assert "x-stream-id" not in response.headers
        assert {e.id for e in events} == {None}
    else:
        assert events[0].metadata == {**start, "stream_id": response.headers["x-stream-id"]}
        assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert "".join(e.data for e in events if e.type == "token") == "".join(TOKENS)
    done = events[-1].metadata
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "estimated": False}
    assert done["characters"] == len("".join(TOKENS))
    assert upstream.requests[-1].json["max_tokens"] == 20


@PATHS
async def test_provider_may_come_as_the_models_prefix(proxy_url: str, upstream: FakeUpstream, path: str) -> None:
    upstream.push(Reply(tokens=TOKENS))
    _, events = await post_events(proxy_url + path, {"model": "claude/claude-x", "messages": MESSAGES})
    assert "".join(e.data for e in events if e.type == "token") == "".join(TOKENS)
    assert upstream.requests[-1].json["model"] == "claude-x"


@PATHS
async def test_unknown_provider_gives_an_error_event(proxy_url: str, path: str) -> None:
    response, events = await post_events(proxy_url + path, {"provider": "atlantis", "model": "m", "messages": MESSAGES})
    assert response.status_code == 404
    assert [e.type for e in events] == ["error"]
    assert "atlantis" in events[0].data["message"]
    assert events[0].data["status"] == 404


@PATHS
async def test_bad_body_gives_an_error_event_naming_the_field(proxy_url: str, path: str) -> None:
    response, events = await post_events(proxy_url + path, {"model": "sim/echo", "messages": "hello"})
    assert response.status_code == 400
    assert [e.type for e in events] == ["error"]
    assert "'messages'" in events[0].data["message"]


@PATHS
async def test_a_wrong_method_gives_an_error_event_and_the_allowed_one(proxy_url: str, path: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(proxy_url + path)
    assert response.status_code == 405
    assert "POST" in response.headers["allow"]
    if path.endswith("/json"):
        assert response.headers["content-type"].startswith("application/x-ndjson")
        [event] = [StreamEvent.from_json(line) for line in response.text.splitlines()]
    else:
        assert response.headers["content-type"].startswith("text/event-stream")
        [event] = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(response.content)]
    assert event.type == "error"
    assert event.data["status"] == 405


async def test_an_unknown_path_gets_openais_error_object(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + "/v1/no/such/route", json={})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@PATHS
async def test_mid_stream_failure_is_an_error_event_after_the_tokens(
    proxy_url: str, upstream: FakeUpstream, path: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, reset_after=2))
    response, events = await post_events(proxy_url + path, {"model": "up/m", "messages": MESSAGES})
    assert response.status_code == 200
    assert [e.type for e in events] == ["metadata", "token", "token", "error"]
    assert events[-1].data["characters_delivered"] == len("The quick")


async def test_simulated_echo_over_ndjson(proxy_url: str) -> None:
    _, events = await post_events(
        proxy_url + "/v1/chat/stream/json",
        {"provider": "sim", "model": "echo", "messages": [{"role": "user", "content": "repeat after me"}]},
    )
    assert [e.data for e in events if e.type == "token"] == ["repeat", " after", " me"]
    assert events[-1].type == "done"
