"""
`trioproxy serve --workers N`: one supervisor process and N worker processes, one core each.

The supervisor binds the listening socket once and every worker inherits it and accepts from
it (`serve(listen_fd=...)`): the kernel's one accept queue feeds whichever worker is free,
and a connection queued there outlives a worker that dies, since the socket is the
supervisor's. (One `SO_REUSEPORT` socket per worker was measured against it: see the README,
"More than one core".) The supervisor does nothing else with connections; its only tasks
are the workers, one per slot, each restarted `RESTART_DELAY` after it exits, and the
signals.

Every worker is started in a session of its own, so a Ctrl-C in a terminal reaches the
supervisor only, which passes each SIGINT or SIGTERM on to every worker as SIGTERM: the
first makes them drain (`_shutdown.py`), a second cuts the drain short. The supervisor
stops listening at the first, so new connections are refused at once, as with one process.
A worker whose supervisor is gone (killed, say) drains by itself: it holds the read end of
a pipe whose write end only the supervisor has, and sees its end of file.

Metrics are added up across the workers by prometheus-client's multiprocess mode
(`_metrics.py`), in a directory of the supervisor's that lives as long as it does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from .._config import Config
from ._metrics import MULTIPROCESS_DIR, forget_worker
from ._serve import listening_socket

__all__ = ["RESTART_DELAY", "serve_workers", "worker_command", "worker_trigger"]

RESTART_DELAY: Final = 1.0
"""Seconds before a worker that exited is replaced: a worker that dies at start cannot spin a core."""
EXIT_MARGIN: Final = 5.0
"""
Seconds a worker gets, beyond its own drain (grace period and `write_timeout`), to exit after
the first signal; then it is killed. Only a worker that no longer answers signals needs it.
"""

logger = logging.getLogger("trioproxy.server")


class _Supervisor:
    def __init__(self, config: Config, command: Sequence[str], *, listen_fd: int, metrics_dir: str) -> None:
        self.config = config
        self.command = command
        self.listen_fd = listen_fd
        self.env = {**os.environ, MULTIPROCESS_DIR: metrics_dir}
        self.metrics_dir = metrics_dir
        self.processes: set[trio.Process] = set()
        self.stopping = False

    async def keep_running(self, slot: int) -> None:
        """Run a worker in `slot` until the supervisor stops; replace each that exits before."""
        while not self.stopping:
            await self._run_one(slot)
            if not self.stopping:
                await trio.sleep(RESTART_DELAY)

    async def _run_one(self, slot: int) -> None:
        read_end, write_end = os.pipe()  # the worker's way to see the supervisor is gone
        try:
            command = [*self.command, "--listen-fd", str(self.listen_fd), "--supervisor-fd", str(read_end)]
            process = await trio.lowlevel.open_process(
                command,
                pass_fds=(self.listen_fd, read_end),
                env=self.env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # signals come from the supervisor, not the terminal's group
            )
        except BaseException:
            os.close(write_end)  # no worker to watch it
            raise
        finally:
            os.close(read_end)
        self.processes.add(process)
        if self.stopping:  # the signal came while it started
            process.send_signal(signal.SIGTERM)
        logger.info("worker %d started (pid %d)", slot, process.pid)
        try:
            status = await process.wait()
        finally:
            self.processes.discard(process)
            os.close(write_end)
            forget_worker(process.pid, self.metrics_dir)
        if not self.stopping:
            logger.warning(
                "worker %d (pid %d) exited with status %d; replacing it in %g s",
                slot,
                process.pid,
                status,
                RESTART_DELAY,
            )

    def signal_all(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)

    async def pass_signals_on(self, shutdown_trigger: Callable[[], Awaitable[None]], sock: socket.socket) -> None:
        """
        At the first signal stop listening and make every worker drain, and kill those still
        there once their drain is long over; at the second cut their drains short.
        """
        await shutdown_trigger()
        self.stopping = True
        sock.close()  # the workers close theirs as they drain: new connections are refused
        self.signal_all()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._kill_after_the_drain)
            await shutdown_trigger()
            self.signal_all()

    async def _kill_after_the_drain(self) -> None:
        server = self.config.server
        await trio.sleep(server.shutdown_grace_period + server.write_timeout + EXIT_MARGIN)
        for process in self.processes:
            logger.warning("worker pid %d did not exit after its drain; killing it", process.pid)
            process.kill()


async def serve_workers(
    config: Config,
    command: Sequence[str],
    *,
    workers: int,
    host: str | None = None,
    port: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Listen on `host`/`port` (else `[server]`'s), and run `workers` copies of `command` (a
    `trioproxy serve` command line) accepting from that socket, until `shutdown_trigger`
    returns and every worker has drained and exited. Reports the bound URL through
    `task_status` once the socket listens: connections queue until a worker takes them.
    """
    sock = listening_socket(config, host=host, port=port)
    address, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{address}]' if ':' in address else address}:{bound_port}"
    with sock, tempfile.TemporaryDirectory(prefix="trioproxy-metrics-") as metrics_dir:
        supervisor = _Supervisor(config, command, listen_fd=sock.fileno(), metrics_dir=metrics_dir)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.pass_signals_on, shutdown_trigger, sock)
            async with trio.open_nursery() as slots:
                for slot in range(workers):
                    slots.start_soon(supervisor.keep_running, slot)
                task_status.started([url])
            nursery.cancel_scope.cancel()  # every worker has exited


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line of a worker: this Python, running `trioproxy serve` with `argv`."""
    return [sys.executable, "-m", "trioproxy", "serve", *argv]


def worker_trigger(
    shutdown_trigger: Callable[[], Awaitable[None]], supervisor_fd: int
) -> Callable[[], Awaitable[None]]:
    """
    A worker's shutdown trigger: `shutdown_trigger` (a signal the supervisor passed on), or,
    once, its supervisor gone (the pipe `supervisor_fd` reads end of file) — only once, so
    that it starts the drain and does not also cut it short.
    """
    orphaned = False

    async def supervisor_gone() -> None:
        nonlocal orphaned
        if orphaned:
            await trio.sleep_forever()
        async with trio.lowlevel.FdStream(os.dup(supervisor_fd)) as pipe:
            while await pipe.receive_some():
                pass
        orphaned = True
        logger.warning("the supervisor is gone: draining")

    async def trigger() -> None:
        async with trio.open_nursery() as nursery:

            async def first(wait: Callable[[], Awaitable[None]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, shutdown_trigger)
            nursery.start_soon(first, supervisor_gone)

    return trigger
