"""
Shared state on Redis (`[redis]`): the one module that talks to Redis, through coredis (which
runs on anyio, and so on trio).

What several processes must agree on lives here, so that N workers and replicas enforce one
set of limits rather than N: requests per minute, token budgets, and concurrent streams per
client and in all. Each admission is one Lua script, atomic in Redis: it expires what is over,
checks every limit, and records the request, its token reservations and the stream's lease, or
none of them; the time is Redis's own (`TIME`), so the processes' clocks need not agree.

- The rate is exact: one sorted-set member per admitted request, scored by its time, so no
  60-second window ever holds more than the limit; `Retry-After` is when the oldest leaves.
- A stream's place is a lease, a member scored by its expiry, in two sorted sets: its
  client's and everyone's. The process renews its leases every third of `lease_ttl` and
  removes each when its stream ends; a process that dies stops renewing, and its leases
  expire within `lease_ttl`.
- A token budget is exact too: each reservation a member of a sorted set scored by its time,
  its amount in a hash beside, with their running total (`#total`), so a check reads one
  field and only a refusal walks the entries (for `Retry-After`). The stream's end corrects
  the amount to the upstream's count (a second script, which also gives the stream's place
back), unless it left its window already.
- A resumable stream's (or stored response's) events are a Redis Stream, entry `0-n` for
  event `n` and an `end` entry after the last, bounded by `[redis] stream_max_events` (MAXLEN)
  and expiring `[streams] retention` after its last write (`append_events`, one script); any
  process replays it (`read_events`) and follows it (`follow_events`, a blocking XREAD on
  connections of its own, bounded by `timeout + follow_block`). A stored response's
  conversation, what `previous_response_id` continues, is a string beside it, written once
  when it ends (`keep_conversation`), expiring with it, deleted with it.
- A provider's circuit breakers (`SharedBreakers`): one hash per target, admitted and settled
  by a script each, with the rules of `_targets.LocalBreakers`, and not asked at all about a
  breaker it said is closed less than `[redis] breaker_snapshot_age` ago; this process's own
  decide while Redis fails (or holds a breaker in a state no script knows).
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
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Final, TypeVar, cast

import coredis
import trio
from coredis.response.types import StreamEntry
from coredis.retry import NoRetryPolicy

from ._config import RedisConfig
from ._exceptions import OverloadedError, RateLimitedError, ReplayGapError, SharedStateError
from ._limits import CONCURRENCY_RETRY_AFTER, RATE_WINDOW, TOKEN_WINDOWS, token_budget_refusal
from ._policy import BreakerConfig, StreamsConfig
from ._targets import BREAKER_STATES, BreakerState, LocalBreakers, Verdict

__all__ = ["LoggedEvents", "RedisState", "SharedBreakers", "SharedLease", "SharedLimits"]

logger = logging.getLogger("trioproxy.redis")

_T = TypeVar("_T")

UNAVAILABLE: Final = "shared_state_unavailable"
"""The `code` of a `SharedStateError` (a refusal when `[redis] on_error = "closed"`)."""
FOLLOW_BATCH: Final = 256
"""Events one blocking read (`follow_events`) takes at most, a bound on one reply: the rest come with the next."""
BREAKER_TTL: Final = 24 * 60 * 60.0
"""Seconds a breaker's hash is kept after its last verdict (`_BREAKER_SETTLE`): then it is forgotten, closed."""

_ADMIT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, rpm, per_client, total = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, ttl = ARGV[5], tonumber(ARGV[6])
local tokens = tonumber(ARGV[7])
local budgets = {
  {KEYS[4], KEYS[5], tonumber(ARGV[8]), window},
  {KEYS[6], KEYS[7], tonumber(ARGV[9]), tonumber(ARGV[10])},
}

local function expire(times, amounts, cutoff)
  local gone = redis.call('ZRANGEBYSCORE', times, '-inf', cutoff)
  if #gone == 0 then return end
  local freed = 0
  for _, id in ipairs(gone) do
    freed = freed + (tonumber(redis.call('HGET', amounts, id)) or 0)
    redis.call('HDEL', amounts, id)
  end
  redis.call('ZREMRANGEBYSCORE', times, '-inf', cutoff)
  redis.call('HINCRBY', amounts, '#total', -freed)
end

