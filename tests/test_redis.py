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

import coredis
import pytest
import trio

from tests.conftest import RedisServer, wait_until
from trioproxy._config import RedisConfig
from trioproxy._exceptions import OverloadedError, RateLimitedError, ReplayGapError, SharedStateError
from trioproxy._policy import BreakerConfig
from trioproxy._redis import BREAKER_TTL, LoggedEvents, RedisState, SharedBreakers, SharedLease, SharedLimits


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


async def until_one_blocked(watcher: coredis.Redis[bytes]) -> None:
    """Until Redis reports one client blocked: a follower's XREAD waits there."""

    async def one_blocked() -> bool:
        return (await watcher.info("clients"))["blocked_clients"] == 1

    await wait_until(one_blocked, seconds=3)


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


async def test_admissions_at_once_on_a_fresh_redis_find_their_script_loaded(redis_server: RedisServer) -> None:
    """
    Unloaded, each of 50 admissions at once would run EVALSHA, get NOSCRIPT, load the script
    and run it again: twice the round trips, all in their time to first token.
    """
    async with running(redis_server) as state, coredis.Redis.from_url(redis_server.url) as probe:
        await probe.config_resetstat()
        assert len(await admitted(state, "key:a", SharedLimits(), 50)) == 50
        calls = await probe.info("commandstats")
    assert "cmdstat_script|load" not in calls
    assert calls["cmdstat_evalsha"]["calls"] == 50


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
    async with running(redis_server, key_prefix="tp:") as state:
        await state.admit("key:sk-client-secret", SharedLimits(requests_per_minute=5))
        async with coredis.Redis.from_url(redis_server.url) as client:
            keys = sorted(k.decode() for k in await client.keys("*"))
    assert all(k.startswith("tp:") for k in keys)
    assert len(keys) == 3
    assert not any("secret" in k for k in keys)


async def test_token_budgets_are_reserved_exactly_and_reconciled_with_the_usage(redis_server: RedisServer) -> None:
    limits = SharedLimits(tokens_per_minute=1000, tokens_per_day=1500)
    # A generous timeout: twenty admissions at once open connections at once, on a busy machine.
    async with running(redis_server, timeout=5) as first, running(redis_server, timeout=5) as second:

        async def reserve(state: RedisState, tokens: int) -> SharedLease | None:
            try:
                return await state.admit("key:a", limits, tokens)
            except RateLimitedError:
                return None

        leases: list[SharedLease | None] = []
        async with trio.open_nursery() as nursery:  # 20 reservations of 100 at once: exactly 10 fit

            async def one(state: RedisState) -> None:
                leases.append(await reserve(state, 100))

            for n in range(20):
                nursery.start_soon(one, (first, second)[n % 2])
        held = [lease for lease in leases if lease is not None]
        assert len(held) == 10
        with pytest.raises(RateLimitedError) as refused:
            await second.admit("key:a", limits, 1)
        assert refused.value.code == "tokens_per_minute_exceeded"
        assert 58 < refused.value.retry_after <= 60  # type: ignore[operator]

        for lease in held:  # each used 10 of its 100: 100 in all
            await first.release(lease, used=10)
        lease = await second.admit("key:a", limits, 900)  # 100 + 900 = 1000
        await second.release(lease)  # no usage known: the reservation stands
        with pytest.raises(RateLimitedError):
            await first.admit("key:a", limits, 1)

        with pytest.raises(RateLimitedError) as too_big:
            await first.admit("key:b", limits, 1001)
        assert (too_big.value.code, too_big.value.retry_after) == ("tokens_per_minute_exceeded", None)

        day = SharedLimits(tokens_per_day=1500)
        await first.admit("key:c", day, 1000)
        with pytest.raises(RateLimitedError) as over_the_day:
            await second.admit("key:c", day, 501)
        assert over_the_day.value.code == "tokens_per_day_exceeded"
        assert 86_390 < over_the_day.value.retry_after <= 86_400  # type: ignore[operator]


