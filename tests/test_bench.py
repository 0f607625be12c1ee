"""
`trioproxy bench --quick --fronts openai,anthropic` as a user runs it: real processes on
127.0.0.1, then the report's structure and the counts the workload fixes (streams, tokens,
gaps, chunks), for both client protocols. Timings are not checked (they depend on the
machine); that nothing was lost is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import trio

from tests.conftest import QUICK_BENCH_BOUND
from trioproxy._bench.processes import child_env

TARGET_FIGURES = ("ttft_ms", "itl_ms", "duration_ms", "streams_per_s", "tokens_per_s", "errors", "lost")
BUFFER_MODES = {"off", "size", "word", "sentence", "timer"}
#: `--quick` streams per phase: max(2, ceil(10 / N)) rounds on each of N connections.
QUICK_STREAMS = {1: 10, 10: 20}
#: Both client protocols, each direct and through trioproxy.
FRONTS = ("--fronts", "openai,anthropic")
#: `--quick` tokens per stream (so each stream has one gap fewer).
QUICK_TOKENS = 16


async def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    with trio.fail_after(QUICK_BENCH_BOUND):
        result = await trio.run_process(
            [sys.executable, "-m", "trioproxy", "bench", "--quick", *FRONTS, "--output", str(tmp_path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_env(),  # the child imports this trioproxy even where it is not installed
        )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]

    # The checks run in the test's event loop: the files are read through trio.Path's threads.
    [json_path] = await trio.Path(tmp_path).glob("bench-*.json")
    report = orjson.loads(await json_path.read_bytes())
    assert {"cpu_model", "cpu_count", "memory_mb", "kernel", "python"} <= report["machine"].keys()
    assert {"trioproxy", "trio", "httpx", "hypercorn", "quart", "h11"} <= report["versions"].keys()
    assert report["proxy_startup_s"] > 0

    targets = [target["name"] for target in report["targets"]]
    assert targets == ["direct", "trioproxy", "direct-anthropic", "trioproxy-anthropic"]
    phases = {(phase["target"], phase["concurrency"]): phase for phase in report["sweep"]}
    assert set(phases) == {(target, concurrency) for target in targets for concurrency in (1, 10)}
    for (target, concurrency), phase in phases.items():
        figures = phase["figures"]
        assert all(figures[name] is not None for name in TARGET_FIGURES), (target, concurrency)
        assert {"p50", "p90", "p99"} <= figures["ttft_ms"].keys()
        streams = QUICK_STREAMS[concurrency]
        assert figures["streams"] == streams >= concurrency
        assert (figures["ttft_ms"]["count"], figures["duration_ms"]["count"]) == (streams, streams)
        assert figures["itl_ms"]["count"] == streams * (QUICK_TOKENS - 1)
        assert (figures["errors"], figures["lost"], figures["reordered"], figures["duplicated"]) == (0, 0, 0, 0), (
            target, concurrency, figures["error_examples"],
        )  # fmt: skip
        assert figures["tokens"] == figures["streams"] * QUICK_TOKENS
        resources = phase["resources"]
        assert resources["loadgen_cpu_s"] >= 0
        assert resources["upstream_cpu_s"] >= 0
        if target.startswith("trioproxy"):
            assert resources["proxy_cpu_ms_per_stream"] >= 0
            assert resources["proxy_peak_rss_mb"] > 0
    added = {(row["target"], row["front"], row["concurrency"]) for row in report["added"]}
    assert added == {
        (target, front, concurrency)
        for target, front in (("trioproxy", "openai"), ("trioproxy-anthropic", "anthropic"))
        for concurrency in (1, 10)
    }

    modes = {mode["mode"]: mode["figures"] for mode in report["buffer"]}
    assert set(modes) == BUFFER_MODES
    for mode, figures in modes.items():
        assert figures["errors"] == 0, mode
        assert figures["lost"] == 0, mode
        numbers = [figures[name] for name in ("p50_ms", "p99_ms", "max_ms", "chunks_per_stream", "chunks_per_s")]
        assert all(number is not None and number >= 0 for number in numbers), (mode, figures)
        assert figures["streams"] == 12  # 4 connections, 3 rounds each
    # Without a buffer every token is a chunk; by sentence (the text has no sentence end) the
    # whole answer is one.
    assert (modes["off"]["chunks_per_stream"], modes["sentence"]["chunks_per_stream"]) == (QUICK_TOKENS, 1)

    [png] = await trio.Path(tmp_path).glob("bench-*.png")
    assert (await png.read_bytes()).startswith(b"\x89PNG\r\n\x1a\n")
    for target in targets:
        assert target in stdout
    assert "Buffer latency" in stdout
    assert "added latency by front" in stdout
    assert "concurrency 10" in stderr  # progress goes to stderr while it runs
