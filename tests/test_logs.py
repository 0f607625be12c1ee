"""
Log output as `trioproxy serve` writes it: a real process, its stderr read back.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import trio

from tests.conftest import PROCESS_EXIT_BOUND
from tests.test_cli import start_server
from trioproxy.testing import FakeUpstream, Reply


async def test_an_upstream_request_logs_our_access_line_and_no_httpx_line(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "trioproxy.toml"
    config.write_text(f'[providers.up]\ntype = "openai"\nbase_url = "{upstream.url}/v1"\n')
    upstream.push(Reply(tokens=["hi"]))
    server, url = await start_server(nursery, "--config", str(config), stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient() as http:
            body = {"model": "up/m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            assert (await http.post(url + "/v1/chat/completions", json=body)).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
    with trio.fail_after(PROCESS_EXIT_BOUND):
        assert await server.wait() == 0
    output = b""
    while data := await server.stderr.receive_some():
        output += data
    log = output.decode()
    assert "trioproxy.access: POST /v1/chat/completions 200" in log
    assert "httpx" not in log
    assert "HTTP Request" not in log
