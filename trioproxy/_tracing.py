"""
OpenTelemetry traces: the one module that imports OpenTelemetry, and only when `[tracing]` is on.

A request's generation is a SERVER span (`RequestTrace`), its parent the client's W3C
`traceparent` (and `tracestate`) when it sent one; each upstream request made for it is a
CLIENT span beneath it (`AttemptTrace`), whose own context goes upstream in the request's
`traceparent`. Attributes follow the OpenTelemetry GenAI semantic conventions.

Off, nothing here runs: the server builds no `Tracing`, a request's `Pipeline.trace` is
`None`, and the reader and the upstream layer see `None` and do nothing else (no span, no
context, no header). So the hot path pays one `is None` per upstream attempt.

Parents are passed explicitly, never through OpenTelemetry's current context: that lives in
contextvars, which a trio task copies when it is spawned, so an attempt racing in a hedge's
task, or reading in a stage's, would otherwise see whatever context its spawner had. Times
are read on trio's clock (as the stream's stats are), so every span of a request agrees
with the metrics and the access log, and with trio's MockClock in tests; each request maps
trio's clock to the wall clock once, when it starts.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import trio
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._config import DEFAULT_TRACING_SHUTDOWN_TIMEOUT, TracingConfig
from ._exceptions import ConfigError, TrioproxyError, UpstreamError
from ._policy import failure_kind
from ._version import __version__

if TYPE_CHECKING:
    from ._request import ChatRequest
    from ._router import Route
    from .pipeline import StreamSession

__all__ = ["AttemptTrace", "RequestTrace", "Tracing"]

OPERATION: Final = "chat"
"""`gen_ai.operation.name` of every generation: chat completions, messages and responses alike."""

PROVIDER_NAMES: Final = {"openai": "openai", "openai_responses": "openai", "anthropic": "anthropic"}
"""`gen_ai.provider.name` by provider type; a simulated provider is "trioproxy"."""

_PROPAGATOR: Final = TraceContextTextMapPropagator()
"""W3C Trace Context: `traceparent` and `tracestate`, in from the client and out to the upstream."""

logger = logging.getLogger("trioproxy.tracing")


class Tracing:
    """
    The spans of every request, made by `tracer_provider`'s tracer. `from_config` builds the
    provider `[tracing]` describes (and `aclose` flushes and shuts it down, within
    `shutdown_timeout` seconds); one handed in is its owner's to shut down.
    """

    def __init__(
        self, tracer_provider: Any, *, owned: bool = False, shutdown_timeout: float = DEFAULT_TRACING_SHUTDOWN_TIMEOUT
    ) -> None:
        self._provider = tracer_provider
        self._owned = owned
        self._shutdown_timeout = shutdown_timeout
        self._tracer = tracer_provider.get_tracer("trioproxy", __version__)

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing:
        """A provider exporting over OTLP in batches (the SDK's bounded queue, in its own thread)."""
        service = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "trioproxy"
        sampler = None if config.sample_ratio is None else ParentBased(TraceIdRatioBased(config.sample_ratio))
        provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
        provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
        return cls(provider, owned=True, shutdown_timeout=config.shutdown_timeout)

    def request(self, chat: ChatRequest, route: Route, *, endpoint: str, headers: Mapping[str, str]) -> RequestTrace:
        """The span of `chat`, to `route` first, asked on `endpoint` with `headers` (its trace context)."""
        carrier = {name: value for name in ("traceparent", "tracestate") if (value := headers.get(name)) is not None}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        return RequestTrace(self._tracer, chat, route, endpoint=endpoint, parent=parent)

    async def aclose(self) -> None:
        """
        Export what is left and stop (a provider of our own only), within `shutdown_timeout`.
        The SDK has no bound of its own to give: `TracerProvider.shutdown` takes none, its batch
        processor then waits up to 30 s for its export thread, whose exporter retries a collector
        that refuses for about 7 s (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s, bounds each batch, not
        the lot), and `force_flush` ignores its `timeout_millis`. Past the bound, the spans not
        yet exported are dropped: the shutdown's thread, a daemon, is left to the process's end.
        """
        if not self._owned:
            return
        with trio.move_on_after(self._shutdown_timeout) as waited:
            await trio.to_thread.run_sync(self._provider.shutdown, abandon_on_cancel=True)
        if waited.cancelled_caught:
            logger.warning(
                "the last spans were not exported within [tracing] shutdown_timeout (%g s): dropped",
                self._shutdown_timeout,
            )


class RequestTrace:
    """One request's span, from the session's start to its end; the parent of its attempts."""

    def __init__(self, tracer: Any, chat: ChatRequest, route: Route, *, endpoint: str, parent: Context | None) -> None:
        self._tracer = tracer
        self._clock = _Clock()
        provider = route.provider
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.request.model": chat.model,
            "gen_ai.request.stream": chat.stream,
            "http.route": endpoint,
            **_provider_attributes(provider.name, provider.type),
        }
        if chat.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = chat.max_tokens
        self.span: Span = tracer.start_span(
            f"{OPERATION} {chat.model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=self._clock.ns(trio.current_time()),
        )
        self._context = set_span_in_context(self.span)
        self._types = {provider.name: provider.type}
        """The type of each provider an attempt asked, by name: the one that answered is named at the end."""
        self._attempts = 0

    def attempt(self, kind: str, route: Route) -> AttemptTrace:
        """The span of the next upstream request, `kind` first, retry, failover, hedge or continuation."""
        self._attempts += 1
        self._types[route.provider.name] = route.provider.type
        return AttemptTrace(self._tracer, self._context, self._clock, kind, self._attempts, route)

    def refused(self, error: BaseException) -> None:
        """The request was refused before its session started (a limit, a body of the wrong shape)."""
        _failed(self.span, error)
        self.span.end(self._clock.ns(trio.current_time()))

    def ended(self, session: StreamSession) -> None:
        """The session ended: what it answered, how much it used, how long its first token took."""
        span, stats = self.span, session.stats
        end = self._clock.ns(stats.ended if stats.ended is not None else trio.current_time())
        if span.is_recording():
            provider_type = self._types.get(stats.provider)
            if provider_type is not None:
                span.set_attributes(_provider_attributes(stats.provider, provider_type))
            span.set_attribute("gen_ai.response.model", stats.model)
            span.set_attribute("trioproxy.outcome", stats.outcome)
            span.set_attribute("trioproxy.attempts", self._attempts)
            accumulator = session.accumulator
            if accumulator.finish_reason is not None:
                span.set_attribute("gen_ai.response.finish_reasons", (accumulator.finish_reason,))
            usage = accumulator.usage
            if usage is not None:  # only the upstream's own count: an estimate would pass for one
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
                if usage.cache_read_tokens is not None:
                    span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cache_read_tokens)
                if usage.cache_creation_tokens is not None:
                    span.set_attribute("gen_ai.usage.cache_creation.input_tokens", usage.cache_creation_tokens)
            if stats.first_token is not None:
                span.set_attribute("gen_ai.response.time_to_first_chunk", stats.first_token - stats.started)
                span.add_event("gen_ai.first_token", timestamp=self._clock.ns(stats.first_token))
            if stats.error is not None:
                _failed(span, stats.error)
        span.end(end)