local function wait(times, amounts, limit, span)
  if tokens > limit then return -1 end
  local used = tonumber(redis.call('HGET', amounts, '#total')) or 0
  if used + tokens <= limit then return 0 end
  local entries = redis.call('ZRANGE', times, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    used = used - (tonumber(redis.call('HGET', amounts, entries[i])) or 0)
    if used + tokens <= limit then return tonumber(entries[i + 1]) + span - now end
  end
  return 0
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, tonumber(oldest[2]) + window - now}
  end
end
for i, budget in ipairs(budgets) do
  if budget[3] > 0 then
    expire(budget[1], budget[2], now - budget[4])
    local ms = wait(budget[1], budget[2], budget[3], budget[4])
    if ms ~= 0 then return {3 + i, ms} end
  end
end
if per_client > 0 and redis.call('ZCARD', KEYS[2]) >= per_client then return {2, 0} end
if total > 0 and redis.call('ZCARD', KEYS[3]) >= total then return {3, 0} end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, lease)
  redis.call('PEXPIRE', KEYS[1], window)
end
for _, budget in ipairs(budgets) do
  if budget[3] > 0 then
    redis.call('ZADD', budget[1], now, lease)
    redis.call('HSET', budget[2], lease, tokens)
    redis.call('HINCRBY', budget[2], '#total', tokens)
    redis.call('PEXPIRE', budget[1], budget[4])
    redis.call('PEXPIRE', budget[2], budget[4])
  end
end
redis.call('ZADD', KEYS[2], now + ttl, lease)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], now + ttl, lease)
redis.call('PEXPIRE', KEYS[3], ttl)
return {0, 0}
"""
"""
KEYS: the client's requests, the client's leases, all leases, then each token budget's
(minute, day) reservation times and amounts. ARGV: window ms, the three limits, lease id,
ttl ms, tokens to reserve, tokens per minute, tokens per day, the day's window ms. Returns the verdict (0: admitted;
1 rate, 2 client's streams, 3 all streams, 4 tokens per minute, 5 tokens per day) and the ms
until it could pass (-1: never).
"""

_RELEASE: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '' then return 0 end
for i = 3, #KEYS do
  local reserved = tonumber(redis.call('HGET', KEYS[i], ARGV[1]))
  if reserved then
    redis.call('HSET', KEYS[i], ARGV[1], ARGV[2])
    redis.call('HINCRBY', KEYS[i], '#total', tonumber(ARGV[2]) - reserved)
  end
end
return 0
"""
"""
KEYS: the lease's client's leases, all leases, then the amounts of each budget it reserved in.
ARGV: lease id, tokens used ('' when the upstream did not say: the reservations stand). One
round trip for the place and the reconciliation; a reservation gone from its window is left
gone.
"""

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


_APPEND: Final = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = 0
if #top > 0 then
  if top[1][2][1] == 'end' then return 0 end
  last = tonumber(string.match(top[1][1], '^0%-(%d+)$'))
end
for i = 4, #ARGV, 2 do
  local id = tonumber(ARGV[i])
  if id > last then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. id, 'd', ARGV[i + 1])
    last = id
  end
end
if ARGV[3] == '1' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. (last + 1), 'end', '1')
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"""
"""
KEYS: the stream's events. ARGV: the most entries kept, their age ms, '1' if the stream ended
here, then each event's id and data. Entry `0-n` is event `n`; an `end` entry follows the last.
An event already there (a call that timed out after Redis ran it, retried) is not added twice.
"""


_BREAKER_ADMIT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local breaker = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'probe_until', 'failures')
local state, failures = breaker[1] or 'closed', tonumber(breaker[4]) or 0
if state == 'closed' then return {'closed', failures} end
if state == 'open' then
  if now < tonumber(breaker[2]) then return {'open', failures} end
  redis.call('HSET', KEYS[1], 'state', 'half_open')
end
if now < (tonumber(breaker[3]) or 0) then return {'probing', failures} end
redis.call('HSET', KEYS[1], 'probe_until', now + tonumber(ARGV[1]))
return {'probe', failures}
"""
"""
KEYS: the target's breaker. ARGV: ms a probe holds the half-open breaker, at most (its process
may die). Returns `closed`, `probe` (this request probes), `open` or `probing` (skip it), and
the failures counted.
"""

