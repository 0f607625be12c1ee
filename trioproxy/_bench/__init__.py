"""
The engine behind `trioproxy bench` and the scripts in `benchmarks/`.

It lives inside the package (not only in `benchmarks/`) so that `trioproxy bench` works from
an installed wheel. One job per module:

- `stats`: pure functions: percentiles, the token-sequence check, a phase's figures.
- `upstream`: the benchmark upstream behind `trioproxy upstream`.
- `loadgen`: the load generator, a separate process driving HTTP/1.1 streams.
- `http1`: the sans-IO HTTP/1.1 (heads, body framing) those two share.
- `processes`: starting, pinning, measuring and always killing the child processes.
- `machine`: what the run ran on (CPU, memory, kernel, versions).
- `runner`: the order of a run: targets, the concurrency sweep, find-max, buffer modes.
- `report`: the terminal tables and the JSON file; `plot`: the PNG.
- `options`: the command-line flags, shared by `trioproxy bench` and `benchmarks/*.py`.

This module imports nothing, so `python -m trioproxy._bench.loadgen` starts without
importing the rest of the engine.
"""
