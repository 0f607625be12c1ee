"""The report: what a proxy adds is measured against the direct connection of its own front."""

from __future__ import annotations

from trioproxy._bench.options import BenchSettings
from trioproxy._bench.processes import Pinning
from trioproxy._bench.report import added_latency, render
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
