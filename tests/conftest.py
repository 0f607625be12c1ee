"""
Shared fixtures: a real scripted upstream and a real trioproxy (hypercorn) on 127.0.0.1:0.

Only loopback addresses; every server lives in the test's nursery and dies with it.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import orjson
import pytest
import trio
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from trioproxy import Config, create_app, parse_config, serve
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply, open_fake_upstream

T = TypeVar("T")

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
ANTHROPIC_KEY = "sk-ant-upstream-secret-9876543210"
#: The README's bound on the time from a client's hang-up to its upstream request's close.
HANG_UP_BOUND = 0.1
#: How long a test waits for that close at all, before it fails on the bound.
HANG_UP_WAIT = 5.0

# Bounds on what a real process does, in real seconds: autojump_clock moves this test's clock,
# never another process's. Generous, not measured: on two cores shared by several suites a
# process's start (imports, config) can take many times its usual second, and a bound only
# says when a test gives up on a hang.
#: A `trioproxy` command starts and says it is ready, or runs to its end.
PROCESS_RUN_BOUND = 20.0
#: A signalled `trioproxy serve` process ends its streams (its grace period, when shorter) and exits.
PROCESS_EXIT_BOUND = 10.0
#: A server whose trace collector is unreachable stops: it waits `[tracing] shutdown_timeout` (the
#: test's 0.5 s) for the last spans, not the OTLP exporter's retries (about 7 s).
TRACING_SHUTDOWN_BOUND = 4.0
#: A `trioproxy bench --quick` run: the proxy, the upstream and the load generator as processes, measuring.
QUICK_BENCH_BOUND = 150.0


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


def openai_upstream_config(upstream: FakeUpstream, **sections: Any) -> Config:
    """
    `up` alone (OpenAI format, no key) pointing at `upstream`, retries off and a client that
    stops reading dropped in seconds (as in `proxy_config`), plus `sections` (each replacing its default).
    """
    providers = {"up": {"type": "openai", "base_url": upstream.url + "/v1"}}
    raw = {"retry": {"max_retries": 0}, "server": {"write_timeout": 5}, "providers": providers, **sections}
    return parse_config(raw, environ={})


@asynccontextmanager
async def in_process(config: Config) -> AsyncIterator[tuple[httpx.AsyncClient, openai.AsyncOpenAI]]:
    """
    The app of `config` on the current (mock) clock, reached through ASGI (no sockets, so that
    its timeouts and windows pass on trio's MockClock): an httpx client at `http://proxy.test`
    and the official SDK on it (no retries).
    """
    app = create_app(config)
    async with (
        app.test_app(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test") as http,
        openai.AsyncOpenAI(base_url="http://proxy.test/v1", api_key="k", max_retries=0, http_client=http) as client,
    ):
        yield http, client


async def serve_proxy(nursery: trio.Nursery, config: Config, **serving: Any) -> str:
    """
    `config` served by a real hypercorn (`trioproxy.serve`) on 127.0.0.1:0, in `nursery` (it
    stops with it): the proxy's base URL. `serving` goes to `serve` (`shutdown_trigger`, ...).
    """
    binds = await nursery.start(partial(serve, config, host="127.0.0.1", port=0, **serving))
    return str(binds[0])


def openai_sdk(url: str, api_key: str = "k") -> openai.AsyncOpenAI:
    """OpenAI's official SDK, unmodified, on the server at `url` (no retries: we test each answer)."""
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def anthropic_sdk(url: str, api_key: str = "k") -> anthropic.AsyncAnthropic:
    """Anthropic's official SDK, unmodified, on the server at `url` (no retries: we test each answer)."""
    return anthropic.AsyncAnthropic(base_url=url, api_key=api_key, max_retries=0)


@pytest.fixture
def upstream_keys() -> dict[str, str]:
    """The credentials the proxy holds for each upstream provider (never for a client's eyes)."""
    return {"up": UPSTREAM_KEY, "claude": ANTHROPIC_KEY}


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery)


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    return await serve_proxy(nursery, proxy_config(upstream))


