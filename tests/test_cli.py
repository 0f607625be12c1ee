"""
The `trioproxy` command as a user runs it: real processes, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.conftest import PROCESS_EXIT_BOUND, PROCESS_RUN_BOUND, openai_sdk, streamed_chat_text

TRIOPROXY = [sys.executable, "-m", "trioproxy"]


async def start_process(
    nursery: trio.Nursery, args: list[str], ready: bytes, *, stderr: int = subprocess.DEVNULL
) -> tuple[trio.Process, bytes]:
    """`trioproxy ARGS` in a process, once it has printed `ready`; returns it and its output."""
    process = await nursery.start(
        partial(trio.run_process, [*TRIOPROXY, *args], stdout=subprocess.PIPE, stderr=stderr, check=False)
    )
    output = b""
    with trio.fail_after(PROCESS_RUN_BOUND):
        while ready not in output:
            data = await process.stdout.receive_some()
            assert data, f"the process exited early: {output!r}"
            output += data
    return process, output


async def start_server(nursery: trio.Nursery, *args: str, stderr: int = subprocess.DEVNULL) -> tuple[trio.Process, str]:
    """`trioproxy serve ... --port 0` in a process; returns it and the URL it prints (`stderr`: its log)."""
    process, output = await start_process(
        nursery, ["serve", "--host", "127.0.0.1", "--port", "0", *args], b"listening on", stderr=stderr
    )
    url = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", output)
    assert url, output
    return process, url.group(1).decode()


async def run_trioproxy(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`trioproxy ARGS` to its end (`PROCESS_RUN_BOUND` at most), its output captured, whatever its exit status."""
    with trio.fail_after(PROCESS_RUN_BOUND):
        return await trio.run_process([*TRIOPROXY, *args], capture_stdout=True, capture_stderr=True, check=False)