async def test_a_streams_events_are_appended_once_read_after_an_id_and_followed_to_their_end(
    redis_server: RedisServer,
) -> None:
    async with (
        running(redis_server, stream_max_events=1000) as writer,
        running(redis_server) as reader,
        coredis.Redis.from_url(redis_server.url) as watcher,
    ):
        assert await reader.read_events("st_x", 0) is None
        await writer.append_events("st_x", [(1, b"one"), (2, b"two")], ended=False)
        await writer.append_events("st_x", [(2, b"two"), (3, b"three")], ended=False)  # a retried write: 2 once
        logged = await reader.read_events("st_x", 1)
        assert logged == LoggedEvents([(2, b"two"), (3, b"three")], ended=False, last_id=3)
        assert await reader.read_events("st_x", 3) == LoggedEvents([], ended=False, last_id=3)

        async def end_later() -> None:
            await until_one_blocked(watcher)
            await writer.append_events("st_x", [(4, b"four")], ended=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_later)
            with trio.fail_after(3):
                followed = await reader.follow_events("st_x", 3)  # waits for it
        assert followed == LoggedEvents([(4, b"four")], ended=True, last_id=4)
        assert await reader.read_events("st_x", 4) == LoggedEvents([], ended=True, last_id=4)
        await writer.append_events("st_x", [(5, b"late")], ended=True)  # after its end: ignored
        assert (await reader.read_events("st_x", 0)).events[-1] == (4, b"four")  # type: ignore[union-attr]


async def test_a_conversation_is_kept_beside_its_stream_as_long_and_deleted_with_it(redis_server: RedisServer) -> None:
    async with running(redis_server, key_prefix="tp:") as state, coredis.Redis.from_url(redis_server.url) as client:
        state.stream_retention = 60.0
        assert await state.read_conversation("resp_x") is None
        await state.append_events("resp_x", [(1, b"one")], ended=True)
        await state.keep_conversation("resp_x", b'{"input": []}')
        assert await state.read_conversation("resp_x") == b'{"input": []}'
        assert 59_000 < await client.pttl("tp:stream:resp_x:conversation") <= 60_000
        await state.delete_events("resp_x")
        assert await state.read_conversation("resp_x") is None
        assert await state.read_events("resp_x", 0) is None


async def test_a_replay_from_before_the_kept_events_is_a_gap(redis_server: RedisServer) -> None:
    async with running(redis_server, stream_max_events=1) as state:
        for n in range(1, 300):  # MAXLEN ~ trims whole nodes: far more than one node's worth
            await state.append_events("st_y", [(n, b"x")], ended=False)
        with pytest.raises(ReplayGapError):
            await state.read_events("st_y", 0)
        assert (await state.read_events("st_y", 298)).events == [(299, b"x")]  # type: ignore[union-attr]


async def test_a_breaker_opened_by_one_process_is_skipped_by_the_others_and_probed_once(
    redis_server: RedisServer,
) -> None:
    config = BreakerConfig(failures=2, cooldown=0.5)
    url = "http://10.0.0.1:8000/v1"
    every_time = {"lease_ttl": 5, "breaker_snapshot_age": 0}  # each call asks Redis
    async with running(redis_server, **every_time) as first_state, running(redis_server, **every_time) as second_state:
        first, second = SharedBreakers(first_state, "p", config), SharedBreakers(second_state, "p", config)
        assert await second.admit(url, 0) == "closed"
        assert await first.admit(url, 0) == "closed"
        assert await first.settle(url, "failed", probe=False, now=0) is None
        assert await second.settle(url, "failed", probe=False, now=0) == "open"  # two failures, two processes
        assert await first.admit(url, 0) is None  # skipped: no connection tried
        assert first.state(url) == "open"
        await trio.sleep(0.6)  # the cooldown, on Redis's clock
        admitted = [await breakers.admit(url, 0) for breakers in (first, second, first)]
        assert admitted == ["half_open", None, None]  # one probe among them all
        assert await first.settle(url, "succeeded", probe=True, now=0) == "closed"
        assert await second.admit(url, 0) == "closed"
        assert SharedBreakers(first_state, "other", config).state(url) == "closed"  # another provider's own


