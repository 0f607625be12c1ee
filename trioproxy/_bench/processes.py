"""
The benchmark's child processes: the upstream, the proxy and the load generator (and, when
asked, a redis-server and an nginx as a reference proxy).

Each runs as a process of its own, as it would in production, so that each one's CPU time can
be read from /proc and each can be pinned to its own cores: the proxy alone on the first CPU,
everything else on the rest. Otherwise the load generator and the upstream would compete with
the proxy for one core, and the figures would measure the competition.

Every child is started by an async context manager whose `finally` stops it (SIGTERM, then
SIGKILL), whatever happened, Ctrl-C included. Children write their logs (stderr) to a file;
when one fails to start, the error quotes the log's end.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import trio

from .wire import LineReader, PhaseResult, PhaseSpec, send_message

#: The directory holding the `trioproxy` package this code belongs to.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
TRIOPROXY = [sys.executable, "-m", "trioproxy"]
LOADGEN = [sys.executable, "-m", "trioproxy._bench.loadgen"]
RELAY = [sys.executable, "-m", "trioproxy._bench.relay"]
#: Debian's nginx (packages `nginx-light` or `nginx`), the reference proxy of `cpu_per_stream.py`.
NGINX = Path("/usr/sbin/nginx")
#: How long a child may take to say it is ready.
START_TIMEOUT = 30.0
#: How long a child gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 3.0
#: Extra time the runner grants a phase beyond the load generator's own deadlines.
PHASE_MARGIN = 30.0

_UPSTREAM_READY = re.compile(r"upstream on (http://127\.0\.0\.1:\d+)/v1")
_PROXY_READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
_LOADGEN_READY = re.compile(r'"loadgen"')
_REDIS_READY = re.compile(r"Ready to accept connections")
#: What each worker of `serve --workers` logs, at level info, once it accepts connections.
_WORKER_SERVING = re.compile(r"worker pid (\d+) serving")
#: What nginx's master logs, at level notice, as it forks a worker (on the socket it listens on).
_NGINX_WORKER = re.compile(r"start worker process (\d+)")
#: How often the log is read while waiting for the workers.
WORKER_POLL = 0.05


class BenchError(Exception):
    """The benchmark cannot go on; the message says why, in words for the terminal."""


# --------------------------------------------------------------------------------------------
# CPUs, limits and /proc


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the proxy and everything else run on (None: not pinned)."""

    proxy: tuple[int, ...] | None
    others: tuple[int, ...] | None
    #: The proxy runs elsewhere (`--proxy-url`): its CPU is reserved, not set.
    external_proxy: bool = False

    def describe(self) -> str:
        if self.proxy is None or self.others is None:
            return "none (no CPU left beside one per proxy worker, or no sched_setaffinity)"
        others = ",".join(map(str, self.others))
        proxy = "kept free for the external proxy (not pinned by us)" if self.external_proxy else "proxy alone"
        if len(self.proxy) > 1:
            proxy += f" (its workers; one process on CPU {self.proxy[0]})"
        return f"CPU {','.join(map(str, self.proxy))}: {proxy}; CPU {others}: upstream, load generator, runner"


def plan_pinning(*, external_proxy: bool, proxy_cpus: int = 1) -> Pinning:
    """
    The proxy alone on the first `proxy_cpus` CPUs this process may use (one per worker), the
    rest on the others; nothing pinned where that leaves the rest no CPU, so that the
    workers, the upstream and the load generator share every CPU rather than some of them.
    """
    if not hasattr(os, "sched_getaffinity"):
        return Pinning(None, None, external_proxy)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= proxy_cpus:
        return Pinning(None, None, external_proxy)
    return Pinning(tuple(cpus[:proxy_cpus]), tuple(cpus[proxy_cpus:]), external_proxy)


def _pin(pid: int, cpus: tuple[int, ...] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)


