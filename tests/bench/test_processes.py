"""The benchmark's child processes: none outlives a runner that is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from trioproxy._bench.processes import PACKAGE_ROOT

PARENT = textwrap.dedent(
    """
    import subprocess, sys, trio
    from trioproxy._bench.processes import die_with_parent

    async def main():
        child = await trio.lowlevel.open_process(["sleep", "60"], preexec_fn=die_with_parent)
        print(child.pid, flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
async def test_a_child_dies_with_its_killed_runner() -> None:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    parent = await trio.lowlevel.open_process([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, env=env)
    try:
        with trio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):
                data = await parent.stdout.receive_some()
                assert data, "the parent exited early"
                line += data
        child = int(line)
        assert os.path.exists(f"/proc/{child}")
        parent.send_signal(signal.SIGKILL)  # no finally, no handler: only the kernel can stop the child
        await parent.wait()
        with trio.fail_after(5):
            while _alive(child):
                await trio.sleep(0.01)  # a real process exiting: nothing to autojump
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        await parent.stdout.aclose()


def _alive(pid: int) -> bool:
    """Running, not a zombie (init reaps the orphan; until then its state is Z)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
