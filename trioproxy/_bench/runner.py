"""
The order of a benchmark run: start the children, measure every target at every concurrency,
optionally find the largest sustained concurrency, then the buffering modes.

Targets are measured interleaved (at each concurrency: direct, trioproxy, each compared
proxy) rather than one after the other, so slow drifts of the machine touch all of them alike.
Each phase warms up first (connections, pools) and is measured after, with the proxy's and the
upstream's CPU counters read exactly around the measured part.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from .._exceptions import exception_leaves
from .machine import machine_info, versions
from .options import DIRECT_FRONT, BenchSettings, Front, split_compare
from .processes import (
    BenchError,
    Child,
    LoadGenerator,
    Pinning,
    cpu_seconds,
    cpu_seconds_of_all,
    peak_rss_mb,
    pinned_self,
    plan_pinning,
    raise_open_files_limit,
    start_loadgen,
    start_proxy,
    start_upstream,
)
from .report import print_report, write_outputs
from .results import BufferReport, MaxReport, PhaseReport, Report, Resources, Target
from .stats import PhaseFigures, buffer_figures, phase_figures, sustained_fault
from .wire import PhaseResult, PhaseSpec, Protocol

#: The request every stream sends; the upstream's answer does not depend on it.
MESSAGES = [{"role": "user", "content": "Benchmark: stream your tokens."}]
#: The provider name trioproxy routes to the benchmark upstream.
PROVIDER = "up"
#: The same upstream as an Anthropic provider: the Anthropic front's streams go there, so that
#: each front is measured with an upstream of its own protocol.
ANTHROPIC_PROVIDER = "up-anthropic"
#: `max_tokens`, which every Messages request must carry; the upstream's answer does not depend on it.
ANTHROPIC_MAX_TOKENS = 4096
#: The same upstream as a Responses provider, for the Responses front (SSE and WebSocket mode).
RESPONSES_PROVIDER = "up-responses"
#: Each front's provider in the trioproxy under test.
PROVIDERS: dict[Front, str] = {
    "openai": PROVIDER,
    "anthropic": ANTHROPIC_PROVIDER,
    "responses": RESPONSES_PROVIDER,
    "responses-ws": RESPONSES_PROVIDER,
}
#: The input every Responses stream sends (`MESSAGES`' text).
RESPONSES_INPUT = MESSAGES[0]["content"]

#: The buffering modes measured, as `buffer_config` objects of the generic endpoint (None: off).
BUFFER_MODES: dict[str, dict[str, Any] | None] = {
    "off": None,
    "size": {"min_chunk_size": 20},
    "word": {"buffer_by_word": True},
    "sentence": {"buffer_by_sentence": True},
    "timer": {"min_chunk_size": 1000, "flush_interval_ms": 50},
}


def progress(line: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(line, file=sys.stderr, flush=True)


def proxy_config(upstream_url: str, max_connections: int, *, max_streams: int | None = None) -> str:
    """
    The TOML for the trioproxy under test: providers `up` (OpenAI), `up-anthropic`
    (Anthropic, for the Anthropic front) and `up-responses` (OpenAI Responses, for the
    Responses front) are the benchmark upstream, each with
    retries off (every failure must show) and a connection pool as large as the largest
    concurrency measured (so the pool, not the proxy, is never what queues streams), and the
    server's stream limit the same unless `max_streams` says (the sweep measures streams, not
    refusals). No access log: a line per stream is not what is measured, and `--workers` runs
    at level info.
    """
    return (
        "[logging]\n"
        "access_log = false\n"
        "[limits]\n"
        f"max_concurrent_streams = {max_connections if max_streams is None else max_streams}\n"
        f"[providers.{PROVIDER}]\n"
        'type = "openai"\n'
        f'base_url = "{upstream_url}/v1"\n'
        f"max_connections = {max_connections}\n"
        "retry = { max_retries = 0 }\n"
        f"[providers.{ANTHROPIC_PROVIDER}]\n"
        'type = "anthropic"\n'
        f'base_url = "{upstream_url}"\n'
        f"max_connections = {max_connections}\n"
        "retry = { max_retries = 0 }\n"
        f"[providers.{RESPONSES_PROVIDER}]\n"
        'type = "openai_responses"\n'
        f'base_url = "{upstream_url}/v1"\n'
        f"max_connections = {max_connections}\n"
        "retry = { max_retries = 0 }\n"
    )


def _targets(
    settings: BenchSettings, upstream: Child, proxy: Child | None, scaled: Child | None = None
) -> list[Target]:
    """
    Per front, the direct connection (one for the fronts measured against the same, see
    `DIRECT_FRONT`), then trioproxy (and with `--workers N`, the `scaled` trioproxy of N
    workers); then the compared proxies (OpenAI only).
    """
    targets: list[Target] = []
    for front in settings.fronts:
        suffix = "" if front == "openai" else f"-{front}"
        direct = DIRECT_FRONT.get(front, front)
        if not any(target.kind == "direct" and target.front == direct for target in targets):
            direct_suffix = "" if direct == "openai" else f"-{direct}"
            url = _front_url(upstream.url, direct)
            targets.append(Target(f"direct{direct_suffix}", "direct", url, "m", front=direct))
        provider = PROVIDERS[front]
        if proxy is not None:
            url = _front_url(proxy.url, front)
            targets.append(Target(f"trioproxy{suffix}", "trioproxy", url, f"{provider}/m", proxy.pid, front=front))
        elif settings.proxy_url is not None:
            url = _front_url(settings.proxy_url, front)
            targets.append(Target(f"trioproxy{suffix}", "trioproxy", url, settings.compare_model, front=front))
        if scaled is not None:
            name = f"trioproxy-{len(scaled.worker_pids)}w{suffix}"
            url = _front_url(scaled.url, front)
            targets.append(
                Target(name, "trioproxy", url, f"{provider}/m", scaled.pid, front=front, worker_pids=scaled.worker_pids)
            )
    for compare in settings.compare:
        label, url = split_compare(compare)
        targets.append(
            Target(
                _unique_name(label or urlsplit(url).netloc, targets), "compare", _chat_url(url), settings.compare_model
            )
        )
    return targets


def _chat_url(base: str) -> str:
    """A proxy's Chat Completions URL from its base URL, with or without `/v1`, or the full URL."""
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def _front_url(base: str, front: Front) -> str:
    """
    The route of `front` (Chat Completions, Messages or Responses, the last also WebSocket
    mode's) beside a base URL, as `_chat_url` reads it.
    """
    chat = _chat_url(base)
    routes = {"anthropic": "/messages", "responses": "/responses", "responses-ws": "/responses"}
    return chat if front == "openai" else chat.removesuffix("/chat/completions") + routes[front]


