#!/usr/bin/env python3
"""
CPU per stream, for deciding whether a change to the hot path pays: the same upstream, proxy
and load generator as `trioproxy bench`, pinned the same way, but only short phases, each
repeated, and their medians.

    python benchmarks/cpu_per_stream.py                          # 50 streams, 5 phases
    python benchmarks/cpu_per_stream.py --concurrency 1,10,50 --repeat 3
    python benchmarks/cpu_per_stream.py --redis                  # with [redis], on a redis-server of its own
    python benchmarks/cpu_per_stream.py --staggered --concurrency 100   # steady traffic: the steadiest figure
    python benchmarks/cpu_per_stream.py --reference nginx        # and Debian's nginx, as a floor
    python benchmarks/cpu_per_stream.py --reference nginx --reference trio-relay

Each phase runs the direct connection and then trioproxy at one concurrency (the reference
workload: 64 tokens, 50 ms to the first, 20 ms apart) and prints trioproxy's CPU per stream,
the TTFT p50 it adds over direct, and its streams/s; then each concurrency's medians, with
every phase's figure so the spread shows. A phase where a stream failed or a token was lost,
duplicated or reordered stops the run.

With `--reference nginx`, Debian's nginx (`/usr/sbin/nginx`; `apt-get install nginx-light`)
streams from the same upstream after trioproxy in every phase, to the same load generator,
pinned to trioproxy's CPU: one worker, `proxy_buffering off`, no cache, no access log,
HTTP/1.1 upstream connections kept alive, everything it writes in the run's temporary
directory. Its CPU (the master's and the worker's) gets the same line, and the medians
trioproxy's CPU per stream as a multiple of nginx's, from the same run: what a proxy that does
no more than move bytes costs on this machine. `--reference trio-relay` does the same with
`trioproxy._bench.relay`, a relay of HTTP/1.1 on trio that only frames messages: what any
proxy written on trio pays, before it does anything of its own. On a machine shared with other work the spread
between phases is ±15% or more: compare two versions by alternating runs of each, not by one.
Streams that start together are handled in batches whose size varies from phase to phase (on
this project's machine, ±15% even when it is idle); with `--staggered` they start spread over
one stream's duration, as steady traffic, and phases agree within a few percent.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import trio

# Runs from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trioproxy._bench.options import BenchSettings, _concurrency_list, _positive_int
from trioproxy._bench.processes import (
    BenchError,
    pinned_self,
    plan_pinning,
    start_loadgen,
    start_nginx,
    start_proxy,
    start_redis,
    start_relay,
)
from trioproxy._bench.results import PhaseReport, Target
from trioproxy._bench.runner import _Bench, _chat_url, _targets, proxy_config, start_bench_upstream

#: The proxies `--reference` measures beside trioproxy: Debian's nginx, and `trioproxy._bench.relay`.
REFERENCES = ("nginx", "trio-relay")
#: A phase's (CPU ms per stream, added TTFT p50 ms, streams/s).
Figures = tuple[float, float, float]


async def measure(
    settings: BenchSettings, repeat: int, *, redis: bool = False, references: Sequence[str] = ()
) -> dict[int, dict[str, list[Figures]]]:
    """The figures of each phase, by concurrency and target: trioproxy, then each of the `references` (`REFERENCES`)."""
    figures: dict[int, dict[str, list[Figures]]] = {}
    pinning = plan_pinning(external_proxy=False)
    with tempfile.TemporaryDirectory(prefix="trioproxy-cpu-") as tmp, pinned_self(pinning.others):
        work = Path(tmp)
        async with AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(start_bench_upstream(settings, pinning, work))
            config = work / "trioproxy.toml"
            limit = max(settings.concurrency)
            if redis:  # what sharing the limits and the breakers costs each stream
                url = await stack.enter_async_context(start_redis(cpus=pinning.others, log_dir=work))
                # A phase starts as the last ends, before the proxy gave all its places back to Redis.
                text = proxy_config(upstream.url, limit, max_streams=2 * limit) + f'[redis]\nurl = "{url}"\n'
            else:
                text = proxy_config(upstream.url, limit)
            config.write_text(text)
            proxy = await stack.enter_async_context(start_proxy(config, cpus=pinning.proxy, log_dir=work))
            direct, through = _targets(settings, upstream, proxy)
            proxies = [through]
            for name in references:  # on the same CPU, idle while trioproxy is measured, and the other way round
                if name == "nginx":
                    started = start_nginx(upstream.url, limit, cpus=pinning.proxy, log_dir=work)
                else:
                    started = start_relay(upstream.url, cpus=pinning.proxy, log_dir=work)
                child = await stack.enter_async_context(started)
                url = _chat_url(child.url)
                proxies.append(Target(name, "compare", url, "m", child.pid, worker_pids=child.worker_pids))
            loadgen = await stack.enter_async_context(start_loadgen(cpus=pinning.others, log_dir=work))
            bench = _Bench(settings, loadgen, upstream, [direct, *proxies])
            for _ in range(repeat):
                for concurrency in settings.concurrency:
                    floor = await bench.phase(direct, concurrency)
                    for target in proxies:
                        phase = await bench.phase(target, concurrency)
                        figures.setdefault(concurrency, {}).setdefault(target.name, []).append(_figures(phase, floor))
    return figures


def _figures(phase: PhaseReport, floor: PhaseReport) -> Figures:
    """A proxy's phase against the direct one before it; a `BenchError` if a stream failed or a token went astray."""
    for report in (floor, phase):
        figures = report.figures
        astray = figures.lost + figures.duplicated + figures.reordered
        if figures.errors or astray:
            examples = "".join(f"; {example}" for example in figures.error_examples)
            raise BenchError(
                f"{report.target} at {report.concurrency} streams: {figures.errors} failed, {astray} tokens lost, "
                f"duplicated or reordered{examples}"
            )
    cpu = phase.resources.proxy_cpu_ms_per_stream
    ttft, ttft_floor = phase.figures.ttft_ms.p50, floor.figures.ttft_ms.p50
    if cpu is None or ttft is None or ttft_floor is None:
        raise BenchError(f"no figures at {phase.concurrency} streams: {phase.figures.error_examples}")
    return cpu, ttft - ttft_floor, phase.figures.streams_per_s


