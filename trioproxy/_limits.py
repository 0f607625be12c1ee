"""
Admission: the limits that keep the proxy standing when more is asked of it than it should
give, decided before a request costs an upstream anything.

A new stream is admitted only if its client is under its requests per minute and its
concurrent streams, and the server under its concurrent streams; otherwise it is refused at
once with the number of seconds after which asking again can succeed. An admitted stream
holds a `Lease` on its concurrency slots until its session ends, however it ends.

The rate is a sliding window kept as counts per one-second bucket, not as one timestamp per
request: a client's memory is at most 60 small counters whatever its limit. A request counts
until the end of its bucket plus the window, so no window of 60 seconds ever holds more than
the limit, and `Retry-After` is the moment the oldest bucket leaves (never earlier). Clients
whose last request has left the window are forgotten, and at most `MAX_TRACKED_CLIENTS` are
remembered at all (the least recently admitted goes first), so a flood of addresses cannot
grow memory without bound.

Sans-IO: time is a number passed in (`trio.current_time()` in the server, plain numbers in
the tests).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Final

from ._exceptions import OverloadedError, RateLimitedError, RequestError

__all__ = [
    "CONCURRENCY_RETRY_AFTER",
    "MAX_TRACKED_CLIENTS",
    "RATE_WINDOW",
    "Lease",
    "Limiter",
    "RequestRate",
    "check_request_shape",
]

RATE_WINDOW: Final = 60.0
"""Seconds of the requests-per-minute window."""
RATE_BUCKET: Final = 1.0
"""Granularity of the window: requests in the same second are counted together."""
MAX_TRACKED_CLIENTS: Final = 10_000
"""Clients whose recent requests are remembered for the rate limit, at most."""
CONCURRENCY_RETRY_AFTER: Final = 1.0
"""`Retry-After` of a refusal for concurrency: streams end at no predictable time, so a short guess."""


class _Window:
    """One client's recent requests: `[bucket start, count]`, oldest first."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()

    @property
    def total(self) -> int:
        """Requests in the window: at most 61 buckets to add up, so no running count to keep in step."""
        return int(sum(count for _, count in self.buckets))

    def expire(self, now: float) -> None:
        buckets = self.buckets
        while buckets and buckets[0][0] + RATE_BUCKET + RATE_WINDOW <= now:
            buckets.popleft()


class RequestRate:
    """At most `limit` requests per client in any `RATE_WINDOW` seconds."""

    def __init__(self, limit: int, *, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        if limit < 1 or max_clients < 1:
            raise ValueError("limit and max_clients must be at least 1")
        self.limit = limit
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Window] = OrderedDict()  # least recently admitted first

    def __len__(self) -> int:
        """How many clients are remembered."""
        return len(self._clients)

    def retry_after(self, client: str, now: float) -> float:
        """0 if a request from `client` at `now` is within the limit; else seconds until it would be."""
        window = self._clients.get(client)
        if window is None:
            return 0.0
        window.expire(now)
        if window.total < self.limit:
            return 0.0
        return window.buckets[0][0] + RATE_BUCKET + RATE_WINDOW - now

    def record(self, client: str, now: float) -> None:
        """Count a request of `client` at `now` (after `retry_after` said yes)."""
        self._forget_idle(now)
        window = self._clients.get(client)
        if window is None:
            window = self._clients[client] = _Window()
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        start = math.floor(now / RATE_BUCKET) * RATE_BUCKET
        if window.buckets and window.buckets[-1][0] == start:
            window.buckets[-1][1] += 1
        else:
            window.buckets.append([start, 1])

    def _forget_idle(self, now: float) -> None:
        """Drop the clients none of whose requests is still in the window (oldest first)."""
        while self._clients:
            client, window = next(iter(self._clients.items()))
            window.expire(now)
            if window.buckets:
                return  # admitted later than any client behind it expires: nothing more to drop
            del self._clients[client]


