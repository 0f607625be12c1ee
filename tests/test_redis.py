"""
`_redis.RedisState` against a real `redis-server` (the `redis_server` fixture), under trio:
coredis runs on anyio, so on trio, and these tests are how we know. Redis keeps its own time,
so lease expiry waits for real (a second or two), polled within a bound.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tests.conftest import RedisServer, wait_until
from trioproxy._config import RedisConfig
from trioproxy._exceptions import OverloadedError, RateLimitedError, SharedStateError
from trioproxy._redis import RedisState, SharedLease, SharedLimits


@asynccontextmanager
async def running(server: RedisServer, **settings: object) -> AsyncIterator[RedisState]:
    state = RedisState(RedisConfig(url=server.url, **settings))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        yield state
        nursery.cancel_scope.cancel()


async def admitted(state: RedisState, client: str, limits: SharedLimits, tries: int) -> list[SharedLease]:
    """`tries` admissions at once; the leases of those admitted."""
    leases: list[SharedLease] = []

    async def one() -> None:
        with contextlib.suppress(RateLimitedError):
            leases.append(await state.admit(client, limits))

    async with trio.open_nursery() as nursery:
        for _ in range(tries):
            nursery.start_soon(one)
    return leases


async def test_requests_per_minute_are_exact_under_concurrent_admissions(redis_server: RedisServer) -> None:
    limits = SharedLimits(requests_per_minute=10)
    async with running(redis_server) as first, running(redis_server) as second:
        leases = await admitted(first, "key:a", limits, 30) + await admitted(second, "key:a", limits, 30)
        assert len(leases) == 10
        for lease in leases:  # a request counts for the minute, whether its stream still runs or not
            await first.release(lease)
        with pytest.raises(RateLimitedError) as refused:
            await second.admit("key:a", limits)
        assert refused.value.code == "rate_limit_exceeded"
        assert 55 < refused.value.retry_after <= 60  # type: ignore[operator]
        assert len(await admitted(second, "key:b", limits, 3)) == 3  # another client has its own


async def test_concurrent_streams_per_client_and_in_all(redis_server: RedisServer) -> None:
    limits = SharedLimits(max_streams_per_key=2, max_concurrent_streams=3)
    async with running(redis_server) as first, running(redis_server) as second:
        a1, _ = await admitted(first, "key:a", limits, 5)
        with pytest.raises(RateLimitedError) as per_client:
            await second.admit("key:a", limits)
        assert (per_client.value.code, per_client.value.retry_after) == ("too_many_streams", 1.0)
        await second.admit("key:b", limits)
        with pytest.raises(OverloadedError) as in_all:
            await second.admit("key:c", limits)
        assert in_all.value.code == "server_overloaded"
        await first.release(a1)
        await second.admit("key:a", limits)  # a place given back is free at once, in every process


async def test_the_leases_of_a_process_that_died_expire(redis_server: RedisServer) -> None:
    limits = SharedLimits(max_concurrent_streams=1)
    async with running(redis_server, lease_ttl=1.0) as survivor:
        async with running(redis_server, lease_ttl=1.0) as doomed:
            await doomed.admit("key:a", limits)
        # `doomed` no longer renews (as if its process had died): its place is freed in lease_ttl.
        with pytest.raises(OverloadedError):
            await survivor.admit("key:b", limits)

        async def admits() -> bool:
            try:
                await survivor.admit("key:b", limits)
            except OverloadedError:
                return False
            return True

        await wait_until(admits, seconds=5)


async def test_live_leases_are_renewed(redis_server: RedisServer) -> None:
    limits = SharedLimits(max_concurrent_streams=1)
    async with running(redis_server, lease_ttl=0.6) as holder, running(redis_server, lease_ttl=0.6) as other:
        await holder.admit("key:a", limits)
        for _ in range(4):  # well past its ttl, renewed every 0.2 s
            await trio.sleep(0.5)
            with pytest.raises(OverloadedError):
                await other.admit("key:b", limits)


async def test_redis_down_or_stalled_is_a_shared_state_error_then_recovers(redis_server: RedisServer) -> None:
    limits = SharedLimits(requests_per_minute=100)
    async with running(redis_server, timeout=0.5) as state:
        await state.admit("key:a", limits)
        await redis_server.stop()
        with trio.fail_after(2), pytest.raises(SharedStateError, match="Redis failed"):
            await state.admit("key:a", limits)
        assert not state.answering

        await redis_server.start()
        await state.admit("key:a", limits)  # coredis reconnects on its own
        assert state.answering

        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)  # accepts, never answers
        try:
            with trio.fail_after(2), pytest.raises(SharedStateError, match=r"within \[redis\] timeout \(0.5 s\)"):
                await state.admit("key:a", limits)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)


async def test_no_key_appears_in_redis(redis_server: RedisServer) -> None:
    import coredis

    async with running(redis_server, key_prefix="tp:") as state:
        await state.admit("key:sk-client-secret", SharedLimits(requests_per_minute=5))
        async with coredis.Redis.from_url(redis_server.url) as client:
            keys = sorted(k.decode() for k in await client.keys("*"))
    assert all(k.startswith("tp:") for k in keys)
    assert len(keys) == 3
    assert not any("secret" in k for k in keys)
