"""
The report of a run: plain-text tables for the terminal, and the JSON file with every figure.

Tables are plain text (no colour, no box drawing) so they paste unchanged into an issue, a
commit message or a README.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from .options import DIRECT_FRONT
from .processes import PACKAGE_ROOT
from .results import PhaseReport, Report
from .stats import PhaseFigures, difference


def added_latency(report: Report) -> list[dict[str, Any]]:
    """
    What each proxy adds over the direct connection of its front (the upstream's own route for
    the same protocol; for WebSocket mode, its Responses route), per concurrency: TTFT and
    ITL, p50 and p99.
    """
    targets = {target.name: target for target in report.targets}
    direct = {
        (targets[phase.target].front, phase.concurrency): phase.figures
        for phase in report.sweep
        if targets[phase.target].kind == "direct"
    }
    added = []
    for phase in report.sweep:
        target = targets[phase.target]
        floor = direct.get((DIRECT_FRONT.get(target.front, target.front), phase.concurrency))
        if target.kind == "direct" or floor is None:
            continue
        added.append(
            {
                "target": phase.target,
                "front": target.front,
                "concurrency": phase.concurrency,
                "ttft_ms": _added(phase.figures.ttft_ms, floor.ttft_ms),
                "itl_ms": _added(phase.figures.itl_ms, floor.itl_ms),
            }
        )
    return added


def _added(proxied: Any, direct: Any) -> dict[str, float | None]:
    return {"p50": difference(proxied.p50, direct.p50), "p99": difference(proxied.p99, direct.p99)}


#: A proxy whose streams/s stay within this fraction of the direct connection's, at the same
#: concurrency, served what the workload asked: its capacity is not reached, only bounded below.
SATURATED_BELOW = 0.9
#: The upstream and the load generator are one process each: past this share of a core, what
#: they can carry, not the proxy, may be what a phase measured.
HARNESS_BOUND = 0.8


def scaling(report: Report) -> list[dict[str, Any]]:
    """
    With `--workers N`, per front and concurrency: the streams/s of one trioproxy process and
    of N workers, their ratio, the direct connection's streams/s (what the workload asks at
    that concurrency), and whether each proxy fell short of it (saturated: its streams/s is
    its capacity; else the ratio says only that N workers kept up).
    """
    phases = {(phase.target, phase.concurrency): phase.figures for phase in report.sweep}
    rows = []
    for scaled in (target for target in report.targets if target.workers > 1):
        [one] = [t for t in report.targets if t.kind == "trioproxy" and t.workers == 1 and t.front == scaled.front]
        [direct] = [t for t in report.targets if t.kind == "direct" and t.front == scaled.front]
        counts = ("1", str(scaled.workers))
        for concurrency in report.settings.concurrency:
            keys = [(one.name, concurrency), (scaled.name, concurrency), (direct.name, concurrency)]
            if not all(key in phases for key in keys):
                continue
            one_rate, scaled_rate, ceiling = (phases[key].streams_per_s for key in keys)
            rows.append(
                {
                    "front": scaled.front,
                    "concurrency": concurrency,
                    "workers": scaled.workers,
                    "streams_per_s": dict(zip(counts, (one_rate, scaled_rate), strict=True)),
                    "ratio": scaled_rate / one_rate if one_rate else None,
                    "direct_streams_per_s": ceiling,
                    "saturated": {count: rate < SATURATED_BELOW * ceiling
                                  for count, rate in zip(counts, (one_rate, scaled_rate), strict=True)},
                }
            )  # fmt: skip
    return rows


def to_json(report: Report) -> bytes:
    """Every figure, the settings, the machine and the versions, as indented JSON."""
    document = asdict(report)
    document["pinning"]["description"] = report.pinning.describe()
    document["added"] = added_latency(report)
    document["scaling"] = scaling(report)
    return orjson.dumps(document, default=str, option=orjson.OPT_INDENT_2)


def default_output_dir() -> Path:
    """`benchmarks/results/` of the checkout this code runs from, else `./trioproxy-bench/`."""
    if (PACKAGE_ROOT / "pyproject.toml").is_file() and (PACKAGE_ROOT / "benchmarks").is_dir():
        return PACKAGE_ROOT / "benchmarks" / "results"
    return Path.cwd() / "trioproxy-bench"


def write_outputs(report: Report) -> list[Path]:
    """Write the JSON (and the PNG unless `--no-plot`); return the paths written."""
    directory = report.settings.output or default_output_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{report.settings.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = stem.with_suffix(".json")
    json_path.write_bytes(to_json(report))
    written = [json_path]
    if report.settings.plot and report.sweep:
        try:
            from .plot import write_plot
        except ImportError:
            print(
                "trioproxy bench: no plot, matplotlib is not installed (pip install 'trioproxy[bench]')",
                file=sys.stderr,
            )
        else:
            written.append(write_plot(report, stem.with_suffix(".png")))
    return written


# --------------------------------------------------------------------------------------------
# Terminal tables


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def _number(value: float | None, digits: int = 1, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _header(report: Report) -> str:
    settings, machine = report.settings, report.machine
    lines = [
        f"trioproxy bench {report.versions['trioproxy']}: {settings.tokens} tokens a stream, the upstream's "
        f"first after {settings.ttft_ms:g} ms, then every {settings.interval_ms:g} ms",
        f"machine: {machine['cpu_model']}, {machine['cpus_usable']} CPUs, {machine['memory_mb']} MB, "
        f"{machine['kernel']}, {machine['python']}",
        f"pinning: {report.pinning.describe()}",
    ]
    if report.proxy_startup_s is not None:
        lines.append(f'trioproxy start-up: {report.proxy_startup_s:.2f} s (spawn to "listening on")')
    if report.workers_startup_s is not None:
        lines.append(f"trioproxy with {settings.workers} workers: {report.workers_startup_s:.2f} s to all serving")
    lines.append("targets: " + ", ".join(f"{target.name} {target.url}" for target in report.targets))
    return "\n".join(lines)


def _ordered(report: Report) -> list[PhaseReport]:
    order = {target.name: index for index, target in enumerate(report.targets)}
    return sorted(report.sweep, key=lambda phase: (phase.concurrency, order.get(phase.target, len(order))))


def latency_table(report: Report) -> str:
    added = {(row["target"], row["concurrency"]): row for row in added_latency(report)}
    rows = []
    for phase in _ordered(report):
        f, extra = phase.figures, added.get((phase.target, phase.concurrency))
        plus = [
            _number(extra[kind][p] if extra else None, signed=True)
            for kind in ("ttft_ms", "itl_ms")
            for p in ("p50", "p99")
        ]
        rows.append(
            [
                phase.target,
                str(phase.concurrency),
                _number(f.ttft_ms.p50),
                _number(f.ttft_ms.p90),
                _number(f.ttft_ms.p99),
                plus[0],
                plus[1],
                _number(f.itl_ms.p50),
                _number(f.itl_ms.p99),
                plus[2],
                plus[3],
                _number(f.duration_ms.p50, 0),
                _number(f.duration_ms.p99, 0),
            ]
        )
    headers = ["target", "conc", "TTFT p50", "p90", "p99", "+p50", "+p99", "ITL p50", "p99", "+p50", "+p99",
               "stream p50", "p99"]  # fmt: skip
    starts = (
        f"streams started spread over {report.settings.stream_s * 1000:.0f} ms"
        if report.settings.staggered
        else "each phase's streams started together"
    )
    title = f'Latency, ms ("+": added over direct at the same concurrency; {starts})'
    return f"{title}\n{table(headers, rows)}"


def fronts_table(report: Report) -> str:
    """trioproxy's added latency on each front side by side: what speaking one protocol or the other costs."""
    fronts = report.settings.fronts
    trioproxy = {target.name for target in report.targets if target.kind == "trioproxy"}
    added = {(row["front"], row["concurrency"]): row for row in added_latency(report) if row["target"] in trioproxy}
    rows = []
    for concurrency in sorted({phase.concurrency for phase in report.sweep}):
        row = [str(concurrency)]
        for front in fronts:
            extra = added.get((front, concurrency))
            row += [
                _number(extra[kind][p] if extra else None, signed=True)
                for kind in ("ttft_ms", "itl_ms")
                for p in ("p50", "p99")
            ]
        rows.append(row)
    headers = ["conc"]
    for front in fronts:
        headers += [f"{front} TTFT +p50", "+p99", "ITL +p50", "+p99"]
    title = "trioproxy's added latency by front, ms (each over the direct connection of the same protocol)"
    return f"{title}\n{table(headers, rows)}"


