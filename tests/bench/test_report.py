"""The report: what a proxy adds is measured against the direct connection of its own front."""

from __future__ import annotations

from trioproxy._bench.options import BenchSettings
from trioproxy._bench.processes import Pinning
from trioproxy._bench.report import added_latency, render, scaling
from trioproxy._bench.results import PhaseReport, Report, Resources, Target
from trioproxy._bench.stats import StreamRecord, phase_figures

MACHINE = {"cpu_model": "test CPU", "cpus_usable": 2, "memory_mb": 1024, "kernel": "k", "python": "3"}


def phase(target: str, ttft_ms: float, gap_ms: float) -> PhaseReport:
    """Ten streams at concurrency 1, each with this TTFT and every gap this long."""
    record = StreamRecord(None, ttft_ms / 1000, 0.5, [round(gap_ms * 1000)] * 3, 4, 4, 0, 0, 0)
    figures = phase_figures([record] * 10, 10, 1.0)
    return PhaseReport(target, 1, 10, figures, Resources(None, None, None, None, 0.0))


def report_of(*phases: PhaseReport) -> Report:
    return Report(
        settings=BenchSettings(concurrency=(1,), fronts=("openai", "anthropic")),
        machine=MACHINE,
        versions={"trioproxy": "0"},
        pinning=Pinning(None, None),
        open_files_limit=1024,
        proxy_startup_s=None,
        targets=[
            Target("direct", "direct", "http://u/v1/chat/completions", "m"),
            Target("trioproxy", "trioproxy", "http://p/v1/chat/completions", "up/m"),
            Target("direct-anthropic", "direct", "http://u/v1/messages", "m", front="anthropic"),
            Target("trioproxy-anthropic", "trioproxy", "http://p/v1/messages", "up-anthropic/m", front="anthropic"),
        ],
        sweep=list(phases),
        find_max=[],
        buffer=[],
        duration_s=1.0,
    )


def test_each_front_is_compared_with_its_own_direct_connection_and_shown_side_by_side() -> None:
    report = report_of(
        phase("direct", 50.0, 20.0),
        phase("trioproxy", 52.0, 20.5),
        phase("direct-anthropic", 60.0, 20.0),
        phase("trioproxy-anthropic", 63.0, 21.0),
    )

    added = [(r["target"], r["front"], r["ttft_ms"]["p50"], r["itl_ms"]["p50"]) for r in added_latency(report)]
    assert added == [("trioproxy", "openai", 2.0, 0.5), ("trioproxy-anthropic", "anthropic", 3.0, 1.0)]
    text = render(report)
    title = "trioproxy's added latency by front"
    assert title in text
    side_by_side = text.split(title)[1].splitlines()
    assert side_by_side[1].split()[:3] == ["conc", "openai", "TTFT"]
    assert side_by_side[2].split() == ["1", "+2.0", "+2.0", "+0.5", "+0.5", "+3.0", "+3.0", "+1.0", "+1.0"]


def test_one_front_has_no_side_by_side_table() -> None:
    report = report_of(phase("direct", 50.0, 20.0), phase("trioproxy", 52.0, 20.5))
    one_front = Report(**{**report.__dict__, "settings": BenchSettings(concurrency=(1,))})
    assert "by front" not in render(one_front)


def test_websocket_mode_is_compared_with_the_direct_responses_stream() -> None:
    report = report_of(phase("direct-responses", 50.0, 20.0), phase("trioproxy-responses-ws", 51.5, 20.25))
    targets = [
        Target("direct-responses", "direct", "http://u/v1/responses", "m", front="responses"),
        Target("trioproxy-responses-ws", "trioproxy", "http://p/v1/responses", "up-responses/m", front="responses-ws"),
    ]
    settings = BenchSettings(concurrency=(1,), fronts=("responses", "responses-ws"))
    report = Report(**{**report.__dict__, "targets": targets, "settings": settings})

    added = [(r["target"], r["front"], r["ttft_ms"]["p50"], r["itl_ms"]["p50"]) for r in added_latency(report)]
    assert added == [("trioproxy-responses-ws", "responses-ws", 1.5, 0.25)]
    side_by_side = render(report).split("trioproxy's added latency by front")[1].splitlines()
    assert side_by_side[2].split() == ["1", "-", "-", "-", "-", "+1.5", "+1.5", "+0.2", "+0.2"]


def scaled_phase(
    target: str, streams_per_s: float, cpu_s: float, worker_cpu_s: tuple[float, ...] = (), loadgen_cpu_s: float = 0.2
) -> PhaseReport:
    """200 streams at concurrency 200, over the wall time that makes `streams_per_s`."""
    record = StreamRecord(None, 0.05, 1.3, [20_000] * 3, 4, 4, 0, 0, 0)
    figures = phase_figures([record] * 200, 200, 200 / streams_per_s)
    supervisor = cpu_s - sum(worker_cpu_s) if worker_cpu_s else None
    resources = Resources(cpu_s, cpu_s * 1000 / 200, None, 0.1, loadgen_cpu_s, worker_cpu_s, supervisor)
    return PhaseReport(target, 200, 1, figures, resources)


def workers_report(scaled: PhaseReport) -> Report:
    """direct, one process and `scaled` (two workers) at 200 streams."""
    return Report(
        **{
            **report_of().__dict__,
            "settings": BenchSettings(concurrency=(200,), workers=2),
            "targets": [
                Target("direct", "direct", "http://u/v1/chat/completions", "m"),
                Target("trioproxy", "trioproxy", "http://p/v1/chat/completions", "up/m", 10),
                Target("trioproxy-2w", "trioproxy", "http://q/v1/chat/completions", "up/m", 20, worker_pids=(21, 22)),
            ],
            "sweep": [scaled_phase("direct", 300.0, 0.0), scaled_phase("trioproxy", 125.0, 1.5), scaled],
        }
    )


def test_workers_are_compared_with_one_process_and_with_what_the_workload_asked() -> None:
    report = workers_report(scaled_phase("trioproxy-2w", 225.0, 1.704, worker_cpu_s=(0.68, 1.02)))

    [row] = scaling(report)
    assert row["ratio"] == 1.8
    assert row["saturated"] == {"1": True, "2": True}
    text = render(report).split("Workers: one process against `serve --workers 2`")[1]
    [scaled] = [line for line in text.splitlines() if line.startswith("trioproxy-2w ")]
    # workers, conc, streams/s, CPU ms/stream (the workers' and the supervisor's), cores, split, supervisor ms
    assert scaled.split()[1:8] == ["2", "200", "225.0", "8.52", "1.92", "40/60", "4.0"]
    assert "at 200 streams: 2 workers 1.80x the streams/s of 1 (225.0 against 125.0; direct 300.0; " in text
    assert "WARNING" not in text


def test_a_load_generator_near_its_one_core_is_flagged_in_the_workers_table() -> None:
    # 0.8 CPU s over the 0.889 s that 200 streams at 225 a second take
    busy = scaled_phase("trioproxy-2w", 225.0, 1.704, worker_cpu_s=(0.68, 1.02), loadgen_cpu_s=0.8)
    text = render(workers_report(busy))
    assert "WARNING: the load generator used 0.90 of its one core during trioproxy-2w at 200" in text
