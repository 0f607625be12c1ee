"""
CORS, for browser apps that call the proxy directly (`[cors]`).

An ASGI wrapper around the app rather than quart hooks, for two reasons: a preflight must be
answered before the client-key check (browsers never send credentials with a preflight), and
every response must carry the headers — errors, refusals and streams alike — without any
route knowing about CORS. On a streamed response it touches only the start message.

A preflight from an allowed origin is answered 204 here, with the requested headers that
`allow_headers` covers (so patterns like `x-stainless-*` work, and `Authorization` is never
left to a `*` that browsers do not apply to it); one from any other origin gets 403 and no
CORS headers, which the browser reports as a CORS failure. WebSocket handshakes are not
subject to CORS and pass through; client keys protect them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from .._config import CorsConfig

__all__ = ["ALLOW_METHODS", "CorsMiddleware", "CorsPolicy"]

ALLOW_METHODS: Final = b"GET, POST, PUT, PATCH, DELETE"
"""Every method a route of the proxy takes: `DELETE /v1/responses/{id}`, and the forwarded paths' methods."""

Headers = list[tuple[bytes, bytes]]
ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class CorsPolicy:
    """The header decisions of `[cors]`, over plain strings and bytes. Sans-IO."""

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(config.allow_origins)
        self.exact_headers = frozenset(h for h in config.allow_headers if not h.endswith("*"))
        self.header_prefixes = tuple(h[:-1] for h in config.allow_headers if h.endswith("*"))
        self._expose = ", ".join(config.expose_headers).encode()

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins

    def allows_header(self, name: str) -> bool:
        name = name.strip().lower()
        return name in self.exact_headers or any(name.startswith(prefix) for prefix in self.header_prefixes)

    def _allow_origin(self, origin: str) -> Headers:
        # Without credentials, "*" answers any origin; with them the origin must be named.
        value = b"*" if self.any_origin and not self.config.allow_credentials else origin.encode("latin-1")
        headers = [(b"access-control-allow-origin", value)]
        if self.config.allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def preflight(self, origin: str, requested_headers: str) -> tuple[int, Headers]:
        """The status and headers answering a preflight from `origin`."""
        vary = [(b"vary", b"Origin")]
        if not self.allows(origin):
            return 403, [*vary, (b"content-type", b"text/plain; charset=utf-8")]
        allowed = [h.strip().lower() for h in requested_headers.split(",") if h.strip() and self.allows_header(h)]
        headers = [
            *self._allow_origin(origin),
            *vary,
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-max-age", str(self.config.max_age).encode()),
        ]
        if allowed:
            headers.append((b"access-control-allow-headers", ", ".join(allowed).encode("latin-1")))
        return 204, headers

    def response_headers(self, origin: str | None) -> Headers:
        """What an actual response gets: `Vary: Origin` always, the rest for an allowed origin only."""
        headers = [(b"vary", b"Origin")]
        if origin is not None and self.allows(origin):
            headers += self._allow_origin(origin)
            if self._expose:
                headers.append((b"access-control-expose-headers", self._expose))
        return headers


class CorsMiddleware:
    """The ASGI side of `CorsPolicy`: answers preflights, adds headers to every HTTP response."""

    def __init__(self, app: ASGIApp, config: CorsConfig) -> None:
        self.app = app
        self.policy = CorsPolicy(config)

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = _header(scope["headers"], b"origin")
        if scope["method"] == "OPTIONS" and origin is not None:
            request_method = _header(scope["headers"], b"access-control-request-method")
            if request_method is not None:
                status, headers = self.policy.preflight(
                    origin, _header(scope["headers"], b"access-control-request-headers") or ""
                )
                body = b"" if status == 204 else b"CORS: origin not allowed\n"
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        extra = self.policy.response_headers(origin)

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
