"""
`CorsPolicy`'s header decisions, and `CorsMiddleware` around a stub ASGI app (the real app,
over real sockets, is in `tests/e2e/test_cors.py`).
"""

from __future__ import annotations

from typing import Any

from trioproxy._config import CorsConfig
from trioproxy.server._cors import CorsMiddleware, CorsPolicy

SITE = "https://app.example.com"


def headers_of(pairs: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name.decode(), []).append(value.decode())
    return out


def test_preflight_from_an_allowed_origin_lists_the_requested_headers_it_allows() -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=(SITE,), max_age=77))
    status, pairs = policy.preflight(SITE, "Authorization, content-type, X-Stainless-OS, x-evil")
    headers = headers_of(pairs)
    assert status == 204
    assert headers["access-control-allow-origin"] == [SITE]
    assert headers["vary"] == ["Origin"]
    assert headers["access-control-allow-methods"] == ["GET, POST, PUT, PATCH, DELETE"]
    assert headers["access-control-max-age"] == ["77"]
    # `x-stainless-*` covers the SDK's family; a header nobody allowed is left out, so the browser refuses it.
    assert headers["access-control-allow-headers"] == ["authorization, content-type, x-stainless-os"]
    assert "access-control-allow-credentials" not in headers


def test_preflight_from_another_origin_gets_no_cors_headers() -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=(SITE,)))
    status, pairs = policy.preflight("https://evil.example.com", "authorization")
    assert status == 403
    assert not [name for name, _ in pairs if name.startswith(b"access-control-")]


def test_origins_compare_case_insensitively_and_are_echoed() -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=(SITE,)))
    assert policy.allows("https://APP.example.com")
    assert not policy.allows("https://app.example.com:8443")
    assert not policy.allows("http://app.example.com")


def test_any_origin_answers_star_and_credentials_name_the_origin() -> None:
    star = headers_of(CorsPolicy(CorsConfig(allow_origins=("*",))).response_headers("https://x.test"))
    assert star["access-control-allow-origin"] == ["*"]
    named = CorsPolicy(CorsConfig(allow_origins=(SITE,), allow_credentials=True))
    headers = headers_of(named.response_headers(SITE))
    assert headers["access-control-allow-origin"] == [SITE]
    assert headers["access-control-allow-credentials"] == ["true"]


def test_a_lone_star_allows_any_requested_header() -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=(SITE,), allow_headers=("*",)))
    _, pairs = policy.preflight(SITE, "x-anything, authorization")
    assert headers_of(pairs)["access-control-allow-headers"] == ["x-anything, authorization"]


def test_actual_responses_expose_headers_to_allowed_origins_only() -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=(SITE,)))
    allowed = headers_of(policy.response_headers(SITE))
    assert allowed["access-control-allow-origin"] == [SITE]
    assert allowed["access-control-expose-headers"] == ["x-request-id, x-stream-id, retry-after"]
    assert allowed["vary"] == ["Origin"]
    for origin in ("https://evil.example.com", None):
        assert headers_of(policy.response_headers(origin)) == {"vary": ["Origin"]}


async def run(middleware: CorsMiddleware, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


def http_scope(method: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": headers}


async def test_the_middleware_answers_preflights_itself_and_decorates_every_response_start() -> None:
    calls: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope)
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    middleware = CorsMiddleware(app, CorsConfig(allow_origins=(SITE,)))
    preflight = await run(
        middleware,
        http_scope("OPTIONS", [(b"origin", SITE.encode()), (b"access-control-request-method", b"POST")]),
    )
    assert calls == []  # never reaches the app (and its key check)
    assert preflight[0]["status"] == 204

    sent = await run(middleware, http_scope("POST", [(b"origin", SITE.encode())]))
    assert len(calls) == 1
    start = headers_of(sent[0]["headers"])
    assert start["content-type"] == ["application/json"]
    assert start["access-control-allow-origin"] == [SITE]
    assert [m["body"] for m in sent[1:]] == [b"{}", b""]  # the body passes untouched

    # An OPTIONS that is not a preflight is the app's to answer.
    await run(middleware, http_scope("OPTIONS", [(b"origin", SITE.encode())]))
    assert len(calls) == 2


async def test_the_middleware_leaves_other_scopes_alone() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        await send({"type": "websocket.accept"})

    sent = await run(CorsMiddleware(app, CorsConfig(allow_origins=(SITE,))), {"type": "websocket", "headers": []})
    assert seen == ["websocket"]
    assert sent == [{"type": "websocket.accept"}]
