"""
OpenTelemetry traces (`trioproxy._tracing`), end to end: the official SDKs against a real
proxy (`serve`) and the scripted `FakeUpstream` on loopback, the spans read from the SDK's
in-memory exporter, the trace context from what the upstream received.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import (
    TRACING_SHUTDOWN_BOUND,
    anthropic_sdk,
    free_port,
    openai_sdk,
    openai_upstream_config,
    serve_proxy,
    streamed_chat_text,
    wait_until,
)
from trioproxy import ConfigError, create_app, parse_config
from trioproxy.testing import FakeUpstream, Reply, open_fake_upstream

MESSAGES = [{"role": "user", "content": "go"}]
TOKENS = ("The", " canonical", " answer", ".")
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{CLIENT_SPAN_ID:016x}-01"
TRACESTATE = "vendor=opaque"
CLIENT_CONTEXT = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def start_proxy(
    nursery: trio.Nursery, tracer_provider: TracerProvider, providers: dict[str, Any], **policy: Any
) -> str:
    config = parse_config({"retry": {"max_retries": 0}, **policy, "providers": providers}, environ={})
    return await serve_proxy(nursery, config, tracer_provider=tracer_provider)


def openai_upstream(upstream: FakeUpstream, **table: Any) -> dict[str, Any]:
    return {"type": "openai", "base_url": upstream.url + "/v1", **table}


async def request_span(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The request's span, once it ended (with its session, after the client's last byte); its attempts in order."""
    await wait_until(lambda: any(span.kind is SpanKind.SERVER for span in exporter.get_finished_spans()))
    spans = exporter.get_finished_spans()
    (request,) = [span for span in spans if span.kind is SpanKind.SERVER]
    attempts = [span for span in spans if span.kind is SpanKind.CLIENT]
    return request, sorted(attempts, key=lambda span: span.attributes["trioproxy.attempt.number"])


def attempt_kinds(attempts: Sequence[ReadableSpan]) -> list[tuple[Any, Any]]:
    return [(a.attributes["trioproxy.attempt.kind"], a.attributes["trioproxy.attempt.outcome"]) for a in attempts]


def assert_nested(request: ReadableSpan, attempts: Sequence[ReadableSpan]) -> None:
    """Every attempt is a child of the request's span, in its trace."""
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == request.context.span_id
        assert attempt.context.trace_id == request.context.trace_id


async def stream_text(client: openai.AsyncOpenAI, model: str, **kwargs: Any) -> str:
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)
    return await streamed_chat_text(stream)


async def test_a_retried_stream_is_one_request_span_over_two_attempts_in_the_client_s_trace(
    nursery: trio.Nursery, upstream: FakeUpstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    upstream.push(Reply(status=500), Reply(tokens=TOKENS, usage=(9, 4), finish_reason="stop"))
    retrying = openai_upstream(upstream, retry={"max_retries": 1, "base_delay_ms": 1})
    proxy = await start_proxy(nursery, tracer_provider, {"up": retrying})
    async with openai_sdk(proxy) as client:
        assert await stream_text(client, "up/m", extra_headers=CLIENT_CONTEXT) == "".join(TOKENS)

    request, attempts = await request_span(exporter)
    assert request.name == "chat up/m"
    assert request.parent is not None
    assert request.parent.span_id == CLIENT_SPAN_ID
    assert request.parent.is_remote
    assert request.context.trace_id == TRACE_ID
    assert request.context.trace_state.get("vendor") == "opaque"
    assert request.status.status_code is StatusCode.UNSET
    attributes = request.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
    assert (attributes["gen_ai.request.model"], attributes["gen_ai.response.model"]) == ("up/m", "m")
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (9, 4)
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert [event.name for event in request.events] == ["gen_ai.first_token"]
    assert (attributes["trioproxy.outcome"], attributes["trioproxy.attempts"]) == ("completed", 2)

    assert attempt_kinds(attempts) == [("first", "error"), ("retry", "ok")]
    assert_nested(request, attempts)
    failed, succeeded = attempts
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes["error.type"], failed.attributes["http.response.status_code"]) == ("server_error", 500)
    assert failed.end_time <= succeeded.start_time  # the retry began after the failure, not alongside it
    for attempt, received in zip(attempts, upstream.requests, strict=True):
        assert attempt.name == "chat m"
        assert attempt.attributes["gen_ai.request.model"] == "m"
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert attempt.attributes["server.port"] == upstream.port
        # Each upstream request carries its own attempt's context, in the client's trace and state.
        assert received.headers["traceparent"] == f"00-{TRACE_ID:032x}-{attempt.context.span_id:016x}-01"
        assert received.headers["tracestate"] == TRACESTATE