class AttemptTrace:
    """
    One upstream request's span, open while it runs (`with`): its target, the trace context
    it sends, and how it ended (`trioproxy.attempt.outcome`: ok, error, or cancelled — a lost
    hedge, a client gone).
    """

    def __init__(self, tracer: Any, parent: Context, clock: _Clock, kind: str, number: int, route: Route) -> None:
        self._clock = clock
        provider = route.provider
        self.span: Span = tracer.start_span(
            f"{OPERATION} {route.upstream_model}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": OPERATION,
                "gen_ai.request.model": route.upstream_model,
                **_provider_attributes(provider.name, provider.type),
                "trioproxy.attempt.number": number,
                "trioproxy.attempt.kind": kind,
            },
            start_time=clock.ns(trio.current_time()),
        )

    def __enter__(self) -> AttemptTrace:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self.span
        if exc is None:
            span.set_attribute("trioproxy.attempt.outcome", "ok")
        elif isinstance(exc, trio.Cancelled):
            span.set_attribute("trioproxy.attempt.outcome", "cancelled")
        else:
            span.set_attribute("trioproxy.attempt.outcome", "error")
            _failed(span, exc)
        span.end(self._clock.ns(trio.current_time()))

    def target(self, url: str) -> None:
        """The upstream `url` the request goes to (the last one, when a target refused the connection)."""
        parts = urllib.parse.urlsplit(url)
        self.span.set_attributes({"server.address": parts.hostname or "", "trioproxy.target": url})
        if parts.port is not None:
            self.span.set_attribute("server.port", parts.port)

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """`headers` and this attempt's W3C trace context (`traceparent`, `tracestate`)."""
        outgoing = dict(headers)
        _PROPAGATOR.inject(outgoing, context=set_span_in_context(self.span))
        return outgoing


class _Clock:
    """Trio's clock to the wall clock's nanoseconds, from one reading of both."""

    def __init__(self) -> None:
        self._wall = time.time_ns()
        self._trio = trio.current_time()

    def ns(self, at: float) -> int:
        return self._wall + round((at - self._trio) * 1e9)


def _provider_attributes(name: str, provider_type: str) -> dict[str, str]:
    system = PROVIDER_NAMES.get(provider_type, "trioproxy")
    # `gen_ai.system` is the name before semantic conventions 1.37, which some backends still read.
    return {"gen_ai.provider.name": system, "gen_ai.system": system, "trioproxy.provider": name}


def _failed(span: Span, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, error.message if isinstance(error, TrioproxyError) else str(error)))
    span.set_attribute("error.type", _error_type(error))
    if isinstance(error, UpstreamError) and error.status:
        span.set_attribute("http.response.status_code", error.status)


def _error_type(error: BaseException) -> str:
    """A low-cardinality class of the error: an upstream failure's kind, a refusal's status, else our error type."""
    if isinstance(error, UpstreamError):
        return failure_kind(error) or str(error.status)
    if isinstance(error, TrioproxyError):
        return error.type
    return type(error).__qualname__


def _exporter(config: TracingConfig) -> SpanExporter:
    endpoint = config.endpoint
    if config.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            raise ConfigError(
                ["[tracing].protocol = 'grpc' needs opentelemetry-exporter-otlp-proto-grpc: pip install it"]
            ) from None
        return GrpcExporter(endpoint=endpoint)  # type: ignore[no-any-return]  # the optional exporter: untyped here
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if endpoint is not None and urllib.parse.urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)
