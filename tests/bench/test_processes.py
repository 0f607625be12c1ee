"""The bench's processes: CPU time read from /proc, the CPUs they are pinned to, the redis-server and nginx."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from trioproxy._bench import processes
from trioproxy._bench.processes import (
    BenchError,
    cpu_seconds,
    nginx_config,
    plan_pinning,
    start_nginx,
    start_redis,
)


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


def test_nginx_is_configured_as_an_unbuffered_keep_alive_proxy_writing_only_into_its_directory(tmp_path: Path) -> None:
    text = nginx_config("http://127.0.0.1:9000", port=8080, max_connections=50, directory=tmp_path)
    directives = [line.strip().rstrip(";") for line in text.splitlines() if line.strip().endswith(";")]

    for directive in [
        "daemon off",
        "worker_processes 1",
        f"error_log {tmp_path / 'nginx.log'} notice",  # where the harness reads its worker's pid
        "access_log off",
        "server 127.0.0.1:9000",
        "keepalive 50",
        "listen 127.0.0.1:8080",
        "proxy_http_version 1.1",
        'proxy_set_header Connection ""',
        "proxy_buffering off",
        "proxy_cache off",
    ]:
        assert directive in directives
    [upstream] = [line.split()[1] for line in text.splitlines() if line.strip().startswith("upstream ")]
    assert f"proxy_pass http://{upstream}" in directives
    # Every file nginx writes (pid, lock, log, request and response temp files) is in `directory`.
    paths = {words[0]: Path(words[1]) for words in map(str.split, directives) if words[1].startswith("/")}
    assert set(paths) == {
        "pid",
        "lock_file",
        "error_log",
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
    }
    assert all(path.parent == tmp_path for path in paths.values())
    # Each stream holds a client connection and an upstream one, and idle upstream ones are kept.
    [connections] = [int(line.split()[1]) for line in directives if line.startswith("worker_connections ")]
    assert connections >= 3 * 50


async def test_a_missing_nginx_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(processes, "NGINX", tmp_path / "no-nginx")
    with pytest.raises(BenchError, match=r"no-nginx is missing: apt-get install nginx-light \(or nginx\)"):
        async with start_nginx("http://127.0.0.1:9000", 1, cpus=None, log_dir=tmp_path):
            pass
    assert list(await trio.Path(tmp_path).iterdir()) == []  # nothing written


@pytest.mark.skipif(
    not processes.NGINX.exists(), reason="Debian's nginx is not installed (apt-get install nginx-light)"
)
async def test_the_nginx_it_starts_serves_from_one_worker_and_stops_with_it(tmp_path: Path) -> None:
    async with start_nginx("http://127.0.0.1:9", 1, cpus=None, log_dir=tmp_path) as nginx:
        [worker] = nginx.worker_pids
        assert worker != nginx.pid
        assert cpu_seconds(worker) is not None
        port = urlsplit(nginx.url).port
        assert port is not None
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:  # the upstream's port is closed: nginx answers 502 itself
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert (await stream.receive_some()).startswith(b"HTTP/1.1 502 ")
    assert cpu_seconds(worker) is None  # stopped on the way out, its worker too
    with pytest.raises(OSError, match="all attempts to connect"):
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
