"""
Shared state on Redis (`[redis]`): the one module that talks to Redis, through coredis (which
runs on anyio, and so on trio).

What several processes must agree on lives here, so that N workers and replicas enforce one
set of limits rather than N: requests per minute, and concurrent streams per client and in
all. Each admission is one Lua script, atomic in Redis: it expires what is over, checks every
limit, and records the request and the stream's lease, or none of them; the time is Redis's
own (`TIME`), so the processes' clocks need not agree.

- The rate is exact: one sorted-set member per admitted request, scored by its time, so no
  60-second window ever holds more than the limit; `Retry-After` is when the oldest leaves.
- A stream's place is a lease, a member scored by its expiry, in two sorted sets: its
  client's and everyone's. The process renews its leases every third of `lease_ttl` and
  removes each when its stream ends; a process that dies stops renewing, and its leases
  expire within `lease_ttl`.
- Clients are named by the SHA-256 of their identity: no key appears in a Redis key.

Every call is bounded by `[redis] timeout` (connecting included): whatever coredis raises,
and a call that takes longer, becomes `SharedStateError`, here and nowhere else. coredis
reconnects by itself on the next call, so nothing needs doing when Redis is back.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, TypeVar, cast

import coredis
import trio
from coredis.retry import NoRetryPolicy

from ._config import RedisConfig
from ._exceptions import OverloadedError, RateLimitedError, SharedStateError
from ._limits import CONCURRENCY_RETRY_AFTER, RATE_WINDOW

__all__ = ["RedisState", "SharedLease", "SharedLimits"]

logger = logging.getLogger("trioproxy.redis")

_T = TypeVar("_T")

UNAVAILABLE: Final = "shared_state_unavailable"
"""The `code` of a `SharedStateError` (a refusal when `[redis] on_error = "closed"`)."""

_ADMIT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, rpm, per_client, total = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, ttl = ARGV[5], tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, tonumber(oldest[2]) + window - now}
  end
end
if per_client > 0 and redis.call('ZCARD', KEYS[2]) >= per_client then return {2, 0} end
if total > 0 and redis.call('ZCARD', KEYS[3]) >= total then return {3, 0} end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, lease)
  redis.call('PEXPIRE', KEYS[1], window)
end
redis.call('ZADD', KEYS[2], now + ttl, lease)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], now + ttl, lease)
redis.call('PEXPIRE', KEYS[3], ttl)
return {0, 0}
"""
"""KEYS: the client's requests, the client's leases, all leases. ARGV: window ms, the three limits, lease id, ttl ms."""

_RENEW: Final = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i])
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""
"""KEYS: all leases, then each lease's client's leases. ARGV: ttl ms, then each lease id (in KEYS' order)."""


@dataclass(frozen=True, slots=True)
class SharedLimits:
    """The limits enforced across processes (`[limits]`); 0 turns one off."""

    requests_per_minute: int = 0
    max_streams_per_key: int = 0
    max_concurrent_streams: int = 0


@dataclass(frozen=True, slots=True)
class SharedLease:
    """A stream's place in the shared limits: `id`, in its client's set of leases (`client_key`)."""

    id: str
    client_key: str


