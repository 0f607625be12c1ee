"""
The PNG: latency against concurrency, one line per target, so the gap between the direct
connection (the floor), trioproxy and any compared proxy shows at a glance.

matplotlib is an optional dependency (the `bench` extra); `report` imports this module only
when a plot is wanted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .results import Report
from .stats import PhaseFigures

#: Each panel: its title and the figure it plots, in ms.
PANELS: list[tuple[str, Callable[[PhaseFigures], float | None]]] = [
    ("time to first token, p50", lambda figures: figures.ttft_ms.p50),
    ("time to first token, p99", lambda figures: figures.ttft_ms.p99),
    ("inter-token latency, p99", lambda figures: figures.itl_ms.p99),
]


def write_plot(report: Report, path: Path) -> Path:
    """Draw the three panels side by side and save them to `path`."""
    figure = Figure(figsize=(15, 4.8), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas, explicitly: no display, no pyplot global state
    axes = figure.subplots(1, len(PANELS))
    levels = sorted({phase.concurrency for phase in report.sweep})
    for ax, (title, value) in zip(axes, PANELS, strict=True):
        for target in report.targets:
            points = sorted(
                (phase.concurrency, value(phase.figures))
                for phase in report.sweep
                if phase.target == target.name and value(phase.figures) is not None
            )
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=target.name)
        if len(levels) > 1 and levels[-1] / levels[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    settings = report.settings
    starts = "streams started spread out" if settings.staggered else "each phase's streams started together"
    figure.suptitle(
        f"trioproxy bench: {settings.tokens} tokens, first after {settings.ttft_ms:g} ms, "
        f"then every {settings.interval_ms:g} ms; {starts} "
        f"({report.machine['cpu_model']}, {report.machine['cpus_usable']} CPUs)"
    )
    figure.savefig(path, dpi=110)
    return path