@contextmanager
def pinned_self(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run the runner itself on `cpus` (off the proxy's core), and restore its affinity after."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def raise_open_files_limit() -> int:
    """
    Raise this process's open-file limit to its hard limit (children inherit it), and return it.

    Thousands of streams need thousands of sockets in each of the load generator, the proxy
    (twice: client and upstream side) and the upstream; a soft limit of 1024 is common.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def cpu_seconds(pid: int) -> float | None:
    """
    CPU time of process `pid`, all its threads, in nanoseconds' resolution (None where it
    cannot be read). /proc/PID/stat counts in clock ticks, 10 ms apiece: a proxy that spends
    0.3 ms per stream read as 0 or 10 ms more over a short phase; schedstat is in nanoseconds
    but lags by up to a scheduler tick for a running thread. Linux's clock for a process's
    CPU time (what glibc's `clock_getcpuclockid` returns) is exact, and any process may read it.
    """
    try:
        return time.clock_gettime_ns(_process_cpu_clock(pid)) / 1e9
    except OSError:  # no such process, or not Linux
        return None


def cpu_seconds_of_all(pids: tuple[int, ...]) -> tuple[float, ...]:
    """`cpu_seconds` of each of `pids`; a `BenchError` if one has exited (its CPU time is lost)."""
    seconds = [cpu_seconds(pid) for pid in pids]
    if gone := [pid for pid, used in zip(pids, seconds, strict=True) if used is None]:
        raise BenchError(f"process {', '.join(map(str, gone))} of the proxy exited during the run")
    return tuple(used for used in seconds if used is not None)


def _process_cpu_clock(pid: int) -> int:
    """The clock id of `pid`'s CPU time: Linux's `MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)`."""
    return (~pid << 3) | 2


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set size of `pid` (VmHWM in /proc/PID/status), in MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


# --------------------------------------------------------------------------------------------
# Starting and stopping


def child_env() -> dict[str, str]:
    """
    The environment for children: this trioproxy's directory first on PYTHONPATH, so that
    `python -m trioproxy` runs this very code, installed or not (a checkout, a test venv).
    """
    env = dict(os.environ)
    paths = [str(PACKAGE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@dataclass(frozen=True)
class Child:
    """A started child: its process, what its ready line said, and how long it took to say it."""

    name: str
    process: trio.Process
    #: The URL from the ready line (empty for the load generator).
    url: str
    startup_s: float
    log: Path
    #: The worker processes of a `serve --workers` (empty for one process): the pids whose CPU is the proxy's.
    worker_pids: tuple[int, ...] = ()

    @property
    def pid(self) -> int:
        return self.process.pid


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").rstrip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def _stop(process: trio.Process) -> None:
    """SIGTERM, a grace period, then SIGKILL; always reaped. Runs shielded, from `finally`."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                await pipe.aclose()


@asynccontextmanager
async def _started(
    name: str,
    args: list[str],
    ready: re.Pattern[str] | None,
    cpus: tuple[int, ...] | None,
    log_dir: Path,
    *,
    stdin: bool,
) -> AsyncIterator[tuple[Child, LineReader]]:
    """
    Spawn `args`, pin it, wait for a stdout line matching `ready` (None: the caller waits for
    its own sign), and stop it on the way out.

    The servers print nothing on stdout after their ready line (logs go to stderr, into the
    log file), so their stdout pipe needs no reader afterwards.
    """
    log = log_dir / f"{name.replace(' ', '-')}.log"
    spawned = time.perf_counter()
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            args,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=child_env(),
        )
    try:
        _pin(process.pid, cpus)
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        match = None if ready is None else await _wait_for_line(name, reader, ready, log)
        url = match.group(1) if match is not None and match.groups() else ""
        yield Child(name, process, url, time.perf_counter() - spawned, log), reader
    finally:
        await _stop(process)


async def _wait_for_line(name: str, reader: LineReader, ready: re.Pattern[str], log: Path) -> re.Match[str]:
    with trio.move_on_after(START_TIMEOUT):
        while (line := await reader.readline()) is not None:
            if match := ready.search(line.decode("utf-8", "replace")):
                return match
        raise BenchError(f"the {name} exited before it was ready:\n{_log_tail(log)}")
    raise BenchError(f"the {name} was not ready within {START_TIMEOUT:g} s:\n{_log_tail(log)}")


@asynccontextmanager
async def start_upstream(
    *, port: int, tokens: int, ttft_ms: float, interval_ms: float, cpus: tuple[int, ...] | None, log_dir: Path
) -> AsyncIterator[Child]:
    """`trioproxy upstream` on 127.0.0.1; its `url` is the base without `/v1`."""
    args = [
        *TRIOPROXY,
        "upstream",
        f"--port={port}",
        f"--tokens={tokens}",
        f"--ttft-ms={ttft_ms}",
        f"--interval-ms={interval_ms}",
    ]
    async with _started("upstream", args, _UPSTREAM_READY, cpus, log_dir, stdin=False) as (child, _):
        yield child


@asynccontextmanager
async def start_redis(*, cpus: tuple[int, ...] | None, log_dir: Path) -> AsyncIterator[str]:
    """Debian's `redis-server` on a free loopback port, saving nothing: its `redis://` URL."""
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server is missing: apt-get install redis-server")
    port = _free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(log_dir)]
    args += ["--save", "", "--appendonly", "no"]
    async with _started("redis", args, _REDIS_READY, cpus, log_dir, stdin=False):
        yield f"redis://127.0.0.1:{port}/0"


