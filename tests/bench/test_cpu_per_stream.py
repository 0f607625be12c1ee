"""
`benchmarks/cpu_per_stream.py`: trioproxy and, with `--reference nginx`, nginx measured in the
same phases against the same upstream and load generator, and the summary of their medians.
Timings are not checked (they depend on the machine); what is counted is.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trioproxy._bench import processes
from trioproxy._bench.options import BenchSettings
from trioproxy._bench.processes import BenchError
from trioproxy._bench.results import PhaseReport, Resources
from trioproxy._bench.stats import StreamRecord, phase_figures

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_per_stream.py"
#: A stream that delivered its 2 tokens.
STREAM = {
    "error": None,
    "ttft_s": 0.05,
    "duration_s": 0.1,
    "gaps_us": [50_000],
    "tokens": 2,
    "chunks": 2,
    "lost": 0,
    "duplicated": 0,
    "reordered": 0,
}


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_per_stream", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_gives_each_target_s_medians_and_trioproxy_s_cpu_as_a_ratio_to_nginx_s(script: ModuleType) -> None:
    figures = {
        50: {
            "trioproxy": [(8.0, 3.0, 38.0), (7.8, 2.0, 37.0), (7.0, 4.0, 36.0)],
            "nginx": [(1.5, 0.5, 38.0), (1.3, 0.4, 38.0), (1.2, 0.6, 38.0)],
        }
    }
    lines = script.summary(figures).splitlines()

    assert lines[1].split() == [
        "50",
        "trioproxy",
        "7.80:",
        "8.00",
        "7.80",
        "7.00",
        "3.00:",
        "3.0",
        "2.0",
        "4.0",
        "37.0",
    ]
    assert lines[2].split() == ["50", "nginx", "1.30:", "1.50", "1.30", "1.20", "0.50:", "0.5", "0.4", "0.6", "38.0"]
    assert lines[3].strip() == "trioproxy / nginx CPU per stream: 7.80 / 1.30 = 6.0x"


def test_each_reference_gets_its_ratio_line_in_a_fixed_order(script: ModuleType) -> None:
    figures = {
        200: {
            "trioproxy": [(6.0, 3.0, 100.0)],
            "trio-relay": [(3.0, 0.5, 110.0)],
            "nginx": [(1.5, 0.1, 114.0)],
        }
    }
    ratios = [line.strip() for line in script.summary(figures).splitlines() if " / " in line]

    assert ratios == [
        "trioproxy / nginx CPU per stream: 6.00 / 1.50 = 4.0x",
        "trioproxy / trio-relay CPU per stream: 6.00 / 3.00 = 2.0x",
    ]


def test_without_a_reference_the_summary_has_no_ratio(script: ModuleType) -> None:
    summary = script.summary({1: {"trioproxy": [(40.0, 2.0, 0.8)]}})
    assert len(summary.splitlines()) == 2
    assert " / " not in summary


@pytest.mark.parametrize(("fault", "said"), [({"lost": 1}, "1 tokens lost"), ({"error": "HTTP 502"}, "1 failed")])
def test_a_phase_where_a_stream_failed_or_lost_a_token_gives_no_cpu_figure(
    script: ModuleType, fault: dict[str, object], said: str
) -> None:
    def phase(target: str, **fields: object) -> PhaseReport:
        stream = StreamRecord(**{**STREAM, **fields})  # type: ignore[arg-type]
        resources = Resources(0.01, 1.0, None, None, 0.0)
        return PhaseReport(target, 1, 1, phase_figures([stream], 1, wall_s=1.0), resources)

    assert script._figures(phase("nginx"), phase("direct")) == (1.0, 0.0, 1.0)
    with pytest.raises(BenchError, match=f"nginx at 1 streams: .*{said}"):
        script._figures(phase("nginx", **fault), phase("direct"))
    with pytest.raises(BenchError, match=f"direct at 1 streams: .*{said}"):
        script._figures(phase("nginx"), phase("direct", **fault))


def test_a_missing_nginx_stops_the_run_with_how_to_install_it(
    script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(processes, "NGINX", tmp_path / "no-nginx")
    assert script.cli(["--reference", "nginx", "--concurrency", "1", "--repeat", "1"]) == 1
    assert "apt-get install nginx-light (or nginx)" in capsys.readouterr().err


NGINX_MISSING = pytest.mark.skipif(
    not processes.NGINX.exists(), reason="Debian's nginx is not installed (apt-get install nginx-light)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's per-process CPU clocks")
@pytest.mark.parametrize("reference", [pytest.param("nginx", marks=NGINX_MISSING), "trio-relay"])
async def test_a_reference_is_measured_in_the_same_phases_as_trioproxy(script: ModuleType, reference: str) -> None:
    settings = BenchSettings(concurrency=(1, 4), tokens=16, ttft_ms=20, interval_ms=5, buffer=False, plot=False)
    figures = await script.measure(settings, 1, references=[reference])  # raises if a stream failed or lost a token

    assert {concurrency: list(targets) for concurrency, targets in figures.items()} == {
        1: ["trioproxy", reference],
        4: ["trioproxy", reference],
    }
    for targets in figures.values():
        [(cpu, _, rate)] = targets[reference]
        assert cpu > 0
        assert rate > 0
