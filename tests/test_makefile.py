"""
`make serve` as the README shows it: `make serve PORT=9001 CONFIG=trioproxy.toml`. What it runs
is read from `make -n` (a dry run), so that no test ever binds the default port 8000.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.conftest import PROCESS_RUN_BOUND

ROOT = Path(__file__).parent.parent


def make_serve(*assignments: str) -> list[str]:
    """The `trioproxy serve` command line `make serve ASSIGNMENTS` runs."""
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "serve", *assignments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=PROCESS_RUN_BOUND,
    )
    (command,) = [line for line in dry_run.stdout.splitlines() if "trioproxy serve" in line]
    return shlex.split(command)[1:]


def test_a_config_file_sets_where_make_serve_listens() -> None:
    # `[server] host` and `port` in the file stand: make passes no flag that would override them.
    assert make_serve("CONFIG=trioproxy.toml") == ["serve", "--config", "trioproxy.toml"]


def test_host_and_port_given_to_make_win() -> None:
    assert make_serve("HOST=0.0.0.0", "PORT=9001", "CONFIG=trioproxy.toml") == [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "9001",
        "--config",
        "trioproxy.toml",
    ]