async def test_without_a_traceparent_a_request_starts_its_own_trace_and_passes_it_on(
    nursery: trio.Nursery, upstream: FakeUpstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    upstream.push(Reply(tokens=TOKENS))
    proxy = await start_proxy(nursery, tracer_provider, {"up": openai_upstream(upstream)})
    async with openai_sdk(proxy) as client:
        await stream_text(client, "up/m")
    request, (attempt,) = await request_span(exporter)
    assert request.parent is None
    assert upstream.requests[0].headers["traceparent"].split("-")[1:3] == [
        f"{request.context.trace_id:032x}",
        f"{attempt.context.span_id:016x}",
    ]
    assert "tracestate" not in upstream.requests[0].headers


async def test_a_hedge_is_an_attempt_span_of_its_own_and_the_loser_s_is_cancelled(
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    primary, backup = await open_fake_upstream(nursery), await open_fake_upstream(nursery)
    primary.push(Reply(tokens=("slow",), ttft=20))
    backup.push(Reply(tokens=TOKENS, ttft=0.5))
    providers = {
        "primary": openai_upstream(primary, fallbacks=["backup/m"], hedge_after=3),
        "backup": openai_upstream(backup),
    }
    proxy = await start_proxy(nursery, tracer_provider, providers)
    async with openai_sdk(proxy) as client:
        assert await stream_text(client, "primary/m", extra_headers=CLIENT_CONTEXT) == "".join(TOKENS)

    request, attempts = await request_span(exporter)
    assert attempt_kinds(attempts) == [("first", "cancelled"), ("hedge", "ok")]
    assert_nested(request, attempts)  # the racers run in tasks of their own
    first, hedge = attempts
    assert (first.attributes["trioproxy.provider"], hedge.attributes["trioproxy.provider"]) == ("primary", "backup")
    assert (hedge.start_time - first.start_time) / 1e9 == pytest.approx(3, abs=0.1)  # on trio's clock
    assert first.status.status_code is StatusCode.UNSET  # lost, not failed
    assert request.attributes["trioproxy.provider"] == "backup"  # who answered
    assert request.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(3.5, abs=0.1)
    assert backup.requests[0].headers["traceparent"].split("-")[2] == f"{hedge.context.span_id:016x}"


async def test_a_continuation_is_an_attempt_span_after_the_broken_one(
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    canonical = tuple(f" w{i}" for i in range(20))
    upstream = await open_fake_upstream(nursery)
    upstream.push(Reply(tokens=canonical, reset_after=10), Reply(tokens=canonical, continues=True))
    vllm = openai_upstream(upstream, continuation="continue_final_message")
    # A buffer stage: the reader runs in a task of its own, apart from delivery.
    proxy = await start_proxy(nursery, tracer_provider, {"vllm": vllm}, buffer={"buffer_by_word": True})
    async with openai_sdk(proxy) as client:
        assert await stream_text(client, "vllm/m") == "".join(canonical)

    request, attempts = await request_span(exporter)
    assert attempt_kinds(attempts) == [("first", "error"), ("continuation", "ok")]
    assert attempts[0].attributes["error.type"] == "connection_broken"
    assert_nested(request, attempts)
    assert request.attributes["trioproxy.outcome"] == "completed"


async def test_a_failure_on_every_route_fails_each_attempt_and_the_request(
    nursery: trio.Nursery, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    primary, backup = await open_fake_upstream(nursery), await open_fake_upstream(nursery)
    primary.push(Reply(status=503))
    backup.push(Reply(status=500))
    providers = {"primary": openai_upstream(primary, fallbacks=["backup/m"]), "backup": openai_upstream(backup)}
    proxy = await start_proxy(nursery, tracer_provider, providers)
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await stream_text(client, "primary/m")

    request, attempts = await request_span(exporter)
    assert attempt_kinds(attempts) == [("first", "error"), ("failover", "error")]
    assert_nested(request, attempts)
    assert request.status.status_code is StatusCode.ERROR
    assert "2 routes failed" in request.status.description
    assert request.attributes["error.type"] == "server_error"
    assert request.attributes["trioproxy.outcome"] == "upstream_error"
    assert "gen_ai.usage.input_tokens" not in request.attributes  # nobody counted: no estimate passed off as usage


async def test_a_request_the_limits_refuse_is_a_failed_span_with_no_attempt(
    nursery: trio.Nursery, upstream: FakeUpstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    proxy = await start_proxy(nursery, tracer_provider, {"up": openai_upstream(upstream)}, limits={"max_messages": 1})
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="up/m", messages=MESSAGES * 2)
    request, attempts = await request_span(exporter)
    assert attempts == []
    assert upstream.request_count == 0
    assert (request.status.status_code, request.attributes["error.type"]) == (StatusCode.ERROR, "invalid_request_error")


async def anthropic_messages(proxy: str) -> None:
    async with (
        anthropic_sdk(proxy) as client,
        client.messages.stream(
            model="claude/claude-test", max_tokens=64, messages=MESSAGES, extra_headers=CLIENT_CONTEXT
        ) as stream,
    ):
        await stream.get_final_message()


async def openai_responses(proxy: str) -> None:
    async with openai_sdk(proxy) as client:
        await client.responses.create(model="up/gpt-test", input="go", extra_headers=CLIENT_CONTEXT)


async def openai_chat(proxy: str) -> None:
    async with openai_sdk(proxy) as client:
        await client.chat.completions.create(
            model="claude/claude-test", messages=MESSAGES, extra_headers=CLIENT_CONTEXT
        )


@pytest.mark.parametrize(
    ("ask", "model", "stream", "provider_name"),
    [
        (openai_chat, "claude/claude-test", False, "anthropic"),
        (anthropic_messages, "claude/claude-test", True, "anthropic"),
        (openai_responses, "up/gpt-test", False, "openai"),
    ],
)
async def test_every_front_traces_its_requests_with_the_genai_attributes(
    nursery: trio.Nursery,
    upstream: FakeUpstream,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    ask: Any,
    model: str,
    stream: bool,
    provider_name: str,
) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(12, 4)))
    providers = {"up": openai_upstream(upstream), "claude": {"type": "anthropic", "base_url": upstream.url}}
    proxy = await start_proxy(nursery, tracer_provider, providers)
    await ask(proxy)

    request, attempts = await request_span(exporter)
    attributes = request.attributes
    assert request.context.trace_id == TRACE_ID
    assert (attributes["gen_ai.request.model"], attributes["gen_ai.request.stream"]) == (model, stream)
    assert attributes["gen_ai.provider.name"] == provider_name
    assert attributes["gen_ai.response.model"] == model.partition("/")[2]
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (12, 4)
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert attempt_kinds(attempts) == [("first", "ok")]
    assert upstream.requests[0].headers["traceparent"].split("-")[1] == f"{TRACE_ID:032x}"


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps each export's decoded spans."""

    received: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            type(self).received.append(export)
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


async def test_tracing_configured_exports_over_otlp_by_the_time_the_server_stopped(
    upstream: FakeUpstream, collector: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    """Sampling none of its own traces, the proxy still records those its clients sample, and passes the decision on."""
    endpoint, received = collector
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))
    tracing = {"enabled": True, "endpoint": endpoint, "service_name": "proxy-under-test", "sample_ratio": 0}
    config = openai_upstream_config(upstream, tracing=tracing)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        proxy = await serve_proxy(nursery, config, shutdown_trigger=stop.wait)
        async with openai_sdk(proxy) as client:
            await stream_text(client, "up/m", extra_headers=CLIENT_CONTEXT)
            await stream_text(client, "up/m")
        stop.set()  # the graceful shutdown exports what the batch still holds
    spans = [
        (resource.resource, span)
        for export in received
        for resource in export.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert sorted(span.name for _, span in spans) == ["chat m", "chat up/m"]
    assert {span.trace_id for _, span in spans} == {TRACE_ID.to_bytes(16, "big")}
    service = {a.key: a.value.string_value for a in spans[0][0].attributes}["service.name"]
    assert service == "proxy-under-test"
    # The sampled bit of each upstream request's trace flags (W3C Trace Context, level 2 sets others too).
    assert [int(request.headers["traceparent"][-2:], 16) & 1 for request in upstream.requests] == [1, 0]


async def test_an_unreachable_collector_holds_the_server_s_stop_no_longer_than_shutdown_timeout(
    upstream: FakeUpstream,
) -> None:
    """The exporter retries a refused connection for about 7 s; the server waits `shutdown_timeout` for it."""
    upstream.push(Reply(tokens=TOKENS))
    tracing = {"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}", "shutdown_timeout": 0.5}
    config = openai_upstream_config(upstream, tracing=tracing)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        proxy = await serve_proxy(nursery, config, shutdown_trigger=stop.wait)
        async with openai_sdk(proxy) as client:
            await stream_text(client, "up/m")  # a span for the exporter to try
        stop.set()
        stopping = time.monotonic()  # the real clock: the exporter's thread waits on it
    assert time.monotonic() - stopping < TRACING_SHUTDOWN_BOUND


async def test_tracing_without_opentelemetry_installed_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "trioproxy._tracing")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    config = parse_config({"tracing": {"enabled": True}}, environ={})
    with pytest.raises(ConfigError, match=r"OpenTelemetry is not installed .*pip install 'trioproxy\[otel\]'"):
        create_app(config)


def test_the_grpc_protocol_without_its_exporter_is_a_config_error() -> None:
    config = parse_config({"tracing": {"enabled": True, "protocol": "grpc"}}, environ={})
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
        create_app(config)


def test_serving_without_tracing_imports_no_opentelemetry() -> None:
    """Off, tracing costs not even its imports: the package, the app and the CLI load without them."""
    script = """
import sys
import trioproxy
from trioproxy import create_app, parse_config
app = create_app(parse_config({}, environ={}))
import trioproxy.cli, trioproxy.server, trioproxy.pipeline
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry") or name == "trioproxy._tracing")
print(loaded)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "[]", run.stderr


async def test_a_client_s_traceparent_is_not_forwarded_when_tracing_is_off(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    config = parse_config({"providers": {"up": openai_upstream(upstream)}}, environ={})
    proxy = await serve_proxy(nursery, config)
    upstream.push(Reply(tokens=TOKENS))
    async with httpx.AsyncClient() as http:
        body = {"model": "up/m", "messages": MESSAGES}
        assert (await http.post(proxy + "/v1/chat/completions", json=body, headers=CLIENT_CONTEXT)).status_code == 200
    assert "traceparent" not in upstream.requests[0].headers
    assert "tracestate" not in upstream.requests[0].headers