def _free_port() -> int:
    """A loopback port free now, for a server that cannot listen on port 0 and say which it got."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def nginx_config(upstream_url: str, *, port: int, max_connections: int, directory: Path) -> str:
    """
    nginx as trioproxy is run in the benchmark: one worker on 127.0.0.1:`port`, streaming from
    the upstream as it comes (no buffering, no cache, no access log) over HTTP/1.1 connections
    kept alive, up to `max_connections` idle, as trioproxy's pool is as large as the largest
    concurrency. Everything it writes (pid, log, temporary files) goes into `directory`, so it
    runs as root or not; its log, at level notice, names the worker it forks.
    """
    temp = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # made at start-up, used or not
    return "\n".join(
        [
            "daemon off;",
            "worker_processes 1;",
            f"pid {directory / 'nginx.pid'};",
            f"lock_file {directory / 'nginx.lock'};",
            f"error_log {directory / 'nginx.log'} notice;",  # the log `start_nginx` quotes and reads
            # Each stream holds a client connection and an upstream one; idle upstream ones are kept too.
            "events {",
            f"    worker_connections {3 * max_connections + 16};",
            "}",
            "http {",
            "    access_log off;",
            *(f"    {name}_temp_path {directory / name};" for name in temp),
            "    upstream bench {",
            f"        server {urlsplit(upstream_url).netloc};",
            f"        keepalive {max_connections};",
            "    }",
            "    server {",
            f"        listen 127.0.0.1:{port};",
            "        location / {",
            "            proxy_pass http://bench;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_buffering off;",
            "            proxy_cache off;",
            "        }",
            "    }",
            "}",
            "",
        ]
    )


@asynccontextmanager
async def start_nginx(
    upstream_url: str, max_connections: int, *, cpus: tuple[int, ...] | None, log_dir: Path
) -> AsyncIterator[Child]:
    """
    Debian's nginx in front of the upstream (`nginx_config`), in the foreground, its master and
    its one worker pinned to `cpus`; ready when the master has forked the worker, on a socket
    already listening. Its CPU is the master's and the worker's, as for `serve --workers`.
    """
    if not await trio.Path(NGINX).exists():
        raise BenchError(f"{NGINX} is missing: apt-get install nginx-light (or nginx)")
    port = _free_port()
    config = log_dir / "nginx.conf"
    config.write_text(nginx_config(upstream_url, port=port, max_connections=max_connections, directory=log_dir))
    # -e: its log before it reads the config is the same file, which `_started` quotes if it fails.
    args = [str(NGINX), "-p", str(log_dir), "-c", str(config), "-e", str(log_dir / "nginx.log")]
    async with _started("nginx", args, None, cpus, log_dir, stdin=False) as (child, _):
        waited = time.perf_counter()
        pids = await _wait_for_workers(child, 1, _NGINX_WORKER)
        _pin(pids[0], cpus)  # forked before the master was pinned, perhaps
        startup_s = child.startup_s + time.perf_counter() - waited
        yield replace(child, url=f"http://127.0.0.1:{port}", worker_pids=pids, startup_s=startup_s)


@asynccontextmanager
async def start_relay(upstream_url: str, *, cpus: tuple[int, ...] | None, log_dir: Path) -> AsyncIterator[Child]:
    """The bare relay on trio (`relay.py`) in front of the upstream, on 127.0.0.1 with a kernel-chosen port."""
    args = [*RELAY, "--upstream", upstream_url]
    async with _started("trio relay", args, _PROXY_READY, cpus, log_dir, stdin=False) as (child, _):
        yield child


@asynccontextmanager
async def start_proxy(
    config: Path, *, cpus: tuple[int, ...] | None, log_dir: Path, workers: int = 1
) -> AsyncIterator[Child]:
    """
    `trioproxy serve` on 127.0.0.1 with a kernel-chosen port; `startup_s` is spawn to
    "listening on", or with `workers` above 1 to the last worker serving. Workers log that at
    level info (the config must turn the access log off, or every request would log a line).
    """
    args = [*TRIOPROXY, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0"]
    if workers > 1:
        args += ["--workers", str(workers), "--log-level", "info"]
    else:
        args += ["--log-level", "warning"]
    name = "proxy" if workers == 1 else f"proxy with {workers} workers"
    async with _started(name, args, _PROXY_READY, cpus, log_dir, stdin=False) as (child, _):
        if workers == 1:
            yield child
            return
        listening = time.perf_counter()
        pids = await _wait_for_workers(child, workers)
        for pid in pids:  # they inherit the supervisor's CPUs; set again, in case they started before it was pinned
            _pin(pid, cpus)
        yield replace(child, worker_pids=pids, startup_s=child.startup_s + time.perf_counter() - listening)


async def _wait_for_workers(child: Child, workers: int, serving: re.Pattern[str] = _WORKER_SERVING) -> tuple[int, ...]:
    """The pids of the first `workers` workers the log says serve (`serving`), in the order it said it."""
    with trio.move_on_after(START_TIMEOUT):
        while child.process.returncode is None:
            pids = tuple(int(pid) for pid in serving.findall(child.log.read_text(errors="replace")))
            if len(pids) >= workers:
                return pids[:workers]
            await trio.sleep(WORKER_POLL)
        raise BenchError(f"the {child.name} exited before its workers served:\n{_log_tail(child.log)}")
    raise BenchError(f"the {child.name}'s workers did not serve within {START_TIMEOUT:g} s:\n{_log_tail(child.log)}")


class LoadGenerator:
    """The runner's handle on the load-generator process: one phase at a time."""

    def __init__(self, child: Child, reader: LineReader) -> None:
        self.child = child
        self._reader = reader

    async def run_phase(self, spec: PhaseSpec, on_ready: Callable[[], None]) -> PhaseResult:
        """
        Run one phase; `on_ready` is called between the warm-up and the measured rounds, while
        the load generator waits, so counters read there frame exactly the measured part.
        """
        stdin = self.child.process.stdin
        assert stdin is not None
        try:
            with trio.fail_after(2 * spec.deadline_s + PHASE_MARGIN):
                await send_message(stdin, spec.to_message())
                await self._reader.read_message()
                on_ready()
                await send_message(stdin, b'{"go": true}')
                message = await self._reader.read_message()
        except (EOFError, trio.BrokenResourceError) as exc:
            raise BenchError(f"the load generator died:\n{_log_tail(self.child.log)}") from exc
        except trio.TooSlowError as exc:
            raise BenchError("the load generator did not finish a phase in time") from exc
        return PhaseResult.from_message(message["result"])


@asynccontextmanager
async def start_loadgen(*, cpus: tuple[int, ...] | None, log_dir: Path) -> AsyncIterator[LoadGenerator]:
    """The load generator, in its own process, ready for phases."""
    async with _started("load generator", LOADGEN, _LOADGEN_READY, cpus, log_dir, stdin=True) as (child, reader):
        yield LoadGenerator(child, reader)
