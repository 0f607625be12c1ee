#!/usr/bin/env python3
"""
Latency against concurrency: the direct connection to the benchmark upstream (the floor),
trioproxy, and any other OpenAI-compatible proxy, measured side by side in one run.

For each concurrency of the sweep: time to first token p50/p90/p99 and what each proxy adds
over direct, inter-token latency p50/p99 and what it adds, stream duration, streams/s and
tokens/s, errors and lost/duplicated/reordered tokens, the proxy's CPU per stream and peak
RSS, and the upstream's and load generator's own CPU (were they the bottleneck?). With
--find-max, the concurrency is doubled until streams suffer.

    python benchmarks/latency_sweep.py                               # 1, 50, 200 streams
    python benchmarks/latency_sweep.py --concurrency 1,100,500,1000 --find-max
    python benchmarks/latency_sweep.py --upstream-port 9000 --compare http://127.0.0.1:4000

This is `trioproxy bench` without the buffer modes; the engine is `trioproxy/_bench/`.
Results (JSON and PNG) go to benchmarks/results/ unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runs from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trioproxy._bench.options import add_arguments, settings_from_args
from trioproxy._bench.runner import main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(settings_from_args(parser.parse_args(argv), buffer=False, name="latency-sweep"))


if __name__ == "__main__":
    sys.exit(cli())
