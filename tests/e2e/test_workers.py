"""
`trioproxy serve --workers N`, as an operator runs it: a real supervisor process and its real
worker processes on 127.0.0.1, driven over real sockets, signalled like a process manager
does. Every wait is bounded; what is only visible from outside (which worker answered, a
replaced worker) is polled, never slept for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import trio
import trio_websocket

from tests.conftest import anthropic_sdk, free_port, listening_url, openai_sdk, streamed_chat_text, wait_until
from tests.e2e.test_observability import scrape_until, value

#: Starting a worker imports the whole proxy: seconds, on a busy machine.
START_TIMEOUT = 30.0
CONFIG = """
[providers.slow]
type = "simulated"
ttft_ms = 0
token_interval_ms = 50
lorem_tokens = 200
"""
SLOW_BODY = {"model": "slow/lorem", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@dataclass
class Supervisor:
    process: trio.Process
    url: str


@asynccontextmanager
async def supervisor(tmp_path: Path, workers: int = 2, text: str = CONFIG) -> AsyncIterator[Supervisor]:
    """`trioproxy serve --workers N` on a free port; killed with its workers if the test leaves it running."""
    config = tmp_path / "trioproxy.toml"
    config.write_text(text)
    command = [sys.executable, "-m", "trioproxy", "serve", "--config", str(config), "--port", "0"]
    command += ["--workers", str(workers)]
    with (tmp_path / "stderr.log").open("wb") as stderr:
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=stderr)
        try:
            yield Supervisor(process, await listening_url(process, seconds=START_TIMEOUT))
        finally:
            if process.returncode is None:
                for pid in _children(process.pid):
                    os.kill(pid, signal.SIGKILL)
                process.kill()
                await process.wait()


def _children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def health(url: str) -> dict:
    """`/health` over a connection of its own, so that any worker may answer it."""
    async with httpx.AsyncClient() as http:
        return (await http.get(url + "/health")).json()


async def pids_answering(url: str, count: int) -> set[int]:
    """Ask `/health` until `count` different workers have answered; their pids."""
    seen: set[int] = set()

    async def enough() -> bool:
        seen.add((await health(url))["pid"])
        return len(seen) >= count

    await wait_until(enough, seconds=START_TIMEOUT)
    return seen


async def test_two_workers_answer_on_one_address_with_one_metrics(tmp_path: Path) -> None:
    async with supervisor(tmp_path) as proxy:
        pids = await pids_answering(proxy.url, 2)
        assert proxy.process.pid not in pids
        assert set(_children(proxy.process.pid)) == pids

        async with httpx.AsyncClient() as http:
            for _ in range(20):
                response = await http.post(
                    proxy.url + "/v1/chat/completions",
                    json={"model": "sim/echo", "messages": [{"role": "user", "content": "one two"}]},
                    headers={"connection": "close"},  # each on a connection of its own: any worker
                )
                assert response.json()["choices"][0]["message"]["content"] == "one two"

        # Whichever worker answers /metrics counts the requests of both.
        completions = {"route": "/v1/chat/completions", "status": "200", "outcome": "completed"}
        samples = await scrape_until(
            proxy.url, lambda s: value(s, "trioproxy_requests_total", **completions) == 20, seconds=10
        )
        streams = {"route": "/v1/chat/completions", "provider": "sim", "outcome": "completed"}
        assert value(samples, "trioproxy_streams_total", **streams) == 20
        assert value(samples, "trioproxy_active_streams") == 0
        async with openai_sdk(proxy.url) as sdk:
            messages = [{"role": "user", "content": "hi"}]
            stream = await sdk.chat.completions.create(model="sim/echo", messages=messages, stream=True)
            assert await streamed_chat_text(stream) == "hi"
        proxy.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proxy.process.wait() == 0


async def test_every_front_is_served_by_the_workers_and_counted_in_one_metrics(tmp_path: Path) -> None:
    """Each request on a connection of its own (a new client each time): either worker may take it."""
    down = f"http://127.0.0.1:{free_port()}/v1"  # a port where nothing listens: its target's breaker opens
    text = (
        CONFIG
        + f"""