def _generic_url(chat_url: str) -> str:
    """trioproxy's generic NDJSON endpoint, beside its Chat Completions URL (whatever base that has)."""
    return chat_url.removesuffix("/chat/completions") + "/chat/stream/json"


def _unique_name(name: str, existing: list[Target]) -> str:
    """`name`, or `name#N` if a target already has it."""
    taken = {target.name for target in existing}
    return name if name not in taken else f"{name}#{len(existing)}"


class _Bench:
    """Runs phases against the targets with one load generator, reading the counters around each."""

    def __init__(self, settings: BenchSettings, loadgen: LoadGenerator, upstream: Child, targets: list[Target]) -> None:
        self.settings = settings
        self.loadgen = loadgen
        self.upstream = upstream
        self.targets = targets

    async def _measure(self, spec: PhaseSpec, measured: Target | None) -> tuple[PhaseResult, Resources]:
        """
        Run a phase, reading the CPU of `measured` (a trioproxy this run started: its one
        process, or its supervisor and every worker) and of the upstream around its measured part.
        """
        pids = () if measured is None or measured.pid is None else (measured.pid, *measured.worker_pids)
        before: dict[str, Any] = {}

        def on_ready() -> None:
            before["proxy"] = cpu_seconds_of_all(pids)
            before["upstream"] = cpu_seconds(self.upstream.pid)

        result = await self.loadgen.run_phase(spec, on_ready)
        used = [after - start for after, start in zip(cpu_seconds_of_all(pids), before["proxy"], strict=True)]
        proxy_cpu = sum(used) if pids else None
        streams = spec.concurrency * spec.rounds
        peaks = [peak_rss_mb(pid) for pid in pids]
        return result, Resources(
            proxy_cpu_s=proxy_cpu,
            proxy_cpu_ms_per_stream=None if proxy_cpu is None else proxy_cpu * 1000 / streams,
            proxy_peak_rss_mb=sum(peak for peak in peaks if peak is not None) if pids else None,
            upstream_cpu_s=_delta(cpu_seconds(self.upstream.pid), before["upstream"]),
            loadgen_cpu_s=result.cpu_s,
            worker_cpu_s=tuple(used[1:]) if len(pids) > 1 else (),
            supervisor_cpu_s=used[0] if len(pids) > 1 else None,
        )

    def _spec(self, url: str, payload: dict[str, Any], protocol: Protocol, concurrency: int) -> PhaseSpec:
        settings = self.settings
        return PhaseSpec(
            url=url,
            payload=payload,
            protocol=protocol,
            concurrency=concurrency,
            rounds=settings.rounds_for(concurrency),
            warmup_rounds=settings.warmup_rounds,
            tokens=settings.tokens,
            stream_timeout_s=settings.stream_timeout_s,
            stagger_s=settings.stream_s if settings.staggered else 0.0,
        )

    async def phase(self, target: Target, concurrency: int) -> PhaseReport:
        payload: dict[str, Any] = {"model": target.model, "messages": MESSAGES, "stream": True}
        if target.front == "anthropic":
            payload["max_tokens"] = ANTHROPIC_MAX_TOKENS
        elif target.front in ("responses", "responses-ws"):
            # `store: false`, as Codex sends: the upstream's events pass through byte for byte (a
            # stored response would also be logged for its replays).
            payload = {"model": target.model, "input": RESPONSES_INPUT, "stream": True, "store": False}
        spec = self._spec(target.url, payload, target.front, concurrency)
        result, resources = await self._measure(spec, target)
        figures = phase_figures(result.records, spec.concurrency * spec.rounds, result.wall_s)
        progress(f"  {target.name:<19} {concurrency:>5} streams: {_phase_line(figures, resources)}")
        return PhaseReport(target.name, concurrency, spec.rounds, figures, resources)

    async def sweep(self) -> list[PhaseReport]:
        reports = []
        for concurrency in self.settings.concurrency:
            progress(f"concurrency {concurrency} ({self.settings.rounds_for(concurrency)} rounds after a warm-up):")
            for target in self.targets:
                reports.append(await self.phase(target, concurrency))
        return reports

    async def find_max(self, sweep: list[PhaseReport]) -> list[MaxReport]:
        """For each target, double from the sweep's largest concurrency until a phase has a fault."""
        return [await self._find_max(target, [r for r in sweep if r.target == target.name]) for target in self.targets]

    async def _find_max(self, target: Target, sweep: list[PhaseReport]) -> MaxReport:
        interval, limit = self.settings.interval_ms, self.settings.max_concurrency
        sustained: int | None = None
        tried: list[int] = []
        for report in sorted(sweep, key=lambda r: r.concurrency):
            tried.append(report.concurrency)
            if reason := sustained_fault(report.figures, interval):
                return MaxReport(target.name, sustained, False, report.concurrency, reason, tried)
            sustained = report.concurrency
        concurrency = sustained or 1
        progress(f"find-max, {target.name}, doubling up to {limit}:")
        while concurrency < limit:
            concurrency = min(2 * concurrency, limit)
            report = await self.phase(target, concurrency)
            tried.append(concurrency)
            if reason := sustained_fault(report.figures, interval):
                return MaxReport(target.name, sustained, False, concurrency, reason, tried)
            sustained = concurrency
        return MaxReport(target.name, sustained, True, None, None, tried)

    async def buffer_modes(self, generic_url: str) -> list[BufferReport]:
        """Each buffering mode through the generic NDJSON endpoint, whose `done` event reports the waits."""
        concurrency = self.settings.buffer_concurrency
        progress(f"buffer modes, {concurrency} concurrent streams each:")
        reports = []
        for mode, config in BUFFER_MODES.items():
            payload: dict[str, Any] = {"model": f"{PROVIDER}/m", "messages": MESSAGES}
            if config is not None:
                payload["buffer_config"] = config
            spec = self._spec(generic_url, payload, "ndjson", concurrency)
            result, _ = await self._measure(spec, None)
            figures = buffer_figures(result.records, spec.concurrency * spec.rounds)
            progress(f"  {mode:<9} buffer latency p50 {_ms(figures.p50_ms)}, p99 {_ms(figures.p99_ms)}, "
                     f"{figures.errors} errors")  # fmt: skip
            reports.append(BufferReport(mode, config, concurrency, figures))
        return reports


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _phase_line(figures: PhaseFigures, resources: Resources) -> str:
    line = (
        f"TTFT p50 {_ms(figures.ttft_ms.p50)} p99 {_ms(figures.ttft_ms.p99)}, ITL p99 {_ms(figures.itl_ms.p99)}, "
        f"{figures.streams_per_s:.0f} streams/s, {figures.errors} errors, {figures.lost} lost"
    )
    if resources.proxy_cpu_ms_per_stream is not None:
        line += f", proxy CPU {resources.proxy_cpu_ms_per_stream:.2f} ms/stream"
    if figures.error_examples:
        line += f" ({'; '.join(figures.error_examples)})"
    return line