class RedisState:
    """
    The connection to Redis and what is kept there. `run` owns the client and renews the
    leases; it must be running (`nursery.start(state.run)`) while anything else is called.
    """

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._client = coredis.Redis.from_url(
            config.url,
            password=config.password,
            connect_timeout=config.timeout,
            stream_timeout=config.timeout,
            retry_policy=NoRetryPolicy(),  # our own timeout bounds the call; a retry would exceed it
        )
        self._admit = self._client.register_script(_ADMIT)
        self._renew = self._client.register_script(_RENEW)
        self._leases: dict[str, SharedLease] = {}
        """The leases this process holds, which it renews."""
        self.answering = True
        """False from a failed call to the next that succeeds."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client (coredis's pool lives in it) and renew the leases, until cancelled."""
        async with self._client:
            task_status.started()
            while True:
                await trio.sleep(self.config.lease_ttl / 3)
                await self._renew_leases()

    def _key(self, *parts: str) -> str:
        return self.config.key_prefix + ":".join(parts)

    def _client_key(self, what: str, client: str) -> str:
        return self._key(what, hashlib.sha256(client.encode()).hexdigest())

    async def admit(self, client: str, limits: SharedLimits) -> SharedLease:
        """
        A lease for one more stream of `client`, with the request counted, if every limit allows.

        Raises:
            RateLimitedError: `client` is over its requests per minute or concurrent streams.
            OverloadedError: `max_concurrent_streams` streams run, across every process.
            SharedStateError: Redis failed, or did not answer in time.
        """
        lease = SharedLease(secrets.token_hex(12), self._client_key("streams", client))
        keys = [self._client_key("requests", client), lease.client_key, self._key("streams")]
        args: list[int | str] = [
            int(RATE_WINDOW * 1000),
            limits.requests_per_minute,
            limits.max_streams_per_key,
            limits.max_concurrent_streams,
            lease.id,
            self._ttl_ms,
        ]
        reply: object = await self._call(self._admit(keys=keys, args=args))
        verdict, wait_ms = cast("list[int]", reply)  # _ADMIT returns {verdict, wait in ms}
        if verdict == 1:
            wait = int(wait_ms) / 1000
            raise RateLimitedError(
                f"rate limit reached: at most {limits.requests_per_minute} requests per minute per client; "
                f"retry in {math.ceil(wait)} s",
                code="rate_limit_exceeded",
                retry_after=wait,
            )
        if verdict == 2:
            raise RateLimitedError(
                f"this client already runs {limits.max_streams_per_key} streams, its limit; retry when one ends",
                code="too_many_streams",
                retry_after=CONCURRENCY_RETRY_AFTER,
            )
        if verdict == 3:
            raise OverloadedError(
                f"the server runs {limits.max_concurrent_streams} streams, its limit; retry shortly",
                code="server_overloaded",
                retry_after=CONCURRENCY_RETRY_AFTER,
            )
        self._leases[lease.id] = lease
        return lease

    async def release(self, lease: SharedLease) -> None:
        """
        Give the lease's place back, even from a cancelled task (shielded, and bounded like
        every call); if Redis cannot be told, the place expires within `lease_ttl`.
        """
        self._leases.pop(lease.id, None)
        with trio.CancelScope(shield=True):
            async with self.bounded():
                await self._client.zrem(lease.client_key, [lease.id])
                await self._client.zrem(self._key("streams"), [lease.id])

    @asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        """
        Any calls to Redis inside, bounded by `[redis] timeout` and mapped to `SharedStateError`.
        The log says when Redis stops answering and when it is back, once each.
        """
        try:
            with trio.fail_after(self.config.timeout):
                yield
        except trio.TooSlowError:
            failure = SharedStateError(
                f"Redis did not answer within [redis] timeout ({self.config.timeout:g} s)",
                code=UNAVAILABLE,
                retry_after=1,
            )
        except coredis.exceptions.RedisError as exc:
            failure = SharedStateError(f"Redis failed: {exc}", code=UNAVAILABLE, retry_after=1)
        else:
            if not self.answering:
                self.answering = True
                logger.warning("Redis answers again: limits are shared again")
            return
        if self.answering:
            self.answering = False
            logger.warning("%s; until it answers, [redis] on_error = %r applies", failure.message, self.config.on_error)
        raise failure

    async def _call(self, call: Awaitable[_T]) -> _T:
        async with self.bounded():
            return await call

    @property
    def _ttl_ms(self) -> int:
        return int(self.config.lease_ttl * 1000)

    async def _renew_leases(self) -> None:
        leases = list(self._leases.values())
        if not leases:
            return
        try:
            keys = [self._key("streams"), *(lease.client_key for lease in leases)]
            await self._call(self._renew(keys=keys, args=[self._ttl_ms, *(lease.id for lease in leases)]))
        except SharedStateError as exc:
            logger.warning("could not renew %d stream lease(s) in Redis: %s", len(leases), exc.message)