def summary(figures: dict[int, dict[str, list[Figures]]]) -> str:
    """Each concurrency's medians, target by target, with every phase's figure; trioproxy's CPU over each reference."""
    lines = [
        "streams  target      CPU ms/stream (median: each phase)   added TTFT p50 ms (median: each phase)   streams/s"
    ]
    for concurrency, targets in sorted(figures.items()):
        medians = {}
        for name, phases in targets.items():
            cpu, ttft, rate = ([phase[i] for phase in phases] for i in range(3))
            medians[name] = statistics.median(cpu)
            lines.append(
                f"{concurrency:>7}  {name:<10} {medians[name]:6.2f}: {' '.join(f'{v:.2f}' for v in cpu):<24}"
                f"  {statistics.median(ttft):7.2f}: {' '.join(f'{v:.1f}' for v in ttft):<24}"
                f"  {statistics.median(rate):6.1f}"
            )
        trioproxy = medians["trioproxy"]
        for name in REFERENCES:
            if name in medians:
                lines.append(
                    f"{'':>18} trioproxy / {name} CPU per stream: {trioproxy:.2f} / {medians[name]:.2f}"
                    f" = {trioproxy / medians[name]:.1f}x"
                )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=_concurrency_list, default=(50,), help="comma-separated (default 50)")
    parser.add_argument("--repeat", type=_positive_int, default=5, help="phases per concurrency (default 5)")
    parser.add_argument("--redis", action="store_true", help="with [redis], on a redis-server it starts")
    parser.add_argument("--staggered", action="store_true", help="streams start spread out, as steady traffic")
    parser.add_argument(
        "--reference",
        action="append",
        choices=REFERENCES,
        default=[],
        help="also measure Debian's nginx (/usr/sbin/nginx) or the bare relay on trio in the same phases (repeatable)",
    )
    args = parser.parse_args(argv)
    settings = BenchSettings(concurrency=args.concurrency, buffer=False, plot=False, staggered=args.staggered)
    try:
        figures = trio.run(
            functools.partial(measure, settings, args.repeat, redis=args.redis, references=args.reference)
        )
    except BenchError as exc:
        print(f"cpu_per_stream: {exc}", file=sys.stderr)
        return 1
    print(summary(figures))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
