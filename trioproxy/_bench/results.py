"""
What a run measured: plain dataclasses, shared by the runner that fills them and the report
and plot that show them (and turned into the JSON file as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .options import BenchSettings, Front
from .processes import Pinning
from .stats import BufferFigures, PhaseFigures


@dataclass(frozen=True)
class Target:
    """Something to stream from: the upstream itself, trioproxy, or another proxy."""

    name: str
    kind: Literal["direct", "trioproxy", "compare"]
    #: The URL streams are sent to: the front's route (Chat Completions, Messages or Responses).
    url: str
    model: str
    #: The process whose CPU and memory are measured (a trioproxy this run started), if any.
    pid: int | None = None
    #: The client protocol streams speak: what the target adds is measured against the direct
    #: connection of the same front.
    front: Front = "openai"
    #: Its worker processes, under `serve --workers` (`pid` is then their supervisor): their
    #: CPU is the proxy's, summed with the supervisor's.
    worker_pids: tuple[int, ...] = ()

    @property
    def workers(self) -> int:
        """How many processes serve the target's streams (1 for one process, or what is not ours)."""
        return len(self.worker_pids) or 1


@dataclass(frozen=True)
class Resources:
    """CPU and memory around one phase's measured part (None: not measurable for this target)."""

    proxy_cpu_s: float | None
    proxy_cpu_ms_per_stream: float | None
    proxy_peak_rss_mb: float | None
    upstream_cpu_s: float | None
    loadgen_cpu_s: float
    #: Under `serve --workers`: each worker's CPU, and the supervisor's (`proxy_cpu_s` sums them all).
    worker_cpu_s: tuple[float, ...] = ()
    supervisor_cpu_s: float | None = None


@dataclass(frozen=True)
class PhaseReport:
    target: str
    concurrency: int
    rounds: int
    figures: PhaseFigures
    resources: Resources


@dataclass(frozen=True)
class MaxReport:
    """The largest concurrency a target sustained, and what stopped the search."""

    target: str
    sustained: int | None
    #: The search reached `--max-concurrency` without a fault: the real limit is higher.
    bounded: bool
    failed_at: int | None
    reason: str | None
    tried: list[int]


@dataclass(frozen=True)
class BufferReport:
    mode: str
    buffer_config: dict[str, Any] | None
    concurrency: int
    figures: BufferFigures


@dataclass(frozen=True)
class Report:
    """Everything one run measured, and what it ran on."""

    settings: BenchSettings
    machine: dict[str, object]
    versions: dict[str, str | None]
    pinning: Pinning
    open_files_limit: int
    proxy_startup_s: float | None
    targets: list[Target]
    sweep: list[PhaseReport]
    find_max: list[MaxReport]
    buffer: list[BufferReport]
    duration_s: float
    #: With `--workers N`: spawn to the last of the N workers serving.
    workers_startup_s: float | None = None
