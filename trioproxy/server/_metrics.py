"""
Prometheus metrics, served at `/metrics`.

Each app owns its registry (so several apps in one process, as in the tests, never share
counts). Streams are observed once, when their session ends, from `StreamStats`: nothing
is done per token on the hot path but what the session already tallies. Requests are
observed by the access log (`_access.py`) when their response has been sent.

Label values come from the config (routes, providers) or are bounded here: a provider with
no `models` list would take any model name a client sends, so each provider keeps at most
`MAX_MODEL_LABELS` model names and counts the rest as "other".

Under `serve --workers N` (`_workers.py`) the metrics are prometheus-client's multiprocess
mode: the supervisor gives every worker the same `PROMETHEUS_MULTIPROC_DIR`, each worker
writes its values to files of its own there, and whichever worker answers `/metrics` adds
them all up, the values of workers that died included (a counter never goes back). It costs
a histogram observation 5 µs instead of 2.4 µs: about 0.3 ms of CPU for a 64-token stream.
`trioproxy_active_streams` is a live sum (a dead worker's streams are gone with it), the
circuit breakers are each worker's own, summed (`_WorkerTargets`), and the per-process
`process_*` collector is left out: no one process is the whole.
"""

from __future__ import annotations

import bisect
import collections
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .._exceptions import UpstreamStatusError, UpstreamTimeoutError
from .._targets import BREAKER_STATES
from .._upstream import BalancedUpstream
from ..pipeline import StreamSession, StreamStats
from ._generic import prompt_chars