@pytest.fixture
async def client(proxy_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_sdk(proxy_url, "client-key") as sdk:
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


async def listening_url(process: trio.Process, *, seconds: float = 30.0) -> str:
    """The URL a starting `trioproxy serve` process (its stdout a pipe) prints once it listens."""
    assert process.stdout is not None
    output = b""
    with trio.fail_after(seconds):
        while b"listening on" not in output:
            data = await process.stdout.receive_some()
            assert data, output
            output += data
    return re.search(rb"http://127\.0\.0\.1:\d+", output).group().decode()  # type: ignore[union-attr]


async def wait_until_idle(proxy_url: str, *, seconds: float = 2.0) -> None:
    """Until the proxy runs no session (`/health`'s `active_streams`; its limits count the same)."""
    async with httpx.AsyncClient() as http:

        async def idle() -> bool:
            return not (await http.get(proxy_url + "/health")).json()["active_streams"]

        await wait_until(idle, seconds=seconds)


@dataclass(frozen=True)
class Instant:
    """
    A trio time, and how long this thread had waited for a CPU by then (Linux `schedstat`).

    A test that times its own servers from its own thread times the kernel's scheduler too:
    on a busy machine most of a "how soon did the upstream notice" span is that wait.
    """

    time: float
    cpu_wait: float

    @classmethod
    def now(cls) -> Instant:
        with open("/proc/thread-self/schedstat") as schedstat:
            return cls(trio.current_time(), int(schedstat.read().split()[1]) / 1e9)

    def to(self, later: Instant) -> float:
        """Seconds from this instant to `later`, less the time the thread waited for a CPU in between."""
        return later.time - self.time - (later.cpu_wait - self.cpu_wait)

    def until(self, at: float) -> float:
        """
        Seconds from this instant to `at`, a trio time now past that another task noted, less
        the CPU wait until now (a little more than until `at`: the bound errs towards passing).
        """
        return self.to(Instant(at, Instant.now().cpu_wait))


async def hang_up_mid_stream(
    stream: Any, upstream: FakeUpstream, *, counts: Callable[[Any], bool] = lambda _event: True
) -> None:
    """
    Read an SDK's `stream` until three of its events have come (those `counts` counts), hang
    up, and check the upstream's request was closed soon after (`upstream_closed_soon_after`).
    """
    seen = 0
    async for event in stream:
        seen += counts(event)
        if seen == 3:
            break
    hung_up = Instant.now()
    await stream.close()
    await upstream_closed_soon_after(upstream.requests[-1], hung_up)


async def hang_up_once_asked(url: str, body: Any, upstream: FakeUpstream, *, tokens_sent: int = 0) -> None:
    """
    POST `body` to `url` (reading what comes), hang up once the upstream has the request and
    has sent `tokens_sent` tokens of its answer, and check the upstream's request was closed
    (`upstream_closed_soon_after`).
    """
    async with trio.open_nursery() as nursery:

        async def request() -> None:
            async with httpx.AsyncClient() as http, http.stream("POST", url, json=body) as response:
                async for _ in response.aiter_bytes():
                    pass

        nursery.start_soon(request)
        with trio.fail_after(5):
            await upstream.wait_for_requests(upstream.request_count + 1)
        await wait_until(lambda: upstream.requests[-1].tokens_sent >= tokens_sent)
        nursery.cancel_scope.cancel()  # the client hangs up
    await upstream_closed_soon_after(upstream.requests[-1], Instant.now())


async def upstream_closed_soon_after(recorded: RecordedRequest, hung_up: Instant) -> None:
    """
    The upstream saw `recorded`'s connection close within `HANG_UP_BOUND` (the README's) of the
    client's hang-up (`hung_up`, taken as it hangs up), unfinished.

    Proxy, upstream and client share this thread, so the span is the proxy's own work plus
    the time the kernel kept the thread waiting for a CPU: that wait is taken out. A busy
    machine (a core hogged, load 6) stretched the bare span to 71 ms; without the wait, 2 ms.
    """
    with trio.fail_after(HANG_UP_WAIT):
        await recorded.disconnected.wait()
    assert recorded.disconnected_at is not None
    assert hung_up.until(recorded.disconnected_at) < HANG_UP_BOUND
    assert not recorded.completed


def chat_text(chunks: Iterable[ChatCompletionChunk]) -> str:
    """The text that a streamed chat completion's `chunks` deliver."""
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


async def streamed_chat_text(stream: AsyncIterable[ChatCompletionChunk]) -> str:
    """The text of a streamed chat completion, read to its end."""
    return chat_text([chunk async for chunk in stream])


async def collect_into(items: AsyncIterable[T], into: list[T]) -> None:
    """
    Iterate `items` to their end, keeping each in `into`: the one statement of a
    `pytest.raises` block for a stream that fails part way (`into` holds what came first).
    """
    async for item in items:
        into.append(item)


async def answer_statuses(proxy_url: str, route: str | None = None) -> dict[str, float]:
    """How many requests (to `route`, or to any) the proxy answered with each status, from its `/metrics`."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(proxy_url + "/metrics")).text
    counted: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "trioproxy_requests_total" and route in (None, sample.labels["route"]):
                counted[sample.labels["status"]] += sample.value
    return dict(counted)


async def stream_outcomes(proxy_url: str, route: str) -> dict[str, float]:
    """How many streams of `route` ended with each outcome, and how many upstream errors of each kind were counted."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(proxy_url + "/metrics")).text
    counted: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "trioproxy_streams_total" and sample.labels["route"] == route:
                counted[sample.labels["outcome"]] += sample.value
            elif sample.name == "trioproxy_upstream_errors_total":
                counted["upstream_errors:" + sample.labels["status"]] += sample.value
    return dict(counted)


def interleaved_tool_calls(*, in_one_chunk: bool = False) -> Reply:
    """
    A Chat Completions upstream that goes back to tool call 0 after starting tool call 1 (legal
    there, but neither a Response's items nor Anthropic's content blocks can interleave), then
    says nothing more, its connection open: only the proxy's cancel ends it. `in_one_chunk`:
    the whole interleaving in the first chunk that carries a tool call.
    """

    def chunk(delta: dict[str, Any]) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"

    calls = [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}},
    ]
    chunks = [{"tool_calls": calls}] if in_one_chunk else [{"tool_calls": [call]} for call in calls]
    body = chunk({"role": "assistant", "content": ""}) + b"".join(chunk(delta) for delta in chunks)
    return Reply(raw_body=body, stall_after=0)


