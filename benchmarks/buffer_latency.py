#!/usr/bin/env python3
"""
Buffer latency: how long text waits inside trioproxy in each buffering mode, and the chunk
rate a client sees.

Each mode streams through the generic NDJSON endpoint (`/v1/chat/stream/json`) with its
`buffer_config`; the proxy measures every chunk's wait itself (from the token's arrival from
the upstream to the chunk's hand-over to the client) and reports it in the stream's `done`
event. Per mode: the median of the streams' p50s, the largest p99 and maximum, the chunks per
stream and the chunks per second a client receives.

    off       no buffer: tokens pass straight through
    size      min_chunk_size = 20
    word      buffer_by_word = true
    sentence  buffer_by_sentence = true (the benchmark text has no sentence ends, so this is
              the worst case: everything waits for the end of the stream)
    timer     min_chunk_size = 1000, flush_interval_ms = 50 (the timer alone decides)

    python benchmarks/buffer_latency.py                         # 20 concurrent streams a mode
    python benchmarks/buffer_latency.py --buffer-concurrency 200 --interval-ms 5

This is `trioproxy bench` without the latency sweep; the engine is `trioproxy/_bench/`.
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
    return main(settings_from_args(parser.parse_args(argv), sweep=False, find_max=False, name="buffer-latency"))


if __name__ == "__main__":
    sys.exit(cli())