async def run(settings: BenchSettings) -> Report:
    """
    Run the benchmark; SIGTERM and SIGHUP stop it as Ctrl-C does, through every `finally`, so
    that no child outlives the run (a bare SIGTERM would end this process and orphan them).
    """
    reports: list[Report] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        reports.append(await _measure_all(settings))
        nursery.cancel_scope.cancel()
    return reports[0]


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            raise BenchError(f"stopped by {signal.Signals(signum).name}")


async def _measure_all(settings: BenchSettings) -> Report:
    """Start what is needed, run the parts `settings` asks for, stop everything, report."""
    started = time.perf_counter()
    if settings.workers is not None and settings.proxy_url is not None:
        raise BenchError("--workers measures trioproxy processes the bench starts, not one at --proxy-url")
    open_files = raise_open_files_limit()
    pinning = plan_pinning(external_proxy=settings.proxy_url is not None, proxy_cpus=settings.workers or 1)
    progress(f"pinning: {pinning.describe()}")
    with tempfile.TemporaryDirectory(prefix="trioproxy-bench-") as tmp, pinned_self(pinning.others):
        work = Path(tmp)
        async with AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(start_bench_upstream(settings, pinning, work))
            proxy = scaled = None
            if settings.proxy_url is None:
                config = work / "trioproxy.toml"
                config.write_text(proxy_config(upstream.url, _largest_concurrency(settings)))
                one_cpu = pinning.proxy[:1] if pinning.proxy is not None else None
                proxy = await stack.enter_async_context(start_proxy(config, cpus=one_cpu, log_dir=work))
                progress(f"trioproxy listening on {proxy.url} after {proxy.startup_s:.2f} s")
            if settings.workers is not None:
                scaled = await stack.enter_async_context(
                    start_proxy(config, cpus=pinning.proxy, log_dir=work, workers=settings.workers)
                )
                progress(f"trioproxy with {settings.workers} workers (pids {', '.join(map(str, scaled.worker_pids))}) "
                         f"listening on {scaled.url}, all serving after {scaled.startup_s:.2f} s")  # fmt: skip
            loadgen = await stack.enter_async_context(start_loadgen(cpus=pinning.others, log_dir=work))
            targets = _targets(settings, upstream, proxy, scaled)
            bench = _Bench(settings, loadgen, upstream, targets)
            sweep = await bench.sweep() if settings.sweep else []
            maxima = await bench.find_max(sweep) if settings.find_max else []
            trioproxy_url = proxy.url if proxy is not None else settings.proxy_url
            assert trioproxy_url is not None
            buffer = await bench.buffer_modes(_generic_url(_chat_url(trioproxy_url))) if settings.buffer else []
    return Report(
        settings=settings,
        machine=machine_info(),
        versions=versions(),
        pinning=pinning,
        open_files_limit=open_files,
        proxy_startup_s=proxy.startup_s if proxy is not None else None,
        targets=targets,
        sweep=sweep,
        find_max=maxima,
        buffer=buffer,
        duration_s=time.perf_counter() - started,
        workers_startup_s=scaled.startup_s if scaled is not None else None,
    )