def installed(path: Path, what: str, make_target: str) -> Path:
    """
    `path`, where `make {make_target}` installs `what` under `.node/`: without it a test is
    skipped, except under `CI=true`, where a missing install fails it.
    """
    if path.exists():
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing at {path}: run `make {make_target}`")
    pytest.skip(f"{what} is not installed at {path} (`make {make_target}` installs it)")


async def run_cli(argv: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """
    A command-line client run to its end against the proxy: no stdin, output kept. The caller
    bounds it (`trio.fail_after`): a cancel kills the process.
    """
    return await trio.run_process(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False
    )


def cli_answer(run: subprocess.CompletedProcess[bytes]) -> str:
    """A client's answer on stdout, once it has exited 0 (else its stderr says why)."""
    output = run.stdout.decode(errors="replace"), run.stderr.decode(errors="replace")
    assert run.returncode == 0, (run.returncode, *output)
    return run.stdout.decode()


class RequestSkipper:
    """
    Reads past the HTTP/1.1 requests on a raw upstream's connection (each head, then as much
    body as its `content-length` says), keeping what comes after for the next: for raw
    upstreams that answer whatever is asked.
    """

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.received = b""

    async def skip(self) -> bool:
        """Past the next request: False if the connection closed before a whole head came."""
        while b"\r\n\r\n" not in self.received:
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            self.received += data
        head, _, rest = self.received.partition(b"\r\n\r\n")
        [length] = [int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
        while len(rest) < length:
            rest += await self.stream.receive_some(65536)
        self.received = rest[length:]
        return True


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed): for a server to come, or a target that refuses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """
    A real `redis-server` (Debian's package) on 127.0.0.1, with its files in a temp dir and
    nothing saved; `stop()` kills it (as a crash would) and `start()` brings it back on the
    same port, empty.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.port = free_port()  # kept across restarts
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
    try:
        await server.start()  # a server that never accepts is killed too
        yield server
    finally:
        await server.stop()
