"""
The quart-trio application: the one place that touches quart (with `_serve.py` for
hypercorn, and the fronts' route modules).

`create_app` wires the parts: the ASGI middlewares (CORS, the access log), the `Core` every
front shares (sessions, limits, metrics, resumable streams), what is not any one protocol's
(the playground, `/health`, `/metrics`, `GET /v1/models`, client keys, the drain), and each
front's routes (`fronts.FRONTS`). Every error, whoever raises it — a refused key, a limit, an
unknown path, a wrong method, a body over `MAX_CONTENT_LENGTH` (reported as our 413) — is
answered in the protocol of the front that owns its path.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from typing import TYPE_CHECKING, Any, Final

from quart import Response, has_websocket_context, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge, RequestTimeout
from werkzeug.routing import WebsocketMismatch

from .._config import Config
from .._exceptions import AuthenticationError, ConfigError, HTTPRefusal, PayloadTooLargeError, TrioproxyError
from .._redis import RedisState
from .._router import Router
from .._upstream import build_upstream
from .._version import __version__
from ._access import AccessLog, request_record
from ._anthropic_front import model_list
from ._auth import key_is_valid, presented_key
from ._core import Core, connection, json_response, keeping_send, route_label
from ._cors import CorsMiddleware
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Metrics
from ._shutdown import GracefulShutdown
from .fronts import FRONTS, error_response, forwarding

if TYPE_CHECKING:
    from .._tracing import Tracing

__all__ = ["create_app"]

logger = logging.getLogger("trioproxy.server")

#: The playground is one self-contained page: it may run its own inline code and talk to this
#: origin, and nothing else (no CDN, no framing).
PLAYGROUND_HEADERS: Final = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def create_app(
    config: Config,
    *,
    router: Router | None = None,
    shutdown: GracefulShutdown | None = None,
    tracer_provider: Any = None,
) -> QuartTrio:
    """
    The proxy as an ASGI app; `router` replaces the one built from `config` (tests);
    `shutdown` is the graceful shutdown the serve layer triggers (`_shutdown.py`);
    `tracer_provider`, an OpenTelemetry `TracerProvider`, turns tracing on with it instead of
    the one `[tracing]` describes (an app that has its own, tests).
    """
    app = QuartTrio("trioproxy")
    app.config["RESPONSE_TIMEOUT"] = None  # LLM streams outlive Quart's 60 s default
    app.config["MAX_CONTENT_LENGTH"] = config.limits.max_body_bytes  # bodies are not read past it
    app.config["BODY_TIMEOUT"] = config.server.body_timeout  # a body still arriving then is a 408
    # Quart's way to add ASGI middleware. Ours take the scope as a plain dict (they add keys to
    # it), not as hypercorn's TypedDicts: the three assignments are typed ignores.
    app.asgi_app = keeping_send(app.asgi_app)  # type: ignore[assignment]
    if config.cors.enabled:
        app.asgi_app = CorsMiddleware(app.asgi_app, config.cors)  # type: ignore[assignment,arg-type]
    redis = RedisState(config.redis, stream_retention=config.streams.retention) if config.redis.enabled else None
    router = router or Router(config, make_upstream=functools.partial(build_upstream, shared=redis))
    shutdown = shutdown or GracefulShutdown(config.server.shutdown_grace_period)
    metrics = Metrics(targets=router.targets)
    access_log = AccessLog(
        app.asgi_app, metrics=metrics, enabled=config.logging.access_log, include_prompts=config.logging.include_prompts
    )
    app.asgi_app = access_log  # type: ignore[assignment]
    tracing = _tracing(config, tracer_provider)
    core = Core(
        config,
        router=router,
        shutdown=shutdown,
        metrics=metrics,
        access_log=access_log,
        nursery=lambda: app.nursery,
        tracing=tracing,
        redis=redis,
    )
    _register_lifetime(app, router, core, tracing)
    _register_gates(app, config, shutdown)
    _register_pages(app, config, router, shutdown, core, metrics)
    for front in FRONTS:
        front.register(app, core)
    forwarding.register(app, core)  # after the fronts: a path served here is never forwarded
    _register_error_handlers(app, config)
    return app


def _register_lifetime(app: QuartTrio, router: Router, core: Core, tracing: Tracing | None) -> None:
    @app.before_serving
    async def expire_idle_upstream_connections() -> None:
        """The pools' timers live in the app's nursery, from start-up until `close_upstreams` ends them."""
        app.nursery.start_soon(router.expire_idle_connections)

    @app.before_serving
    async def connect_redis() -> None:
        """The connection to Redis (`[redis]`) lives in the app's nursery, like the sessions that use it."""
        await app.nursery.start(core.serve_redis)

    @app.after_serving
    async def close_upstreams() -> None:
        await router.aclose()
        if tracing is not None:
            await tracing.aclose()  # the last spans are exported


