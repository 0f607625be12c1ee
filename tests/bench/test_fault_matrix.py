"""`benchmarks/fault_matrix.py`, run as a user runs it: its table says what recovery does for each fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_matrix.py"


def test_the_matrix_shows_each_fault_s_outcome_and_time() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, check=True)
    assert "with recovery" in run.stdout
    assert not run.stderr
    rows = {
        cells[0]: cells[1:]
        for line in run.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| fault")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert len(rows) == 12
    got = {fault.split(" (")[0]: answer for fault, (answer, _, _) in rows.items()}
    assert got["no response at all"] == "the whole text"
    assert got["stream cut after 40 of 60 tokens"] == "the whole text"
    assert got["context length exceeded"] == "the whole text"
    assert got["content-filter refusal"] == "HTTP 400"
    assert got["stream cut, and the fallback rejects prefill"] == "2 × error after 156 characters"
    assert rows["no response at all (`first_token_timeout = 5`, 2 retries, a fallback)"][1] == "5 s"
    hedged = next(cells for fault, cells in rows.items() if fault.startswith("first token after 20 s"))
    assert hedged[1] == "3.5 s"
    assert all("(" not in upstreams for _, _, upstreams in rows.values())  # no upstream request left open
