"""The bench's processes: CPU time read from /proc, the CPUs they are pinned to, the redis-server it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from trioproxy._bench.processes import cpu_seconds, plan_pinning, start_redis


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_seconds_resolve_less_than_a_clock_tick() -> None:
    # /proc/PID/stat counts in clock ticks (10 ms): 5 ms of work read 0 or 10 ms from it
    before, own_before = cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - own_before < 0.005:
        pass
    after, own_after = cpu_seconds(os.getpid()), time.process_time()
    assert before is not None
    assert after is not None
    assert after - before == pytest.approx(own_after - own_before, abs=0.001)


def test_cpu_seconds_of_no_process() -> None:
    assert cpu_seconds(2**22 + 1) is None  # above the kernel's largest pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's per-process CPU clocks")
def test_cpu_seconds_of_another_process() -> None:
    burn = (
        "import sys, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.05: pass\n"
        "print(flush=True)\n"
        "sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # it has burnt its 50 ms and waits
        used = cpu_seconds(child.pid)
        assert used is not None
        assert 0.05 < used < 5
    finally:
        child.communicate()


@pytest.mark.parametrize(
    ("cpus", "proxy_cpus", "expected"),
    [
        ({0, 1}, 1, ((0,), (1,))),
        ({0, 1, 2, 3}, 2, ((0, 1), (2, 3))),
        ({0, 1}, 2, (None, None)),  # --workers 2 on 2 CPUs: everything shares both, nothing is pinned
    ],
)
def test_the_proxy_gets_one_cpu_per_worker_when_one_is_left_for_the_rest(
    monkeypatch: pytest.MonkeyPatch, cpus: set[int], proxy_cpus: int, expected: tuple[object, object]
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus, raising=False)
    pinning = plan_pinning(external_proxy=False, proxy_cpus=proxy_cpus)
    assert (pinning.proxy, pinning.others) == expected


async def test_the_redis_it_starts_answers_at_its_url_and_stops_with_it(tmp_path: Path) -> None:
    """Debian's redis-server, as for the Redis tests (`make test` installs it; missing, `BenchError` says so)."""
    async with start_redis(cpus=None, log_dir=tmp_path) as url:
        address = urlsplit(url)
        assert (address.scheme, address.hostname, address.path) == ("redis", "127.0.0.1", "/0")
        assert address.port is not None
        port = address.port
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"PING\r\n")
                assert await stream.receive_some() == b"+PONG\r\n"
    with pytest.raises(OSError, match="all attempts to connect"):  # stopped on the way out
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
