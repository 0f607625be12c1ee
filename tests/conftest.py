"""
Shared fixtures: a real scripted upstream and a real trioproxy (hypercorn) on 127.0.0.1:0.

Only loopback addresses; every server lives in the test's nursery and dies with it.
"""

from __future__ import annotations

import inspect
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import httpx
import openai
import pytest
import trio

from trioproxy import Config, parse_config, serve
from trioproxy.testing import FakeUpstream, open_fake_upstream

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
ANTHROPIC_KEY = "sk-ant-upstream-secret-9876543210"


def proxy_config(upstream: FakeUpstream, **extra_providers: dict) -> Config:
    """
    `up` (OpenAI format) and `claude` (Anthropic format) both point at `upstream`. Retries
    are off, so each test sees each upstream answer; the retry tests turn them on.
    """
    return parse_config(
        {
            "retry": {"max_retries": 0},
            # A client in a test that stops reading is dropped in seconds, not left to pin a task.
            "server": {"write_timeout": 5},
            "providers": {
                "up": {"type": "openai", "base_url": upstream.url + "/v1", "api_key_env": "UP_KEY"},
                "claude": {"type": "anthropic", "base_url": upstream.url, "api_key_env": "CLAUDE_KEY"},
                "sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0},
                **extra_providers,
            },
        },
        environ={"UP_KEY": UPSTREAM_KEY, "CLAUDE_KEY": ANTHROPIC_KEY},
    )


@pytest.fixture
def upstream_keys() -> dict[str, str]:
    """The credentials the proxy holds for each upstream provider (never for a client's eyes)."""
    return {"up": UPSTREAM_KEY, "claude": ANTHROPIC_KEY}


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery)


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    binds = await nursery.start(partial(serve, proxy_config(upstream), host="127.0.0.1", port=0))
    return binds[0]


@pytest.fixture
async def client(proxy_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, unmodified, pointed at the proxy (no retries: we test each answer)."""
    async with openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key="client-key", max_retries=0) as sdk:
        yield sdk


async def wait_until(check: Callable[[], bool | Awaitable[bool]], *, seconds: float = 5.0) -> None:
    """
    Until `check()` holds, looking every 10 ms, within `seconds`: for what a test can only
    observe from outside (a server's sockets, its access log, its `/health`), never for time.
    """
    with trio.fail_after(seconds):
        while True:
            holds = check()
            if await holds if inspect.isawaitable(holds) else holds:
                return
            await trio.sleep(0.01)


async def wait_until_idle(proxy_url: str, *, seconds: float = 2.0) -> None:
    """Until the proxy runs no session (`/health`'s `active_streams`; its limits count the same)."""
    async with httpx.AsyncClient() as http:

        async def idle() -> bool:
            return not (await http.get(proxy_url + "/health")).json()["active_streams"]

        await wait_until(idle, seconds=seconds)


class RedisServer:
    """
    A real `redis-server` (Debian's package) on 127.0.0.1, with its files in a temp dir and
    nothing saved; `stop()` kills it (as a crash would) and `start()` brings it back on the
    same port, empty.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        with socket.socket() as probe:  # a free port, kept across restarts
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is missing: `make test` installs it (apt-get install redis-server)")
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory]
        command += ["--save", "", "--appendonly", "no", "--logfile", ""]
        self.process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL)

        async def accepts() -> bool:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", self.port)).aclose()
            except OSError:
                return False
            return True

        await wait_until(accepts, seconds=10)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None


@pytest.fixture
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
