#!/usr/bin/env python3
"""
What a Redis client costs trioproxy per call, for choosing one: the calls trioproxy makes per
request with `[redis]` (the admission script, the stream's release, the breaker's admit and
settle, a write of ten events of a resumable stream), each timed in wall time and in this
process's CPU, over loopback against a `redis-server` this script starts on a free port (and
stops).

    python benchmarks/redis_client.py                 # 2000 calls of each, after 200 to warm up
    python benchmarks/redis_client.py --calls 500

Clients measured, all on trio:

- `coredis`: trioproxy's own calls (`_redis.RedisState`: coredis on anyio, each call bounded
  by `[redis] timeout` and mapped to our errors), exactly what a request pays;
- `raw RESP`: the same commands (the same scripts, by EVALSHA) written on a `trio.SocketStream`
  by a minimal RESP2 client here: the baseline of what the wire and Redis cost, with no client
  to speak of;
- `redis-py`: redis-py's asyncio client, which needs an asyncio loop: run on trio through
  trio-asyncio (`aio_as_trio` per call). Measured when both are installed (`pip install redis
  trio-asyncio`); otherwise skipped, and the table says so.

Last, what the shared circuit breaker costs one upstream request that succeeds, as
`_redis.SharedBreakers` makes its calls (or not: see `[redis] breaker_snapshot_age`).

The calls run one after another (no pipelining, as a request makes them), so wall time is a
round trip plus the client's work; CPU is this process's (`time.process_time`), so it leaves
out redis-server's own. On a machine shared with other work, compare medians of a few runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import trio

# Runs from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trioproxy._bench.options import _positive_int
from trioproxy._bench.processes import start_redis
from trioproxy._config import RedisConfig
from trioproxy._limits import TOKEN_WINDOWS
from trioproxy._policy import BreakerConfig
from trioproxy._redis import (
    _ADMIT,
    _APPEND,
    _BREAKER_ADMIT,
    _BREAKER_SETTLE,
    _RELEASE,
    BREAKER_TTL,
    RedisState,
    SharedBreakers,
    SharedLimits,
)

TIMEOUT: Final = 5.0
"""Every client's bound on one call, in seconds: coredis's is `[redis] timeout`, the others get the same."""
LIMITS: Final = SharedLimits(requests_per_minute=10**9, max_streams_per_key=10**6, max_concurrent_streams=10**6)
"""Every limit on, none reached: the admission script does all its work and always admits."""
EVENTS: Final = [(n, b'{"type":"token","text":" tok%d"}' % n) for n in range(10)]
"""One batched write of a resumable stream: ten events."""
APPEND_ARGS: Final = [10000, 300000, "0", *(part for event_id, data in EVENTS for part in (event_id, data))]
"""The append script's arguments for `EVENTS`, as `RedisState.append_events` gives them with the default bounds."""
SCRIPTS: Final = {
    "admit": _ADMIT,
    "breaker_admit": _BREAKER_ADMIT,
    "settle": _BREAKER_SETTLE,
    "append": _APPEND,
    "release": _RELEASE,
}
"""trioproxy's Lua scripts, loaded by the other clients under these names."""

Call = Callable[[int], Awaitable[object]]
"""One measured call; its argument numbers it (a fresh stream for each write, say)."""


class RespClient:
    """
    The least a RESP2 client is: encode a command, read one reply, within `TIMEOUT` (as
    coredis's calls are bounded). No pool, no retry.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def call(self, *parts: bytes | str | int) -> object:
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            out += [b"$%d\r\n" % len(data), data, b"\r\n"]
        with trio.fail_after(TIMEOUT):
            await self._stream.send_all(b"".join(out))
            return await self._reply()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            raise EOFError("redis-server closed the connection")
        self._buffer += data

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _reply(self) -> object:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) < size + 2:
                await self._fill()
            data = bytes(self._buffer[:size])
            del self._buffer[: size + 2]
            return data
        assert kind == b"*", line
        count = int(rest)
        return None if count < 0 else [await self._reply() for _ in range(count)]


def _script_args(lease: str) -> tuple[list[str], list[int | str]]:
    """The keys and arguments `RedisState.admit` gives the admission script, for `LIMITS`."""
    keys = ["bench:requests:c", "bench:streams:c", "bench:streams"] + [
        f"bench:tokens:{p}:{s}" for p in ("minute", "day") for s in ("times", "amounts")
    ]
    args: list[int | str] = [
        60000,
        LIMITS.requests_per_minute,
        LIMITS.max_streams_per_key,
        LIMITS.max_concurrent_streams,
        lease,
        30000,
        0,
        0,
        0,
        int(TOKEN_WINDOWS["day"] * 1000),
    ]
    return keys, args


def breaker_per_request(state: RedisState) -> Call:
    """What the shared breaker costs an upstream request that succeeds: `SharedBreakers`' admit, then settle."""
    breakers = SharedBreakers(state, "bench", BreakerConfig())
    url = "http://127.0.0.1:1/v1"

    async def request(n: int) -> None:
        await breakers.admit(url, trio.current_time())
        await breakers.settle(url, "succeeded", probe=False, now=trio.current_time())

    return request


