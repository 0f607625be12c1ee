"""
Admission: the limits that keep the proxy standing when more is asked of it than it should
give, decided before a request costs an upstream anything.

A new stream is admitted only if its client is under its requests per minute, its token
budgets and its concurrent streams, and the server under its concurrent streams; otherwise it
is refused at once with the number of seconds after which asking again can succeed. An
admitted stream holds a `Lease` on its concurrency slots until its session ends, however it
ends.

A token budget (per minute, per day) is the same sliding window counting tokens: admission
reserves what the request may cost (its prompt and its maximum output, estimated), and the
stream's end reconciles that with what the upstream says it used. A stream that ends without
the upstream's count keeps its reservation: the budget errs on the side of its limit.

The rate is a sliding window kept as counts per one-second bucket, not as one timestamp per
request: a client's memory is at most 60 small counters whatever its limit. A request counts
until the end of its bucket plus the window, so no window of 60 seconds ever holds more than
the limit, and `Retry-After` is the moment the oldest bucket leaves (never earlier). Clients
whose last request has left the window are forgotten, and at most `MAX_TRACKED_CLIENTS` are
remembered at all (the least recently admitted goes first), so a flood of addresses cannot
grow memory without bound. The tokens-per-day window counts per quarter hour (`DAY_BUCKET`):
97 counters per client.

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
    "DAY_BUCKET",
    "MAX_TRACKED_CLIENTS",
    "RATE_WINDOW",
    "TOKEN_WINDOWS",
    "Lease",
    "Limiter",
    "SlidingWindow",
    "check_request_shape",
    "token_budget_refusal",
]

RATE_WINDOW: Final = 60.0
"""Seconds of the requests-per-minute window."""
RATE_BUCKET: Final = 1.0
"""Granularity of the window: requests in the same second are counted together."""
MAX_TRACKED_CLIENTS: Final = 10_000
"""Clients whose recent requests are remembered for the rate limit, at most."""
DAY_BUCKET: Final = 900.0
"""Granularity of the tokens-per-day window: a day of quarter hours, 97 counters per client at most."""
TOKEN_WINDOWS: Final = {"minute": RATE_WINDOW, "day": 86_400.0}
"""Seconds of each token budget's window, by its period."""
CONCURRENCY_RETRY_AFTER: Final = 1.0
"""`Retry-After` of a refusal for concurrency: streams end at no predictable time, so a short guess."""