def throughput_table(report: Report) -> str:
    rows = []
    for phase in _ordered(report):
        f, r = phase.figures, phase.resources
        rows.append(
            [
                phase.target,
                str(phase.concurrency),
                str(f.streams),
                _number(f.streams_per_s),
                _number(f.tokens_per_s, 0),
                str(f.errors),
                f"{f.lost}/{f.duplicated}/{f.reordered}",
                _number(r.proxy_cpu_ms_per_stream, 2),
                _number(r.proxy_peak_rss_mb),
                _number(r.upstream_cpu_s, 2),
                _number(r.loadgen_cpu_s, 2),
            ]
        )
    headers = ["target", "conc", "streams", "streams/s", "tokens/s", "errors", "lost/dup/reord",
               "proxy CPU ms/stream", "proxy peak RSS MB", "upstream CPU s", "loadgen CPU s"]  # fmt: skip
    return f"Throughput, correctness, resources\n{table(headers, rows)}"


def workers_table(report: Report) -> str:
    """
    One process against N workers at each concurrency: throughput, CPU (every worker's and the
    supervisor's summed, and how it split between the workers), added TTFT, and the cores each
    side used: the proxy's say whether it got the cores it was given (on a shared machine it may
    not have), the upstream's and the load generator's that they were not the bottleneck.
    """
    added = {(row["target"], row["concurrency"]): row["ttft_ms"] for row in added_latency(report)}
    targets = {target.name: target for target in report.targets}
    rows = []
    for phase in _ordered(report):
        target = targets[phase.target]
        if target.kind == "compare":
            continue
        f, r, ttft = phase.figures, phase.resources, added.get((phase.target, phase.concurrency))
        rows.append(
            [
                phase.target,
                "-" if target.kind == "direct" else str(target.workers),
                str(phase.concurrency),
                _number(f.streams_per_s),
                _number(r.proxy_cpu_ms_per_stream, 2),
                _number(_share(r.proxy_cpu_s, f.wall_s), 2),
                _split(r.worker_cpu_s),
                _number(None if r.supervisor_cpu_s is None else r.supervisor_cpu_s * 1000, 1),
                _number(ttft["p50"] if ttft else None, signed=True),
                _number(ttft["p99"] if ttft else None, signed=True),
                _number(_share(r.upstream_cpu_s, f.wall_s), 2),
                _number(_share(r.loadgen_cpu_s, f.wall_s), 2),
            ]
        )
    headers = ["target", "workers", "conc", "streams/s", "CPU ms/stream", "proxy cores", "worker CPU %",
               "supervisor CPU ms", "TTFT +p50", "+p99", "upstream cores", "loadgen cores"]  # fmt: skip
    title = (
        f"Workers: one process against `serve --workers {report.settings.workers}`, same upstream and load generator "
        "(CPU: every worker and the supervisor, summed; cores: CPU s per wall s)"
    )
    lines = [_scaling_line(row) for row in scaling(report)]
    for phase in _ordered(report):
        r = phase.resources
        for side, cpu_s in (("upstream", r.upstream_cpu_s), ("load generator", r.loadgen_cpu_s)):
            cores = _share(cpu_s, phase.figures.wall_s)
            if cores is not None and cores >= HARNESS_BOUND:
                lines.append(f"WARNING: the {side} used {cores:.2f} of its one core during {phase.target} at "
                             f"{phase.concurrency}: it may have been the bottleneck, not the proxy")  # fmt: skip
    return "\n".join([title, table(headers, rows), *lines])


