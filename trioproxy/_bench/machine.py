"""
What a run ran on. Latency figures mean little without the machine and the versions behind
them, so every report carries both.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

from .._version import __version__

#: The distributions whose versions shape the figures.
_DISTRIBUTIONS = ("trio", "httpx", "hypercorn", "quart", "quart-trio", "h11", "orjson")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def machine_info() -> dict[str, object]:
    """CPU model, CPU counts, memory, kernel and Python (what /proc and the platform tell)."""
    cpu_model = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    memory = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model.group(1).strip() if cpu_model else platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_mb": round(int(memory.group(1)) / 1024) if memory else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def versions() -> dict[str, str | None]:
    """trioproxy's version and those of the libraries on its hot path (None: not installed)."""
    found: dict[str, str | None] = {"trioproxy": __version__}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