def _register_gates(app: QuartTrio, config: Config, shutdown: GracefulShutdown) -> None:
    """What every request and WebSocket passes first: its route named, its key checked, the drain."""

    async def name_route_and_check_key() -> Response | None:
        """
        Before every request and WebSocket: name its route in its `RequestRecord`, then answer
        a 401 in the protocol of its path when client keys are on and none valid was shown.
        """
        current = connection()
        request_record(current.scope).route = route_label()
        path = current.path
        if not config.auth.enabled or not (
            path.startswith("/v1/") or (path == "/metrics" and config.auth.protect_metrics)
        ):
            return None
        if key_is_valid(presented_key(current.headers), config.auth.keys):
            return None
        error = AuthenticationError(
            "missing or invalid API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            code="invalid_api_key",
        )
        response = error_response(path, error)
        response.headers["www-authenticate"] = "Bearer"
        return response

    app.before_request(name_route_and_check_key)
    app.before_websocket(name_route_and_check_key)

    @app.before_request
    async def refuse_while_draining() -> Response | None:
        """A request that reaches the app during the drain: 503, retry elsewhere (`/health` says why)."""
        if not shutdown.draining or request.path == "/health":
            return None
        response = error_response(request.path, shutdown.refusal())
        if request.http_version in ("1.0", "1.1"):  # HTTP/2 forbids the header (and closes by GOAWAY)
            response.headers["connection"] = "close"
        return response


def _register_pages(
    app: QuartTrio, config: Config, router: Router, shutdown: GracefulShutdown, core: Core, metrics: Metrics
) -> None:
    """The routes that are no front: the playground, health, metrics and the model list."""

    @app.get("/")
    async def playground() -> Response:
        """The playground page; open even with client keys on (its own requests carry the key)."""
        return Response(_playground_page(), content_type="text/html; charset=utf-8", headers=PLAYGROUND_HEADERS)

    @app.get("/health")
    async def health() -> Response:
        providers: dict[str, dict[str, Any]] = {name: {"type": p.type} for name, p in config.providers.items()}
        for name, upstream in router.targets():
            providers[name]["targets"] = [
                {"url": t.url, "state": t.state, "outstanding": t.outstanding} for t in upstream.targets
            ]
        status = "draining" if shutdown.draining else "ok"  # a draining instance takes no new work
        body = {
            "status": status,
            "version": __version__,
            "providers": providers,
            "active_streams": len(core.active),  # this process's: a worker of `serve --workers` counts its own
            "pid": os.getpid(),
        }
        return json_response(body, status=503 if shutdown.draining else 200)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        """The routable models, in Anthropic's list shape for a client that names its API version."""
        if "anthropic-version" in request.headers:
            return json_response(model_list(router.models()))
        data = [{"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in router.models()]
        return json_response({"object": "list", "data": data})


def _register_error_handlers(app: QuartTrio, config: Config) -> None:
    @app.errorhandler(TrioproxyError)
    async def refusal(exc: TrioproxyError) -> Response:
        """A refusal raised by `Core.start` (limits), in the protocol of the route."""
        return error_response(connection().path, exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        """
        The framework's refusals (no route, wrong method, a body too large or too slow), in
        our words and in the protocol of the path; also before a WebSocket handshake, which
        then gets this HTTP response instead of an upgrade.
        """
        current = connection()
        path = current.path
        if isinstance(exc, RequestEntityTooLarge):  # quart's MAX_CONTENT_LENGTH
            too_large = PayloadTooLargeError(
                f"the request body is over the limit of {config.limits.max_body_bytes} bytes"
            )
            return error_response(path, too_large)
        if has_websocket_context() and isinstance(exc, (NotFound, WebsocketMismatch, MethodNotAllowed)):
            message, status = f"no WebSocket endpoint at {path}", 404
        else:
            message, status = _refusal_message(exc, current.method, path, config), exc.code or 500
        error = HTTPRefusal(message, status=status)
        response = error_response(path, error)  # e.g. a GET on a generic endpoint: its own shape
        for name, value in exc.get_headers():
            if name.lower() == "allow" and status == 405:
                response.headers["allow"] = value
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        current = connection()  # a WebSocket's before-hook may raise too
        logger.exception("unhandled error in %s %s", current.method, current.path)
        return error_response(current.path, TrioproxyError("internal server error"))


def _refusal_message(exc: HTTPException, method: str, path: str, config: Config) -> str:
    """The framework's refusal of an HTTP request, in our words."""
    if isinstance(exc, WebsocketMismatch):
        return f"{path} is a WebSocket endpoint: open it with a WebSocket handshake (GET with Upgrade: websocket)"
    if isinstance(exc, NotFound):
        forwardable = " (a provider's forward_paths can forward it)" if path.startswith("/v1/") else ""
        return f"no endpoint at {method} {path}{forwardable}"
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or ()))  # a set: in a stable order
        return f"{method} is not allowed on {path} (allowed: {allowed})"
    if isinstance(exc, RequestTimeout):  # quart's BODY_TIMEOUT
        return f"the request body did not arrive within [server] body_timeout ({config.server.body_timeout:g} s)"
    return exc.description or exc.name


def _tracing(config: Config, tracer_provider: Any) -> Tracing | None:
    """The traces, when `[tracing]` or a provider asks for them; only then is OpenTelemetry imported."""
    if not config.tracing.enabled and tracer_provider is None:
        return None
    try:
        from .._tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            [f"[tracing] is enabled, but OpenTelemetry is not installed ({exc.name}): pip install 'trioproxy[otel]'"]
        ) from None
    return Tracing.from_config(config.tracing) if tracer_provider is None else Tracing(tracer_provider)


@functools.cache
def _playground_page() -> bytes:
    """Read once from the package's data: the page needs no build step and fetches nothing."""
    return (importlib.resources.files(__package__) / "static" / "playground.html").read_bytes()