def _scaling_line(row: dict[str, Any]) -> str:
    one, many = "1", str(row["workers"])
    front = "" if row["front"] == "openai" else f" ({row['front']})"
    how = ", ".join(
        f"{count} worker{'s' if count != '1' else ''} {'saturated' if row['saturated'][count] else 'kept up'}"
        for count in (one, many)
    )
    return (
        f"at {row['concurrency']} streams{front}: {many} workers {_number(row['ratio'], 2)}x the streams/s of 1 "
        f"({_number(row['streams_per_s'][many])} against {_number(row['streams_per_s'][one])}; "
        f"direct {_number(row['direct_streams_per_s'])}; {how})"
    )


def _split(worker_cpu_s: tuple[float, ...]) -> str:
    """Each worker's part of the workers' CPU, in percent: how evenly the kernel spread the connections."""
    total = sum(worker_cpu_s)
    return "/".join(f"{100 * used / total:.0f}" for used in worker_cpu_s) if total else "-"


def _share(cpu_s: float | None, wall_s: float) -> float | None:
    return None if cpu_s is None or not wall_s else cpu_s / wall_s


def find_max_table(report: Report) -> str:
    rows = []
    for found in report.find_max:
        sustained = "none" if found.sustained is None else str(found.sustained)
        if found.bounded:
            sustained = f">= {sustained} (--max-concurrency)"
        stopped = f"at {found.failed_at}: {found.reason}" if found.failed_at is not None else "-"
        rows.append([found.target, sustained, stopped])
    title = "Largest sustained concurrency (no lost token, no stall over 10x the interval, errors <= 0.1%)"
    return f"{title}\n{table(['target', 'sustained', 'stopped by'], rows)}"