[providers.down]
type = "openai"
base_url = "{down}"
retry = {{ max_retries = 0 }}
breaker = {{ failures = 1, cooldown = 600 }}
"""
    )
    messages = [{"role": "user", "content": "one two"}]
    async with supervisor(tmp_path, text=text) as proxy:
        await pids_answering(proxy.url, 2)
        for _ in range(4):
            async with openai_sdk(proxy.url) as sdk:
                response = await sdk.responses.create(model="sim/echo", input="one two")  # stored
                assert response.output_text == "one two"
            async with (
                openai_sdk(proxy.url) as sdk,
                await sdk.responses.create(model="sim/echo", input="one two", stream=True) as events,
            ):
                assert [e.type async for e in events][-1] == "response.completed"
            async with anthropic_sdk(proxy.url) as claude:
                message = await claude.messages.create(model="sim/echo", max_tokens=20, messages=messages)
                assert message.content[0].text == "one two"  # type: ignore[union-attr]
            async with trio_websocket.open_websocket_url(proxy.url.replace("http", "ws") + "/v1/responses") as ws:
                create = {"type": "response.create", "model": "sim/echo", "input": "one two"}
                await ws.send_message(orjson.dumps(create).decode())
                with trio.fail_after(10):
                    while orjson.loads(await ws.get_message())["type"] != "response.completed":
                        pass
            async with httpx.AsyncClient() as http:
                body = {"model": "sim/echo", "messages": messages}
                events = await http.post(proxy.url + "/v1/chat/stream", json=body)
                assert events.status_code == 200
                assert '"type":"done"' in events.text
                down_body = {"model": "down/m", "messages": messages}
                assert (await http.post(proxy.url + "/v1/chat/completions", json=down_body)).status_code == 502

        def counted(samples: dict) -> bool:
            """Both workers' requests, in one `/metrics` (the Responses streams: 8 requests, 4 WebSocket turns)."""
            answered = {"status": "200", "outcome": "completed"}
            streams = {"route": "/v1/responses", "provider": "sim", "outcome": "completed"}
            return (
                value(samples, "trioproxy_requests_total", route="/v1/responses", **answered) == 8
                and value(samples, "trioproxy_requests_total", route="/v1/messages", **answered) == 4
                and value(samples, "trioproxy_requests_total", route="/v1/chat/stream", **answered) == 4
                and value(samples, "trioproxy_streams_total", **streams) == 12
            )

        samples = await scrape_until(proxy.url, counted, seconds=10)
        # Each worker's own breaker for the one target, summed: one that opened per worker asked.
        target = {"provider": "down", "target": down}
        opened = value(samples, "trioproxy_target_state", state="open", **target)
        assert 1 <= opened <= 2
        assert opened + value(samples, "trioproxy_target_state", state="closed", **target) == 2
        assert value(samples, "trioproxy_breaker_transitions_total", state="open", **target) == opened
        assert value(samples, "trioproxy_target_outstanding", **target) == 0


async def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    async with supervisor(tmp_path) as proxy:
        first, second = await pids_answering(proxy.url, 2)
        os.kill(first, signal.SIGKILL)

        async def replaced() -> bool:
            return set(_children(proxy.process.pid)) - {second} not in (set(), {first})

        await wait_until(replaced, seconds=10)
        (new,) = set(_children(proxy.process.pid)) - {second}
        assert await pids_answering(proxy.url, 2) == {second, new}  # the new one serves too
        assert proxy.process.returncode is None


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    """Streams on both workers run to their end after SIGTERM; new connections are refused; exit 0."""
    async with supervisor(tmp_path) as proxy, trio.open_nursery() as nursery:
        texts: list[str] = []
        answering = 0  # streams whose response head came: admitted by a worker before the signal

        async def stream() -> None:
            nonlocal answering
            async with (
                httpx.AsyncClient(timeout=60) as http,
                http.stream("POST", proxy.url + "/v1/chat/completions", json=SLOW_BODY) as response,
            ):
                answering += 1
                texts.append("".join([chunk async for chunk in response.aiter_text()]))

        busy: set[int] = set()

        async def both_busy() -> bool:
            """Start streams (up to 20), until `/health` has shown both workers with a stream in flight."""
            if len(nursery.child_tasks) < 20:
                nursery.start_soon(stream)
            answer = await health(proxy.url)
            if answer["active_streams"]:
                busy.add(answer["pid"])
            return len(busy) == 2

        await wait_until(both_busy, seconds=START_TIMEOUT)
        started = len(nursery.child_tasks)
        await wait_until(lambda: answering == started, seconds=START_TIMEOUT)  # none still on its way in
        proxy.process.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    await http.get(proxy.url + "/health")
            except httpx.ConnectError:
                return True
            return False

        await wait_until(refused, seconds=10)
        with trio.fail_after(30):
            assert await proxy.process.wait() == 0
    assert len(texts) == started
    assert all(text.rstrip().endswith("data: [DONE]") for text in texts), [t[-200:] for t in texts]


async def test_workers_whose_supervisor_is_killed_drain_and_exit(tmp_path: Path) -> None:
    async with supervisor(tmp_path) as proxy:
        pids = await pids_answering(proxy.url, 2)
        proxy.process.kill()  # SIGKILL: it cannot pass anything on
        await proxy.process.wait()

        def gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids)

        await wait_until(gone, seconds=20)


def _state(pid: int) -> str:
    """A process's state letter (`Z`: exited, not yet reaped by its parent)."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