class Lease:
    """A stream's place in the concurrency limits; `release()` gives it back, once."""

    __slots__ = ("_limiter", "_released", "client")

    def __init__(self, limiter: Limiter, client: str) -> None:
        self._limiter = limiter
        self.client = client
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the slots; calling it again does nothing (every way a stream ends may call it)."""
        if not self._released:
            self._released = True
            self._limiter._release(self.client)


class Limiter:
    """
    The admission rules of `[limits]`, for any number of clients; 0 turns a limit off.

    `client` is whatever identifies who asks: the client key when keys are on, else the
    address. The per-client rules are checked first, so a client over its own share hears
    429 (its fault) rather than 503 (the server's).
    """

    def __init__(
        self,
        *,
        requests_per_minute: int = 0,
        max_streams_per_key: int = 0,
        max_concurrent_streams: int = 0,
        max_tracked_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.max_streams_per_key = max_streams_per_key
        self.max_concurrent_streams = max_concurrent_streams
        self.rate = RequestRate(requests_per_minute, max_clients=max_tracked_clients) if requests_per_minute else None
        self._streams: dict[str, int] = {}
        self._total = 0

    @property
    def streams(self) -> int:
        """Leases held, all clients together."""
        return self._total

    def streams_of(self, client: str) -> int:
        return self._streams.get(client, 0)

    def admit(self, client: str, now: float) -> Lease:
        """
        A lease for one more stream of `client` at time `now`.

        Raises:
            RateLimitedError: `client` is over its requests per minute or concurrent streams.
            OverloadedError: the server runs `max_concurrent_streams` streams already.
        """
        if self.rate is not None:
            wait = self.rate.retry_after(client, now)
            if wait > 0:
                raise RateLimitedError(
                    f"rate limit reached: at most {self.requests_per_minute} requests per minute per client; "
                    f"retry in {math.ceil(wait)} s",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
        if self.max_streams_per_key and self._streams.get(client, 0) >= self.max_streams_per_key:
            raise RateLimitedError(
                f"this client already runs {self.max_streams_per_key} streams, its limit; retry when one ends",
                code="too_many_streams",
                retry_after=CONCURRENCY_RETRY_AFTER,
            )
        if self.max_concurrent_streams and self._total >= self.max_concurrent_streams:
            raise OverloadedError(
                f"the server runs {self.max_concurrent_streams} streams, its limit; retry shortly",
                code="server_overloaded",
                retry_after=CONCURRENCY_RETRY_AFTER,
            )
        if self.rate is not None:
            self.rate.record(client, now)
        self._streams[client] = self._streams.get(client, 0) + 1
        self._total += 1
        return Lease(self, client)

    def _release(self, client: str) -> None:
        self._total -= 1
        left = self._streams[client] - 1
        if left:
            self._streams[client] = left
        else:
            del self._streams[client]  # only clients with streams running take memory


def check_request_shape(body: Mapping[str, Any], *, max_messages: int, max_string_chars: int) -> None:
    """
    Refuse a parsed body with more than `max_messages` messages (or Responses input items) or any string (a value or
    an object's key, at any depth) longer than `max_string_chars`; 0 turns a check off. The
    errors are 400s, named as OpenAI names them (`array_above_max_length`,
    `string_above_max_length`), with `param` the path to the culprit.
    """
    for name in ("messages", "input"):  # the conversation of Chat Completions and Messages; of Responses
        messages = body.get(name)
        if max_messages and isinstance(messages, list) and len(messages) > max_messages:
            raise RequestError(
                f"'{name}' has {len(messages)} items; at most {max_messages} are accepted",
                code="array_above_max_length",
                param=name,
            )
    if max_string_chars:
        found = _long_string(body, max_string_chars)
        if found is not None:
            path, length, is_key = found
            where = _param(path) or "the body"
            what = f"an object key in '{where}'" if is_key else f"'{where}'"
            raise RequestError(
                f"{what} is a string of {length} characters; at most {max_string_chars} are accepted",
                code="string_above_max_length",
                param=where,
            )


def _long_string(body: Mapping[str, Any], limit: int) -> tuple[tuple[str | int, ...], int, bool] | None:
    """The path to a string longer than `limit`, its length, and whether it is a key. Iterative: any depth."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and len(key) > limit:
                return path, len(key), True
            if isinstance(item, str):
                if len(item) > limit:
                    return (*path, key), len(item), False
            elif isinstance(item, (dict, list)):
                stack.append((item, (*path, key)))
    return None


def _param(path: tuple[str | int, ...]) -> str:
    """`("messages", 0, "content")` as `messages[0].content`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out