_BREAKER_SETTLE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local verdict, probe, threshold, cooldown = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local breaker = redis.call('HMGET', KEYS[1], 'state', 'failures')
local state = breaker[1] or 'closed'
if probe then redis.call('HDEL', KEYS[1], 'probe_until') end
if verdict == 'released' then return {state, '', tonumber(breaker[2]) or 0} end
if verdict == 'succeeded' then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if state == 'closed' and (tonumber(breaker[2]) or 0) == 0 then return {state, '', 0} end
  redis.call('HSET', KEYS[1], 'failures', 0, 'state', 'closed')
  if state == 'closed' then return {state, '', 0} end
  return {'closed', 'closed', 0}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('PEXPIRE', KEYS[1], ttl) -- after HINCRBY, which may create the hash: PEXPIRE skips a missing key
if state == 'half_open' and not probe then return {state, '', failures} end
if state == 'open' or (state == 'closed' and failures < threshold) then return {state, '', failures} end
redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', now + cooldown)
return {'open', 'open', failures}
"""
"""
KEYS: the target's breaker. ARGV: the verdict, '1' if the request was the probe, the failures
that open it, its cooldown ms, how long it is kept after a verdict, ms (`BREAKER_TTL`).
Returns its state, the new one if it changed ('' if not), and the failures counted.
The same rules as `_targets.LocalBreakers`, on Redis's clock; a breaker without a verdict for
`BREAKER_TTL` is forgotten (closed).
"""


@dataclass(frozen=True, slots=True)
class LoggedEvents:
    """
    A stream's events read from Redis: `(id, data)` in order, whether its end was among them,
    and the id of its last event (so far).
    """

    events: list[tuple[int, bytes]]
    ended: bool
    last_id: int


@dataclass(frozen=True, slots=True)
class SharedLimits:
    """The limits enforced across processes (`[limits]`); 0 turns one off."""

    requests_per_minute: int = 0
    max_streams_per_key: int = 0
    max_concurrent_streams: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0


@dataclass(frozen=True, slots=True)
class SharedLease:
    """
    A stream's place in the shared limits: `id`, in its client's set of leases (`client_key`);
    its token reservations are under the same `id` in `budget_keys` (one per budget that is on).
    """

    id: str
    client_key: str
    budget_keys: tuple[str, ...] = ()


class RedisState:
    """
    The connection to Redis and what is kept there. `run` owns the client and renews the
    leases; it must be running (`nursery.start(state.run)`) while anything else is called.
    """

    def __init__(self, config: RedisConfig, *, stream_retention: float = StreamsConfig().retention) -> None:
        self.config = config
        self.stream_retention = stream_retention
        """Seconds a stream's events are kept after its last one (`[streams] retention`)."""
        self._client = coredis.Redis.from_url(
            config.url,
            password=config.password,
            connect_timeout=config.timeout,
            stream_timeout=config.timeout,
            retry_policy=NoRetryPolicy(),  # our own timeout bounds the call; a retry would exceed it
        )
        self._admit = self._client.register_script(_ADMIT)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._append = self._client.register_script(_APPEND)
        self._breaker_admit = self._client.register_script(_BREAKER_ADMIT)
        self._breaker_settle = self._client.register_script(_BREAKER_SETTLE)
        self._follower = coredis.Redis.from_url(
            config.url,
            password=config.password,
            connect_timeout=config.timeout,
            stream_timeout=config.timeout + config.follow_block,
            retry_policy=NoRetryPolicy(),
        )
        """Its own connections for blocking reads (`follow_events`), which wait `follow_block` longer."""
        self._leases: dict[str, SharedLease] = {}
        """The leases this process holds, which it renews."""
        self.answering = True
        """False from a failed call to the next that succeeds."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """
        Hold the client (coredis's pool lives in it) and renew the leases, until cancelled;
        the scripts are loaded before it reports started.
        """
        async with self._client, self._follower:
            await self._load_scripts()
            task_status.started()
            while True:
                await trio.sleep(self.config.lease_ttl / 3)
                await self._renew_leases()

    async def _load_scripts(self) -> None:
        """
        Load every script into Redis once, ahead of the first calls: a script Redis lacks costs
        its call a NOSCRIPT, a SCRIPT LOAD and a second EVALSHA, and 50 admissions at once on a
        fresh Redis all paid it (from 18 to 46-130 ms each, measured). A Redis that restarts
        empty is still served by coredis's own retry; one that is down now is logged by
        `bounded`, and the scripts load on first use.
        """
        scripts = (self._admit, self._renew, self._release, self._append, self._breaker_admit, self._breaker_settle)
        with suppress(SharedStateError), self.bounded():
            for script in scripts:
                await self._client.script_load(script.script)

    def _key(self, *parts: str) -> str:
        return self.config.key_prefix + ":".join(parts)

    def _client_key(self, what: str, client: str) -> str:
        return self._key(what, hashlib.sha256(client.encode()).hexdigest())

    async def admit(self, client: str, limits: SharedLimits, tokens: int = 0) -> SharedLease:
        """
        A lease for one more stream of `client`, with the request counted and `tokens`
        reserved in each token budget, if every limit allows.

        Raises:
            RateLimitedError: `client` is over its requests per minute, a token budget or its
                concurrent streams.
            OverloadedError: `max_concurrent_streams` streams run, across every process.
            SharedStateError: Redis failed, or did not answer in time.
        """
        budgets = [
            (self._client_key(f"tokens:{period}", client), limit)
            for period, limit in (("minute", limits.tokens_per_minute), ("day", limits.tokens_per_day))
        ]
        lease = SharedLease(
            secrets.token_hex(12),
            self._client_key("streams", client),
            tuple(key + ":amounts" for key, limit in budgets if limit),
        )
        keys = [self._client_key("requests", client), lease.client_key, self._key("streams")]
        keys += [part for key, _ in budgets for part in (key + ":times", key + ":amounts")]
        args: list[int | str] = [
            int(RATE_WINDOW * 1000),
            limits.requests_per_minute,
            limits.max_streams_per_key,
            limits.max_concurrent_streams,
            lease.id,
            self._ttl_ms,
            tokens,
            limits.tokens_per_minute,
            limits.tokens_per_day,
            int(TOKEN_WINDOWS["day"] * 1000),
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
        if verdict in (4, 5):
            period, limit = ("minute", limits.tokens_per_minute) if verdict == 4 else ("day", limits.tokens_per_day)
            wait = math.inf if int(wait_ms) < 0 else int(wait_ms) / 1000
            raise token_budget_refusal(period, limit, tokens, wait)
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

    async def release(self, lease: SharedLease, used: int | None = None) -> None:
        """
        Give the lease's place back and, when the stream's usage is known (`used` tokens),
        correct its token reservations to it; even from a cancelled task (shielded, and
        bounded like every call). If Redis cannot be told, the place expires within
        `lease_ttl`, and the reservations stay whole until they leave their windows.
        """
        self._leases.pop(lease.id, None)
        keys = [lease.client_key, self._key("streams"), *lease.budget_keys]
        with trio.CancelScope(shield=True):
            await self._call(self._release(keys=keys, args=[lease.id, "" if used is None else used]))

    shared = True
    """Other processes see the streams kept here (`_streams.StreamStore`)."""

    @property
    def write_interval(self) -> float:
        """Seconds between two writes of one stream's events, at least (`[redis] stream_write_interval`)."""
        return self.config.stream_write_interval

    async def append_events(self, stream_id: str, events: Sequence[tuple[int, bytes]], *, ended: bool) -> None:
        """
        Add a stream's next `events` (`(id, data)`, ids increasing) to its Redis Stream, and its
        end if `ended`; the stream keeps at most `[redis] stream_max_events` entries (the
        oldest go first) and lives `[streams] retention` seconds after its last write.

        Raises:
            SharedStateError: Redis failed, or did not answer in time.
        """
        args: list[str | int | bytes] = [self.config.stream_max_events, int(self.stream_retention * 1000)]
        args.append("1" if ended else "0")
        for event_id, data in events:
            args += [event_id, data]
        await self._call(self._append(keys=[self._stream_key(stream_id)], args=args))

    async def read_events(self, stream_id: str, after: int) -> LoggedEvents | None:
        """
        The stream's events after id `after`, or `None` if Redis keeps no stream `stream_id`.

        Raises:
            ReplayGapError: some of those events are no longer kept.
            SharedStateError: Redis failed, or did not answer in time.
        """
        key = self._stream_key(stream_id)
        with self.bounded():
            newest = await self._client.xrevrange(key, "+", "-", count=1)
            if not newest:
                return None
            entries = await self._client.xrange(key, f"({_entry_id(after)}", "+")
        if entries:
            logged = _logged(entries, after=after)
        else:  # nothing after `after`: the newest entry says where the stream is
            head = _logged(newest)
            logged = LoggedEvents([], head.ended, head.last_id)
        first = logged.events[0][0] if logged.events else logged.last_id + 1
        if after < logged.last_id and first > after + 1:
            raise ReplayGapError(
                f"events after id {after} are no longer kept (the replay log starts after id {first - 1})"
            )
        return logged

    async def follow_events(self, stream_id: str, after: int) -> LoggedEvents | None:
        """
        The stream's next events after id `after`, waiting up to `[redis] follow_block`
        seconds for one (none then: an empty list); `None` once Redis keeps no such stream.

        Raises:
            SharedStateError: Redis failed, or did not answer within `timeout + follow_block`.
        """
        key = self._stream_key(stream_id)
        block = int(self.config.follow_block * 1000)
        with self.bounded(blocking=True):
            read = await self._follower.xread({key: _entry_id(after)}, count=FOLLOW_BATCH, block=block)
            if not read and not await self._client.exists([key]):
                return None
        return _logged(next(iter(read.values())), after=after) if read else LoggedEvents([], False, after)

    async def delete_events(self, stream_id: str) -> None:
        """Forget a stream's events and its conversation (its stored response was deleted)."""
        await self._call(self._client.delete([self._stream_key(stream_id), self._conversation_key(stream_id)]))

    async def keep_conversation(self, stream_id: str, conversation: bytes) -> None:
        """
        Keep what continuing a stored response needs (`previous_response_id`) beside its
        stream, as long: `[streams] retention` seconds.

        Raises:
            SharedStateError: Redis failed, or did not answer in time.
        """
        key = self._conversation_key(stream_id)
        await self._call(self._client.set(key, conversation, px=int(self.stream_retention * 1000)))

    async def read_conversation(self, stream_id: str) -> bytes | None:
        """
        What `keep_conversation` kept for the stream, or `None`.

        Raises:
            SharedStateError: Redis failed, or did not answer in time.
        """
        kept = await self._call(self._client.get(self._conversation_key(stream_id)))
        return kept.encode() if isinstance(kept, str) else kept

    async def admit_to_breaker(self, key: str) -> tuple[str, int]:
        """`_BREAKER_ADMIT` on the breaker at `key`: `closed`, `probe`, `open` or `probing`, and its failures."""
        said, failures = cast(
            "list[bytes | int]", await self._call(self._breaker_admit(keys=[key], args=[self._ttl_ms]))
        )
        return _text(cast("bytes", said)), int(failures)

    async def settle_breaker(
        self, key: str, verdict: str, *, probe: bool, failures: int, cooldown: float
    ) -> tuple[BreakerState, BreakerState | None, int]:
        """
        `_BREAKER_SETTLE` on the breaker at `key`: its state, the new one if it changed (else
        `None`), and its failures.

        Raises:
            SharedStateError: Redis failed, did not answer in time, or holds the breaker in a
                state no script knows (written by something else).
        """
        kept = int(BREAKER_TTL * 1000)
        args: list[int | str] = [verdict, "1" if probe else "0", failures, int(cooldown * 1000), kept]
        reply = cast("list[bytes | int]", await self._call(self._breaker_settle(keys=[key], args=args)))
        state, change, counted = reply
        changed = _text(cast("bytes", change))
        return _state(_text(cast("bytes", state))), _state(changed) if changed else None, int(counted)

    def _stream_key(self, stream_id: str) -> str:
        return self._key("stream", stream_id)

    def _conversation_key(self, stream_id: str) -> str:
        return self._key("stream", stream_id, "conversation")

    @contextmanager
    def bounded(self, *, blocking: bool = False) -> Iterator[None]:
        """
        Any calls to Redis inside, bounded by `[redis] timeout` (plus `follow_block` for a
        `blocking` read) and mapped to `SharedStateError`. The log says when Redis stops
        answering and when it is back, once each.
        """
        config = self.config
        seconds = config.timeout + config.follow_block if blocking else config.timeout
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            bound = "timeout + follow_block" if blocking else "timeout"
            failure = SharedStateError(
                f"Redis did not answer within [redis] {bound} ({seconds:g} s)", code=UNAVAILABLE, retry_after=1
            )
        except coredis.exceptions.RedisError as exc:
            failure = SharedStateError(f"Redis failed: {exc}", code=UNAVAILABLE, retry_after=1)
        else:
            if not self.answering:
                self.answering = True
                logger.warning("Redis answers again: limits, streams and circuit breakers are shared again")
            return
        if self.answering:
            self.answering = False
            logger.warning("%s; until it answers, [redis] on_error = %r applies", failure.message, self.config.on_error)
        raise failure

    async def _call(self, call: Awaitable[_T]) -> _T:
        with self.bounded():
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


def _entry_id(event_id: int) -> str:
    return f"0-{event_id}"


def _logged(entries: Sequence[StreamEntry], *, after: int = 0) -> LoggedEvents:
    """The events of `entries` (which follow event `after`); an `end` entry's id is one past the last event's."""
    events: list[tuple[int, bytes]] = []
    ended = False
    last_id = after
    for entry in entries:
        entry_id = int(_text(entry.identifier).split("-")[1])
        data = entry.field_values.get(b"d")
        if data is None:
            ended, last_id = True, entry_id - 1
        else:
            events.append((entry_id, data.encode() if isinstance(data, str) else data))
            last_id = entry_id
    return LoggedEvents(events, ended, last_id)


@dataclass(slots=True)
class _Snapshot:
    """A breaker as Redis last told this process: its state and failures, at `at` (trio's clock)."""

    state: BreakerState
    failures: int
    at: float


class SharedBreakers:
    """
    The circuit breakers of one provider's targets (`_targets.Breakers`), shared on Redis: a
    target that failures seen by one process opened is skipped by every process, and one
    request among them all probes it. A probe holds the half-open breaker for `[redis]
    lease_ttl` at most, so a process that dies mid-probe does not keep it. When Redis fails or
    is slow (`[redis] timeout`), this process's own breakers (`LocalBreakers`) decide meanwhile.

    What needs no write is not sent: a breaker that Redis said, less than `[redis]
    breaker_snapshot_age` ago, is closed is taken as closed without asking again, and a
    success on it (closed, no failures) is not written; a request released without a verdict
    is only told if it held the probe. A failure, a probe and a breaker not closed always go to
    Redis. So a target opened by one process is skipped by the others within
    `breaker_snapshot_age`.
    """

    def __init__(self, redis: RedisState, provider: str, config: BreakerConfig) -> None:
        self._redis = redis
        self._provider = provider
        self._config = config
        self._local = LocalBreakers(config)
        self._known: dict[str, _Snapshot] = {}
        """Each target's breaker as Redis last told this process."""

    def _key(self, url: str) -> str:
        return self._redis._key("breaker", self._provider, hashlib.sha256(url.encode()).hexdigest()[:32])

    def _closed_lately(self, url: str, now: float) -> _Snapshot | None:
        """The target's snapshot if it says closed and is younger than `breaker_snapshot_age`, while Redis answers."""
        known = self._known.get(url)
        if known is None or known.state != "closed" or not self._redis.answering:
            return None
        return known if now - known.at < self._redis.config.breaker_snapshot_age else None

    async def admit(self, url: str, now: float) -> BreakerState | None:
        if self._closed_lately(url, now) is not None:
            return "closed"
        try:
            said, failures = await self._redis.admit_to_breaker(self._key(url))
        except SharedStateError:
            return await self._local.admit(url, now)
        self._known[url] = _Snapshot(_ADMITTED_STATES[said], failures, now)
        return "closed" if said == "closed" else "half_open" if said == "probe" else None

    async def settle(self, url: str, verdict: Verdict, *, probe: bool, now: float) -> BreakerState | None:
        if not probe and verdict == "released":
            return None  # nothing to write: a probe it held is the only trace a request leaves before its verdict
        if not probe and verdict == "succeeded":
            known = self._closed_lately(url, now)
            if known is not None and known.failures == 0:
                return None  # what Redis holds already
        try:
            state, change, failures = await self._redis.settle_breaker(
                self._key(url), verdict, probe=probe, failures=self._config.failures, cooldown=self._config.cooldown
            )
        except SharedStateError:
            return await self._local.settle(url, verdict, probe=probe, now=now)
        self._known[url] = _Snapshot(state, failures, now)
        return change

    def state(self, url: str) -> BreakerState:
        known = self._known.get(url)
        return known.state if known is not None else self._local.state(url)


_ADMITTED_STATES: Final[dict[str, BreakerState]] = {
    "closed": "closed",
    "probe": "half_open",
    "probing": "half_open",
    "open": "open",
}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _state(text: str) -> BreakerState:
    """
    A state a script returned: one of `BREAKER_STATES`, or the shared state is broken (a
    `SharedStateError`, so that the caller's fallback applies).
    """
    if text not in BREAKER_STATES:
        raise SharedStateError(f"Redis holds a circuit breaker in an unknown state: {text!r}", code=UNAVAILABLE)
    return text  # narrowed by the `in` above