class _Window:
    """One client's recent counts: `[bucket start, count]`, oldest first."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()

    @property
    def total(self) -> int:
        """The count in the window: a bounded number of buckets to add up, so no running total to keep in step."""
        return int(sum(count for _, count in self.buckets))

    def expire(self, now: float, span: float) -> None:
        buckets = self.buckets
        while buckets and buckets[0][0] + span <= now:
            buckets.popleft()


class SlidingWindow:
    """
    At most `limit` units (requests, tokens) per client in any `window` seconds, counted per
    `bucket` seconds: a unit counts until the end of its bucket plus the window.
    """

    def __init__(
        self,
        limit: int,
        *,
        window: float = RATE_WINDOW,
        bucket: float = RATE_BUCKET,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        if limit < 1 or max_clients < 1:
            raise ValueError("limit and max_clients must be at least 1")
        self.limit = limit
        self.bucket = bucket
        self.max_clients = max_clients
        self._span = bucket + window
        self._clients: OrderedDict[str, _Window] = OrderedDict()  # least recently admitted first

    def __len__(self) -> int:
        """How many clients are remembered."""
        return len(self._clients)

    def retry_after(self, client: str, now: float, amount: int = 1) -> float:
        """
        0 if `amount` more from `client` at `now` is within the limit; else seconds until it
        would be (`math.inf` for more than the whole limit: waiting cannot help).
        """
        if amount > self.limit:
            return math.inf
        window = self._clients.get(client)
        if window is None:
            return 0.0
        window.expire(now, self._span)
        total: float = window.total
        if total + amount <= self.limit:
            return 0.0
        for start, count in window.buckets:  # until enough left the window
            total -= count
            if total + amount <= self.limit:
                return start + self._span - now
        raise AssertionError("unreachable: amount is within the limit")

    def record(self, client: str, now: float, amount: int = 1) -> float:
        """Count `amount` for `client` at `now` (once `retry_after` said yes): the start of its bucket, for `adjust`."""
        self._forget_idle(now)
        window = self._clients.get(client)
        if window is None:
            window = self._clients[client] = _Window()
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        start = math.floor(now / self.bucket) * self.bucket
        if window.buckets and window.buckets[-1][0] == start:
            window.buckets[-1][1] += amount
        else:
            window.buckets.append([start, amount])
        return start

    def adjust(self, client: str, bucket: float, change: int) -> None:
        """
        Add `change` (less than 0: give back) to what `client` counted in the bucket starting at
        `bucket`, if that is still in the window; a bucket never counts less than nothing.
        """
        window = self._clients.get(client)
        if window is None:
            return
        for counted in reversed(window.buckets):  # a recent bucket, most likely the last
            if counted[0] == bucket:
                counted[1] = max(0, counted[1] + change)
                return
            if counted[0] < bucket:
                return

    def _forget_idle(self, now: float) -> None:
        """Drop the clients none of whose counts is still in the window (oldest first)."""
        while self._clients:
            client, window = next(iter(self._clients.items()))
            window.expire(now, self._span)
            if window.buckets:
                return  # admitted later than any client behind it expires: nothing more to drop
            del self._clients[client]


class Lease:
    """
    A stream's place in the concurrency limits, and the tokens it reserved in the budgets;
    `reconcile(used)` corrects the reservation to what the stream used, `release()` gives the
    place back. Each does its work once.
    """

    __slots__ = ("_budgets", "_limiter", "_reconciled", "_released", "client", "tokens")

    def __init__(
        self, limiter: Limiter, client: str, tokens: int = 0, budgets: tuple[tuple[SlidingWindow, float], ...] = ()
    ) -> None:
        self._limiter = limiter
        self.client = client
        self.tokens = tokens
        """The tokens reserved in each budget."""
        self._budgets = budgets
        """Each budget reserved in, with the bucket that holds the reservation."""
        self._released = False
        self._reconciled = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the slots; calling it again does nothing (every way a stream ends may call it)."""
        if not self._released:
            self._released = True
            self._limiter._release(self.client)

    def reconcile(self, used: int) -> None:
        """The stream used `used` tokens, in place of those reserved (if its reservation is still in a window)."""
        if not self._reconciled:
            self._reconciled = True
            for budget, bucket in self._budgets:
                budget.adjust(self.client, bucket, used - self.tokens)


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
        tokens_per_minute: int = 0,
        tokens_per_day: int = 0,
        max_tracked_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.max_streams_per_key = max_streams_per_key
        self.max_concurrent_streams = max_concurrent_streams
        self.rate = SlidingWindow(requests_per_minute, max_clients=max_tracked_clients) if requests_per_minute else None
        budgets = [
            (period, SlidingWindow(limit, window=TOKEN_WINDOWS[period], bucket=bucket, max_clients=max_tracked_clients))
            for period, limit, bucket in (
                ("minute", tokens_per_minute, RATE_BUCKET),
                ("day", tokens_per_day, DAY_BUCKET),
            )
            if limit
        ]
        self.budgets: dict[str, SlidingWindow] = dict(budgets)
        """The token budgets that are on, by period (`minute`, `day`)."""
        self._streams: dict[str, int] = {}
        self._total = 0

    @property
    def streams(self) -> int:
        """Leases held, all clients together."""
        return self._total

    def streams_of(self, client: str) -> int:
        return self._streams.get(client, 0)

    def admit(self, client: str, now: float, tokens: int = 0) -> Lease:
        """
        A lease for one more stream of `client` at time `now`, reserving `tokens` in each
        token budget.

        Raises:
            RateLimitedError: `client` is over its requests per minute, a token budget or its
                concurrent streams.
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
        for period, budget in self.budgets.items():
            wait = budget.retry_after(client, now, tokens)
            if wait > 0:
                raise token_budget_refusal(period, budget.limit, tokens, wait)
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
        reserved = tuple((budget, budget.record(client, now, tokens)) for budget in self.budgets.values())
        self._streams[client] = self._streams.get(client, 0) + 1
        self._total += 1
        return Lease(self, client, tokens, reserved)

    def _release(self, client: str) -> None:
        self._total -= 1
        left = self._streams[client] - 1
        if left:
            self._streams[client] = left
        else:
            del self._streams[client]  # only clients with streams running take memory


def token_budget_refusal(period: str, limit: int, tokens: int, wait: float) -> RateLimitedError:
    """
    The 429 of a request whose `tokens` do not fit in its client's budget of `limit` tokens a
    `period` for `wait` seconds (`math.inf`: more than the whole budget, never; no `Retry-After`).
    """
    code = f"tokens_per_{period}_exceeded"
    if math.isinf(wait):
        return RateLimitedError(
            f"this request reserves {tokens} tokens (its prompt and its maximum output), more than the "
            f"{limit} tokens per {period} a client may use: ask for fewer output tokens",
            code=code,
            retry_after=None,
        )
    return RateLimitedError(
        f"token budget reached: at most {limit} tokens per {period} per client, and this request reserves "
        f"{tokens}; retry in {math.ceil(wait)} s",
        code=code,
        retry_after=wait,
    )


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