def buffer_table(report: Report) -> str:
    rows = []
    for mode in report.buffer:
        f = mode.figures
        config = ", ".join(f"{key}={value}" for key, value in (mode.buffer_config or {}).items()) or "-"
        rows.append(
            [
                mode.mode,
                config,
                str(f.streams),
                str(f.errors),
                f"{f.lost}/{f.duplicated}/{f.reordered}",
                _number(f.p50_ms, 2),
                _number(f.p99_ms, 2),
                _number(f.max_ms, 2),
                _number(f.chunks_per_stream, 0),
                _number(f.chunks_per_s),
            ]
        )
    headers = ["mode", "buffer_config", "streams", "errors", "lost/dup/reord", "wait p50 ms", "p99", "max",
               "chunks/stream", "chunks/s"]  # fmt: skip
    concurrency = report.buffer[0].concurrency
    title = f"Buffer latency: how long text waits inside trioproxy ({concurrency} concurrent streams, generic NDJSON)"
    return f"{title}\n{table(headers, rows)}"


def _warnings(report: Report) -> list[str]:
    """Streams that failed or lost tokens: the figures above them are not to be trusted."""
    warnings = []
    for phase in report.sweep:
        f: PhaseFigures = phase.figures
        if f.errors or f.lost or f.duplicated or f.reordered:
            warnings.append(
                f"WARNING: {phase.target} at {phase.concurrency}: {f.errors} errors, "
                f"{f.lost}/{f.duplicated}/{f.reordered} lost/duplicated/reordered tokens "
                f"({'; '.join(f.error_examples) or 'no error message'})"
            )
    return warnings


def render(report: Report) -> str:
    """The whole terminal report."""
    sections = [_header(report)]
    if report.sweep:
        sections += [latency_table(report), throughput_table(report)]
        if len(report.settings.fronts) > 1:
            sections.append(fronts_table(report))
        if report.settings.workers is not None:
            sections.append(workers_table(report))
    if report.find_max:
        sections.append(find_max_table(report))
    if report.buffer:
        sections.append(buffer_table(report))
    if warnings := _warnings(report):
        sections.append("\n".join(warnings))
    sections.append(f"({report.duration_s:.0f} s in all)")
    return "\n\n".join(sections)


def print_report(report: Report) -> None:
    print(render(report), flush=True)
