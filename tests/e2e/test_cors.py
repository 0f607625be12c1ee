"""
CORS end to end, on real hypercorn with client keys on: a browser's preflight is answered
without a key, and every response an allowed origin gets — a stream, a 401 — carries the
headers that let its page read it; another origin's get none.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.conftest import serve_proxy
from trioproxy import SSEDecoder, StreamEvent, parse_config

SITE = "https://app.example.com"
KEY = "browser-key"
BODY = {"model": "sim/echo", "messages": [{"role": "user", "content": "hello cors"}]}


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> str:
    config = parse_config(
        {
            "auth": {"keys": [KEY]},
            "cors": {"allow_origins": [SITE, "http://localhost:5173"]},
            "providers": {"sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0}},
        },
        environ={},
    )
    return await serve_proxy(nursery, config)


def preflight_headers(origin: str) -> dict[str, str]:
    """What Chrome sends before the OpenAI JS SDK's `chat.completions.create`."""
    return {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-stainless-lang,x-stainless-retry-count",
    }


async def test_a_preflight_from_an_allowed_origin_needs_no_key(proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.options(proxy + "/v1/chat/completions", headers=preflight_headers(SITE))
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == SITE
    assert response.headers["access-control-allow-methods"] == "GET, POST, PUT, PATCH, DELETE"
    allowed = response.headers["access-control-allow-headers"].split(", ")
    assert allowed == ["authorization", "content-type", "x-stainless-lang", "x-stainless-retry-count"]
    assert response.headers["vary"] == "Origin"
    assert int(response.headers["access-control-max-age"]) == 600


async def test_a_page_may_delete_a_stored_response(proxy: str) -> None:
    """The openai SDK's `responses.delete` from a page: the browser first asks whether DELETE is allowed."""
    headers = {"origin": SITE, "authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient() as http:
        created = await http.post(proxy + "/v1/responses", json={"model": "sim/echo", "input": "hi"}, headers=headers)
        url = f"{proxy}/v1/responses/{created.json()['id']}"
        asked = {**preflight_headers(SITE), "access-control-request-method": "DELETE"}
        preflight = await http.options(url, headers=asked)
        deleted = await http.delete(url, headers=headers)
    assert preflight.status_code == 204
    assert "DELETE" in preflight.headers["access-control-allow-methods"].split(", ")
    assert deleted.status_code == 200
    assert deleted.headers["access-control-allow-origin"] == SITE


async def test_a_preflight_from_another_origin_is_refused(proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.options(
            proxy + "/v1/chat/completions", headers=preflight_headers("https://evil.example.com")
        )
    assert response.status_code == 403
    assert not [name for name in response.headers if name.startswith("access-control-")]


async def test_a_stream_carries_the_headers_for_its_origin_only(proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        for origin, allowed in ((SITE, True), ("https://evil.example.com", False)):
            headers = {"origin": origin, "authorization": f"Bearer {KEY}"}
            async with http.stream("POST", proxy + "/v1/chat/stream", json=BODY, headers=headers) as response:
                body = await response.aread()
            assert response.status_code == 200
            events = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(body)]
            assert "".join(e.data for e in events if e.type == "token") == "hello cors"
            assert response.headers["vary"] == "Origin"
            if allowed:
                assert response.headers["access-control-allow-origin"] == SITE
                exposed = response.headers["access-control-expose-headers"]
                assert exposed == "x-request-id, x-stream-id, retry-after"
                assert response.headers["x-request-id"]  # which the page may now read
            else:
                assert "access-control-allow-origin" not in response.headers


async def test_a_401_carries_the_headers_so_the_page_can_read_why(proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/chat/completions", json=BODY, headers={"origin": SITE})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["access-control-allow-origin"] == SITE
    assert response.headers["www-authenticate"] == "Bearer"


async def test_without_cors_configured_no_headers_are_added(proxy_url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + "/v1/chat/completions", json=BODY, headers={"origin": SITE})
        preflight = await http.options(proxy_url + "/v1/chat/completions", headers=preflight_headers(SITE))
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "vary" not in response.headers
    assert "access-control-allow-origin" not in preflight.headers