async def test_a_closed_breaker_is_taken_from_what_redis_said_within_breaker_snapshot_age(
    redis_server: RedisServer,
) -> None:
    """What needs no write is not sent: the cost is that another process's news arrives up to the age late."""
    config = BreakerConfig(failures=2, cooldown=30)
    url = "http://10.0.0.1:8000/v1"
    async with running(redis_server, breaker_snapshot_age=0.1) as first_state, running(redis_server) as second_state:
        first, second = SharedBreakers(first_state, "p", config), SharedBreakers(second_state, "p", config)
        assert await first.admit(url, 10.0) == "closed"  # asked: closed, no failures
        assert await second.admit(url, 10.0) == "closed"
        assert await second.settle(url, "failed", probe=False, now=10.0) is None  # a failure: always written
        assert await first.settle(url, "succeeded", probe=False, now=10.05) is None  # not written...
        assert await second.settle(url, "failed", probe=False, now=10.05) == "open"  # ...so this is the second
        assert await first.admit(url, 10.09) == "closed"  # what Redis said 90 ms ago
        assert await first.admit(url, 10.11) is None  # asked again: open, skipped
        assert first.state(url) == "open"
        assert await first.admit(url, 10.12) is None  # not closed: asked every time


async def test_breakers_fall_back_to_the_process_while_redis_is_down(redis_server: RedisServer) -> None:
    config = BreakerConfig(failures=1, cooldown=30)
    url = "http://10.0.0.1:8000/v1"
    async with running(redis_server) as state:
        breakers = SharedBreakers(state, "p", config)
        await redis_server.stop()
        with trio.fail_after(3):
            assert await breakers.admit(url, 0) == "closed"
            assert await breakers.settle(url, "failed", probe=False, now=0) == "open"  # this process's own
            assert await breakers.admit(url, 1) is None
        await redis_server.start()
        assert await breakers.admit(url, 1) == "closed"  # Redis's, again (it restarted empty)


async def test_a_breaker_in_an_unknown_state_is_a_shared_state_error_and_the_process_decides(
    redis_server: RedisServer,
) -> None:
    """Whatever wrote it (another version, a hand), a state no script knows is broken shared state, not an assert."""
    config = BreakerConfig(failures=1, cooldown=30)
    url = "http://10.0.0.1:8000/v1"
    async with running(redis_server) as state, coredis.Redis.from_url(redis_server.url) as writer:
        breakers = SharedBreakers(state, "p", config)
        key = breakers._key(url)
        await writer.hset(key, {"state": "melted"})
        with pytest.raises(SharedStateError) as broken:
            await state.settle_breaker(key, "released", probe=True, failures=1, cooldown=30)
        assert broken.value.code == "shared_state_unavailable"
        assert "'melted'" in broken.value.message
        assert await breakers.settle(url, "released", probe=True, now=0) is None  # this process's own
        assert breakers.state(url) == "closed"


async def test_a_breaker_settled_is_kept_for_breaker_ttl(redis_server: RedisServer) -> None:
    url = "http://10.0.0.1:8000/v1"
    async with running(redis_server) as state, coredis.Redis.from_url(redis_server.url) as watcher:
        breakers = SharedBreakers(state, "p", BreakerConfig(failures=3, cooldown=30))
        kept_ms = []
        for _ in range(2):  # the first failure creates the hash; the second finds it
            assert await breakers.settle(url, "failed", probe=False, now=0) is None
            kept_ms.append(await watcher.pttl(breakers._key(url)))
    assert all(BREAKER_TTL * 1000 - 1000 < ms <= BREAKER_TTL * 1000 for ms in kept_ms), kept_ms


async def test_a_follower_that_leaves_mid_wait_leaves_no_reply_behind(redis_server: RedisServer) -> None:
    """A watcher's client gone cancels its blocking read: the next reads get their own replies."""
    async with (
        running(redis_server, follow_block=2) as state,
        coredis.Redis.from_url(redis_server.url) as watcher,
    ):
        await state.append_events("st_z", [(1, b"a")], ended=False)
        for n in range(2, 8):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(state.follow_events, "st_z", n - 1)
                await until_one_blocked(watcher)  # it waits...
                nursery.cancel_scope.cancel()  # ...and is cancelled
            await state.append_events("st_z", [(n, b"%d" % n)], ended=False)
            assert await state.follow_events("st_z", n - 1) == LoggedEvents([(n, b"%d" % n)], ended=False, last_id=n)
            assert (await state.read_events("st_z", n - 1)).events == [(n, b"%d" % n)]  # type: ignore[union-attr]
