"""
`trioproxy bench --workers 2` as a user runs it: one trioproxy process and one of two workers
measured in the same run against the same upstream and load generator, with real processes
on 127.0.0.1. Timings are not checked (they depend on the machine); what is counted is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest
import trio

from tests.conftest import QUICK_BENCH_BOUND
from trioproxy._bench.processes import child_env

CONCURRENCY = (1, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's per-process CPU clocks")
async def test_one_process_and_two_workers_are_measured_with_the_cpu_of_every_worker(tmp_path: Path) -> None:
    argv = ["bench", "--quick", "--workers", "2", "--concurrency", ",".join(map(str, CONCURRENCY)), "--no-plot"]
    with trio.fail_after(QUICK_BENCH_BOUND):
        result = await trio.run_process(
            [sys.executable, "-m", "trioproxy", *argv, "--output", str(tmp_path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_env(),
        )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]

    [json_path] = await trio.Path(tmp_path).glob("bench-*.json")  # read through trio.Path's threads
    report = orjson.loads(await json_path.read_bytes())
    targets = {target["name"]: target for target in report["targets"]}
    assert list(targets) == ["direct", "trioproxy", "trioproxy-2w"]
    supervisor, workers = targets["trioproxy-2w"]["pid"], targets["trioproxy-2w"]["worker_pids"]
    assert len(set(workers)) == 2
    assert supervisor not in workers
    assert targets["trioproxy"]["worker_pids"] == []
    assert report["workers_startup_s"] > 0

    phases = {(phase["target"], phase["concurrency"]): phase for phase in report["sweep"]}
    assert set(phases) == {(target, concurrency) for target in targets for concurrency in CONCURRENCY}
    for concurrency in CONCURRENCY:
        one = phases["trioproxy", concurrency]["resources"]
        scaled = phases["trioproxy-2w", concurrency]["resources"]
        assert (one["worker_cpu_s"], one["supervisor_cpu_s"]) == ([], None)
        assert len(scaled["worker_cpu_s"]) == 2
        assert scaled["proxy_cpu_s"] == pytest.approx(scaled["supervisor_cpu_s"] + sum(scaled["worker_cpu_s"]))
        # The same streams cost two workers about what they cost one process: counting the
        # supervisor alone (it serves nothing) or one worker of two would read far less.
        assert scaled["proxy_cpu_s"] > 0.6 * one["proxy_cpu_s"], (concurrency, one, scaled)
        figures = phases["trioproxy-2w", concurrency]["figures"]
        assert (figures["errors"], figures["lost"]) == (0, 0), figures["error_examples"]

    assert [(row["concurrency"], row["workers"]) for row in report["scaling"]] == [(1, 2), (4, 2)]
    assert all(row["ratio"] > 0 for row in report["scaling"])
    assert "Workers: one process against `serve --workers 2`" in stdout
    assert "at 4 streams: 2 workers " in stdout