__all__ = ["CONTENT_TYPE", "MULTIPROCESS_DIR", "Metrics", "forget_worker"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
MULTIPROCESS_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable naming the directory of multiprocess mode (prometheus-client reads it at import)."""
MAX_MODEL_LABELS: Final = 50

_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GAP_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BUFFER_BUCKETS: Final = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STREAM_LABELS: Final = ("route", "provider", "model")


class Metrics:
    def __init__(self, *, targets: Callable[[], list[tuple[str, BalancedUpstream]]] = list) -> None:
        self.registry = registry = CollectorRegistry()
        self._multiprocess_dir = os.environ.get(MULTIPROCESS_DIR)
        self._worker_targets: _WorkerTargets | None = None
        if self._multiprocess_dir is None:
            ProcessCollector(registry=registry)
            registry.register(_TargetsCollector(targets))
        else:
            self._worker_targets = _WorkerTargets(targets, registry)
        self._models: dict[str, set[str]] = {}

        self.requests = Counter(
            "trioproxy_requests",
            "HTTP requests and WebSocket streams answered, by outcome",
            ("route", "status", "outcome"),
            registry=registry,
        )
        self.client_disconnects = Counter(
            "trioproxy_client_disconnects",
            "Clients that went away before their response was complete",
            ("route",),
            registry=registry,
        )
        self.upstream_cancellations = Counter(
            "trioproxy_upstream_cancellations",
            "Upstream requests cancelled because their client went away (or cancelled the stream)",
            ("provider",),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "trioproxy_upstream_errors",
            "Failed upstream attempts, retried or not, by HTTP status (or connect, broken, timeout, protocol)",
            ("provider", "status"),
            registry=registry,
        )
        self.retries = Counter("trioproxy_retries", "Upstream attempts retried", ("provider",), registry=registry)
        self.failovers = Counter(
            "trioproxy_failovers",
            "Streams moved to a fallback provider, by the provider left",
            ("provider",),
            registry=registry,
        )
        self.recoveries = Counter(
            "trioproxy_recoveries",
            "Upstream faults a stream recovered from other than by a retry or failover, by kind "
            "(hedge, continuation, skipped_event)",
            ("provider", "kind"),
            registry=registry,
        )
        self.timeouts = Counter(
            "trioproxy_timeouts", "Named timeouts that fired", ("provider", "kind"), registry=registry
        )
        self.tokens = Counter(
            "trioproxy_tokens",
            "Tokens in (prompt), of which cached (read from the upstream's prompt cache), and out"
            " (completion), by client key, as the upstream reported them or estimated",
            ("provider", "model", "key", "direction"),
            registry=registry,
        )
        self.streams = Counter(
            "trioproxy_streams", "Streams ended, by outcome", ("route", "provider", "outcome"), registry=registry
        )
        self.time_to_first_token = Histogram(
            "trioproxy_time_to_first_token_seconds",
            "From the stream's start to its first token handed to the client",
            _STREAM_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "trioproxy_inter_token_latency_seconds",
            "Between consecutive tokens handed to the client",
            _STREAM_LABELS,
            buckets=_GAP_BUCKETS,
            registry=registry,
        )
        self.buffer_latency = Histogram(
            "trioproxy_buffer_latency_seconds",
            "How long text waited inside the proxy, from the upstream to the client",
            _STREAM_LABELS,
            buckets=_BUFFER_BUCKETS,
            registry=registry,
        )
        self.stream_duration = Histogram(
            "trioproxy_stream_duration_seconds",
            "From the stream's start to its end, however it ended",
            _STREAM_LABELS,
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.active_streams = Gauge(
            "trioproxy_active_streams", "Streams in flight", registry=registry, multiprocess_mode="livesum"
        )

    def exposition(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        assert self._worker_targets is not None
        self._worker_targets.write()  # this worker's as of now; the others' as of their last stream's end
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=self._multiprocess_dir)
        return generate_latest(every_worker)

    def stream_started(self) -> None:
        """Called once per session, when it has started (`observe_stream` ends its count)."""
        self.active_streams.inc()

    def stream_refused(self) -> None:
        """Instead of `observe_stream`, for a session the shared limits refused before it began."""
        self.active_streams.dec()

    def observe_request(self, route: str, status: int, outcome: str, *, disconnected: bool) -> None:
        self.requests.labels(route, str(status), outcome).inc()
        if disconnected:
            self.client_disconnects.labels(route).inc()

    def observe_stream(self, session: StreamSession, *, key: str) -> None:
        """Called once per session, when it has ended; `key` names whose usage it was (`_auth.key_name`)."""
        self.active_streams.dec()
        stats = session.stats
        provider = stats.provider
        model = self._model_label(provider, stats.model)
        labels = (session.endpoint, provider, model)
        self.streams.labels(session.endpoint, provider, stats.outcome).inc()
        self._observe_timings(labels, stats)
        self._observe_upstream_events(stats)
        if stats.cancelled and stats.error is None:
            self.upstream_cancellations.labels(provider).inc()
        usage = session.accumulator.usage_or_estimate(prompt_chars(session.chat))
        if usage.prompt_tokens:
            self.tokens.labels(provider, model, key, "in").inc(usage.prompt_tokens)
        if usage.cache_read_tokens:
            self.tokens.labels(provider, model, key, "cached").inc(usage.cache_read_tokens)
        if usage.completion_tokens:
            self.tokens.labels(provider, model, key, "out").inc(usage.completion_tokens)
        if self._worker_targets is not None:
            self._worker_targets.write()

    def _observe_timings(self, labels: tuple[str, str, str], stats: StreamStats) -> None:
        if stats.ttft is not None:
            self.time_to_first_token.labels(*labels).observe(stats.ttft)
        _observe_all(self.inter_token_latency.labels(*labels), stats.token_gaps)
        _observe_all(self.buffer_latency.labels(*labels), stats.buffer_waits)
        if stats.duration is not None:
            self.stream_duration.labels(*labels).observe(stats.duration)

    def _observe_upstream_events(self, stats: StreamStats) -> None:
        """The stream's retries, upstream failures, failovers and recoveries."""
        for retried in stats.retries:
            self.retries.labels(retried).inc()
        for failed, failure in stats.failures:
            if isinstance(failure, UpstreamTimeoutError):
                self.timeouts.labels(failed, failure.kind).inc()
            self.upstream_errors.labels(failed, _failure_status(failure)).inc()
        for left in stats.providers_left:
            self.failovers.labels(left).inc()
        for kind, recovered in stats.recoveries:
            self.recoveries.labels(recovered, kind).inc()

    def _model_label(self, provider: str, model: str) -> str:
        seen = self._models.setdefault(provider, set())
        if model in seen:
            return model
        if len(seen) < MAX_MODEL_LABELS:
            seen.add(model)
            return model
        return "other"


def forget_worker(pid: int, directory: str) -> None:
    """Drop a worker that exited from the live sums in `directory`; its counts stay in the totals."""
    mark_process_dead(pid, directory)


def _observe_all(histogram: Histogram, values: Iterable[float]) -> None:
    """
    Observe each value, as `histogram.observe` does, counted per bucket first. A stream's
    ~64 inter-token gaps and ~64 buffer waits were as many `observe`s, each walking the
    buckets and taking two locks (its bucket's and the sum's); this takes one per bucket
    touched, plus the sum's. prometheus_client has no batch `observe`: this uses its
    histogram's buckets (`_upper_bounds`, `_buckets`, `_sum`), as `observe` itself does.
    """
    values = list(values)
    if not values:
        return
    bounds, buckets = histogram._upper_bounds, histogram._buckets
    for index, count in collections.Counter(bisect.bisect_left(bounds, value) for value in values).items():
        buckets[index].inc(count)  # the first bucket whose bound is >= the value, as `observe` picks
    histogram._sum.inc(math.fsum(values))


def _failure_status(failure: Exception) -> str:
    if isinstance(failure, UpstreamStatusError):
        return str(failure.status)
    if isinstance(failure, UpstreamTimeoutError):
        return "timeout"
    return type(failure).__name__.removeprefix("Upstream").removesuffix("Error").lower() or "error"


_TARGET_STATE: Final = (
    "trioproxy_target_state",
    "Each provider target's circuit breaker: 1 for its state (closed, open, half_open);"
    " under `serve --workers`, how many workers' breakers are in it",
)
_TARGET_OUTSTANDING: Final = ("trioproxy_target_outstanding", "Requests in flight to each provider target")
_BREAKER_TRANSITIONS: Final = (
    "trioproxy_breaker_transitions",
    "Circuit breaker changes of each provider target, by the state it went to",
)


class _TargetsCollector(Collector):
    """Each provider target's circuit breaker, read when `/metrics` is scraped."""

    def __init__(self, targets: Callable[[], list[tuple[str, BalancedUpstream]]]) -> None:
        self._targets = targets

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(*_TARGET_STATE, labels=("provider", "target", "state"))
        outstanding = GaugeMetricFamily(*_TARGET_OUTSTANDING, labels=("provider", "target"))
        transitions = CounterMetricFamily(*_BREAKER_TRANSITIONS, labels=("provider", "target", "state"))
        for provider, upstream in self._targets():
            for target in upstream.targets:
                for state in BREAKER_STATES:
                    states.add_metric((provider, target.url, state), 1.0 if target.state == state else 0.0)
                outstanding.add_metric((provider, target.url), target.outstanding)
            for (url, state), count in upstream.transitions.items():
                transitions.add_metric((provider, url, state), count)
        yield from (states, outstanding, transitions)


class _WorkerTargets:
    """
    The circuit breakers under `serve --workers`: each worker has its own, and no collector
    reads another process's memory, so each worker writes its own to the shared files when one
    of its streams ends (what changes a breaker is a stream's attempt) and when it answers
    `/metrics`. The sums: a state's gauge counts the workers whose breaker is in it, the
    outstanding requests are every worker's, the transitions every worker's since start.
    """

    def __init__(self, targets: Callable[[], list[tuple[str, BalancedUpstream]]], registry: CollectorRegistry) -> None:
        self._targets = targets
        labels = ("provider", "target", "state")
        self._states = Gauge(*_TARGET_STATE, labels, registry=registry, multiprocess_mode="livesum")
        self._outstanding = Gauge(
            *_TARGET_OUTSTANDING, ("provider", "target"), registry=registry, multiprocess_mode="livesum"
        )
        self._transitions = Counter(*_BREAKER_TRANSITIONS, labels, registry=registry)
        self._written: dict[tuple[str, str, str], int] = {}
        """The transitions counted in the files already, by provider, target and state."""
        self.write()

    def write(self) -> None:
        for provider, upstream in self._targets():
            for target in upstream.targets:
                for state in BREAKER_STATES:
                    self._states.labels(provider, target.url, state).set(1.0 if target.state == state else 0.0)
                self._outstanding.labels(provider, target.url).set(target.outstanding)
            for (url, state), count in upstream.transitions.items():
                labels = (provider, url, state)
                if count > self._written.get(labels, 0):
                    self._transitions.labels(*labels).inc(count - self._written.get(labels, 0))
                    self._written[labels] = count