def start_bench_upstream(settings: BenchSettings, pinning: Pinning, work: Path) -> AbstractAsyncContextManager[Child]:
    """The benchmark upstream `settings` describe, on the CPUs left to the load generator, logging into `work`."""
    return start_upstream(
        port=settings.upstream_port,
        tokens=settings.tokens,
        ttft_ms=settings.ttft_ms,
        interval_ms=settings.interval_ms,
        cpus=pinning.others,
        log_dir=work,
    )


def _largest_concurrency(settings: BenchSettings) -> int:
    largest = max([*settings.concurrency, settings.buffer_concurrency])
    return max(largest, settings.max_concurrency) if settings.find_max else largest


def main(settings: BenchSettings) -> int:
    """Run the benchmark, print the tables and write the files; a `BenchError` is one line, exit 1."""
    try:
        report = trio.run(run, settings)
    except BaseException as exc:  # sorted below; anything unexpected is re-raised
        leaves = list(exception_leaves(exc))
        reasons = [leaf for leaf in leaves if isinstance(leaf, BenchError)]
        for reason in reasons:
            print(f"trioproxy bench: {reason}", file=sys.stderr)
        if reasons:
            return 1
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 130
        raise
    print_report(report)
    for path in write_outputs(report):
        progress(f"wrote {path}")
    return 0