async def test_serve_then_chat_streams_to_the_terminal(nursery: trio.Nursery) -> None:
    server, url = await start_server(nursery)
    try:
        result = await run_trioproxy("chat", "stream me please", "--model", "sim/echo", "--url", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"stream me please\n"  # the answer's line ends on stdout, not stderr
        assert re.fullmatch(rb"\[time to first token \d+ ms, 3 chunks in [\d.]+ s\]\n", result.stderr)
    finally:
        server.send_signal(signal.SIGINT)
    with trio.fail_after(PROCESS_EXIT_BOUND):
        assert await server.wait() == 0


async def test_chat_takes_the_proxy_s_url_with_or_without_v1(nursery: trio.Nursery) -> None:
    """Who is used to the SDKs' `base_url` passes `.../v1`: it means the same proxy, not `/v1/v1/...`."""
    help_text = " ".join((await run_trioproxy("chat", "--help")).stdout.decode().split())  # as wrapped
    assert "default: http://127.0.0.1:8000" in help_text
    assert "without /v1" in help_text
    server, url = await start_server(nursery)
    try:
        for given in (url + "/v1", url + "/v1/"):
            result = await run_trioproxy("chat", "hi there", "--url", given)
            assert (result.returncode, result.stdout) == (0, b"hi there\n"), result.stderr
    finally:
        server.send_signal(signal.SIGINT)


async def test_chat_ends_a_cut_answer_on_stdout_and_reports_on_stderr(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = tmp_path / "failing.toml"
    config.write_text(
        '[providers.sim]\ntype = "simulated"\nttft_ms = 0\ntoken_interval_ms = 0\nfail_after_tokens = 2\n'
    )
    server, url = await start_server(nursery, "--config", str(config))
    try:
        result = await run_trioproxy("chat", "one two three", "--url", url)
        assert result.returncode == 1
        assert result.stdout == b"one two\n"
        assert result.stderr.decode().startswith("trioproxy chat: simulated failure after 2 tokens")
    finally:
        server.send_signal(signal.SIGINT)


async def test_chat_reports_errors_plainly(nursery: trio.Nursery) -> None:
    server, url = await start_server(nursery)
    try:
        result = await run_trioproxy("chat", "hi", "--model", "nowhere/x", "--url", url)
        assert result.returncode == 1
        assert "no route for model" in result.stderr.decode() or "unknown provider" in result.stderr.decode()
        assert "Traceback" not in result.stderr.decode()
    finally:
        server.send_signal(signal.SIGINT)


async def test_serve_with_the_readme_config(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = tmp_path / "trioproxy.toml"
    config.write_text(
        '[providers.local]\ntype = "openai"\nbase_url = "http://127.0.0.1:9000/v1"\n'
        'api_key_env = "LOCAL_API_KEY"      # optional for local servers\n\n'
        '[providers.claude]\ntype = "anthropic"\napi_key_env = "ANTHROPIC_API_KEY"\n'
    )
    server, url = await start_server(nursery, "--config", str(config))
    try:
        import httpx

        async with httpx.AsyncClient() as http:
            health = (await http.get(url + "/health")).json()
        assert health["status"] == "ok"
        assert set(health["providers"]) == {"local", "claude", "sim"}
    finally:
        server.send_signal(signal.SIGINT)


async def test_bad_config_is_reported_per_mistake(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[providers.x]\ntype = "openai"\n\n[providers.y]\ntype = "carrier-pigeon"\n[server]\nport = "eighty"\n'
    )
    result = await run_trioproxy("serve", "--config", str(config))
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "[providers.x].base_url is required" in err
    assert "[providers.y].type 'carrier-pigeon' is unknown" in err
    assert "[server].port must be an integer" in err
    assert "Traceback" not in err


async def test_upstream_command_serves_a_scripted_stream(nursery: trio.Nursery) -> None:
    process, output = await start_process(
        nursery,
        ["upstream", "--port", "0", "--tokens", "5", "--ttft-ms", "0", "--interval-ms", "0"],
        b"apart\n",
    )
    line = re.fullmatch(
        rb"trioproxy upstream on (http://127\.0\.0\.1:\d+)/v1 \(OpenAI\), \1/v1/messages \(Anthropic\) and "
        rb"\1/v1/responses \(Responses\): 5 tokens, 0 ms to the first, 0 ms apart\n",
        output,
    )
    assert line, output
    url = line.group(1).decode()
    try:
        async with openai_sdk(url) as sdk:
            stream = await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
            text = await streamed_chat_text(stream)
        assert text == " tok0 tok1 tok2 tok3 tok4"
    finally:
        process.send_signal(signal.SIGINT)
    with trio.fail_after(PROCESS_EXIT_BOUND):
        assert await process.wait() == 0


@pytest.mark.parametrize(
    ("command", "what"),
    [(["upstream"], "the upstream"), (["serve"], "the proxy"), (["serve", "--workers", "2"], "the proxy")],
)
async def test_a_taken_port_is_one_clear_line(nursery: trio.Nursery, command: list[str], what: str) -> None:
    server, url = await start_server(nursery)
    port = url.rsplit(":", 1)[1]
    try:
        result = await run_trioproxy(*command, "--port", port)
        assert result.returncode == 1
        # Why it cannot serve, in one line: not an exception group's summary of its sub-exceptions.
        assert result.stderr.decode() == f"trioproxy: cannot serve {what}: [Errno 98] Address already in use\n"
    finally:
        server.send_signal(signal.SIGINT)


def test_the_server_freezes_what_it_started_with_out_of_the_cycle_collector() -> None:
    from trioproxy.cli import GC_YOUNG_THRESHOLD, tune_garbage_collection

    before = gc.get_threshold()
    try:
        tune_garbage_collection()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_what_a_run_built_is_left_to_the_process_exit_not_collected_object_by_object() -> None:
    # After a soak, the interpreter's teardown collected every retained stream before the
    # process could exit (1.3 s after "drained"); frozen, they are freed by the exit at once.
    from trioproxy.cli import _run_until_signalled

    built: list[list[list[int]]] = []

    async def run(shutdown_trigger: Callable[[], Awaitable[None]]) -> None:
        built.append([[] for _ in range(10_000)])

    gc.unfreeze()
    try:
        assert _run_until_signalled(run, "the test") == 0
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


async def test_requests_for_huge_outputs_leave_the_server_responsive(nursery: trio.Nursery) -> None:
    import httpx

    server, url = await start_server(nursery)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            huge = {"model": "sim/lorem", "stream": True, "max_tokens": 1_000_000_000}
            huge["messages"] = [{"role": "user", "content": "hi"}]
            # 200,000 spaces: quadratic to split with a backtracking pattern (minutes, event loop frozen)
            spaces = {"model": "sim/echo", "stream": True, "messages": [{"role": "user", "content": " " * 200_000}]}
            answers: dict[str, httpx.Response] = {}

            async def send(name: str, body: dict[str, object]) -> None:
                answers[name] = await http.post("/v1/chat/completions", json=body)

            async with trio.open_nursery() as requests:
                requests.start_soon(send, "huge", huge)
                requests.start_soon(send, "spaces", spaces)
                with trio.fail_after(5):  # a frozen server never answers
                    assert (await http.get("/health")).status_code == 200
        assert answers["huge"].status_code == 400
        assert answers["huge"].json()["error"]["param"] == "max_tokens"
        assert answers["spaces"].status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
    with trio.fail_after(PROCESS_EXIT_BOUND):
        assert await server.wait() == 0


async def test_a_key_source_with_no_key_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text('[auth]\nkeys_env = "TRIOPROXY_TEST_UNSET_KEYS"\n')
    with trio.fail_after(PROCESS_RUN_BOUND):
        result = await trio.run_process(
            [*TRIOPROXY, "serve", "--port", "0", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "TRIOPROXY_TEST_UNSET_KEYS"},
        )
    assert result.returncode == 2
    assert b"listening on" not in result.stdout
    assert result.stderr.decode() == (
        "trioproxy: invalid configuration:\n"
        "  - [auth].keys_env: environment variable TRIOPROXY_TEST_UNSET_KEYS is not set; "
        "the server would serve every route without a key\n"
    )