def coredis_calls(state: RedisState) -> dict[str, Call]:
    """trioproxy's own calls, as a request makes them."""
    breaker = state._key("breaker", "bench", "target")

    async def admit_release(n: int) -> None:
        await state.release(await state.admit("client", LIMITS))

    return {
        "admission + release": admit_release,
        "breaker admit": lambda n: state.admit_to_breaker(breaker),
        "breaker settle (success)": lambda n: state.settle_breaker(
            breaker, "succeeded", probe=False, failures=5, cooldown=30
        ),
        "stream write (10 events)": lambda n: state.append_events(f"coredis-{n}", EVENTS, ended=False),
    }


async def raw_calls(client: RespClient) -> dict[str, Call]:
    """The same commands on the raw RESP client."""
    sha = {}
    for name, script in SCRIPTS.items():
        reply = await client.call("SCRIPT", "LOAD", script)
        assert isinstance(reply, bytes)
        sha[name] = reply

    async def admit_release(n: int) -> None:
        lease = f"raw-{n}"
        keys, args = _script_args(lease)
        await client.call("EVALSHA", sha["admit"], len(keys), *keys, *args)
        await client.call("EVALSHA", sha["release"], 2, keys[1], keys[2], lease, "")

    async def write(n: int) -> None:
        await client.call("EVALSHA", sha["append"], 1, f"bench:stream:raw-{n}", *APPEND_ARGS)

    return {
        "admission + release": admit_release,
        "breaker admit": lambda n: client.call("EVALSHA", sha["breaker_admit"], 1, "bench:breaker:raw", 30000),
        "breaker settle (success)": lambda n: client.call(
            "EVALSHA", sha["settle"], 1, "bench:breaker:raw", "succeeded", "0", 5, 30000, int(BREAKER_TTL * 1000)
        ),
        "stream write (10 events)": write,
    }


async def measure(calls: dict[str, Call], count: int, warmup: int) -> dict[str, tuple[float, float]]:
    """(wall ms, CPU ms) per call of each."""
    figures = {}
    for name, call in calls.items():
        for n in range(warmup):
            await call(-n - 1)
        wall, cpu = time.perf_counter(), time.process_time()
        for n in range(count):
            await call(n)
        figures[name] = ((time.perf_counter() - wall) * 1000 / count, (time.process_time() - cpu) * 1000 / count)
    return figures


async def measure_redis_py(url: str, count: int, warmup: int) -> dict[str, tuple[float, float]] | str:
    """redis-py's asyncio client on trio-asyncio's loop, or why not."""
    try:
        import redis.asyncio as aioredis
        import trio_asyncio
    except ImportError as exc:
        return f"not installed ({exc.name}): pip install redis trio-asyncio"
    async with trio_asyncio.open_loop():
        client = aioredis.Redis.from_url(url, socket_timeout=TIMEOUT)
        scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}

        async def admit_release(n: int) -> None:
            lease = f"py-{n}"
            keys, args = _script_args(lease)
            await scripts["admit"](keys=keys, args=args)
            await scripts["release"](keys=keys[1:3], args=[lease, ""])

        async def write(n: int) -> None:
            await scripts["append"](keys=[f"bench:stream:py-{n}"], args=APPEND_ARGS)

        asyncio_calls = {
            "admission + release": admit_release,
            "breaker admit": lambda n: scripts["breaker_admit"](keys=["bench:breaker:py"], args=[30000]),
            "breaker settle (success)": lambda n: scripts["settle"](
                keys=["bench:breaker:py"], args=["succeeded", "0", 5, 30000, int(BREAKER_TTL * 1000)]
            ),
            "stream write (10 events)": write,
        }
        calls: dict[str, Call] = {name: trio_asyncio.aio_as_trio(call) for name, call in asyncio_calls.items()}
        try:
            return await measure(calls, count, warmup)
        finally:
            await trio_asyncio.aio_as_trio(client.aclose)()


async def main(count: int, warmup: int) -> None:
    results: dict[str, dict[str, tuple[float, float]] | str] = {}
    with tempfile.TemporaryDirectory(prefix="trioproxy-redis-bench-") as directory:
        async with start_redis(cpus=None, log_dir=Path(directory)) as url:
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                results["raw RESP"] = await measure(await raw_calls(RespClient(stream)), count, warmup)
            state = RedisState(RedisConfig(url=url, key_prefix="bench:", timeout=TIMEOUT))
            async with trio.open_nursery() as nursery:
                await nursery.start(state.run)
                results["coredis"] = await measure(coredis_calls(state), count, warmup)
                per_request = await measure({"": breaker_per_request(state)}, count, warmup)
                nursery.cancel_scope.cancel()
            results["redis-py (trio-asyncio)"] = await measure_redis_py(url, count, warmup)
    print(f"per call, ms (wall / this process's CPU), {count} calls each after {warmup} to warm up")
    names = list(next(r for r in results.values() if isinstance(r, dict)))
    print(f"{'':28}" + "".join(f"{client:>26}" for client in results))
    for name in names:
        cells = []
        for figures in results.values():
            cells.append("skipped" if isinstance(figures, str) else "{:.3f} / {:.3f}".format(*figures[name]))
        print(f"{name:28}" + "".join(f"{cell:>26}" for cell in cells))
    for client, figures in results.items():
        if isinstance(figures, str):
            print(f"{client}: {figures}")
    wall, cpu = per_request[""]
    print(f"the shared breaker per upstream request (SharedBreakers: admit, settle a success): {wall:.3f} / {cpu:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=_positive_int, default=2000, help="calls of each kind measured (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="calls of each kind first, not measured (default 200)")
    options = parser.parse_args()
    trio.run(main, options.calls, options.warmup)
