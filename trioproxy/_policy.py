"""
How a route streams: buffering, timeouts, retries and circuit breakers, as plain checked values.

Each is set globally in the config (`[buffer]`, `[timeouts]`, `[retry]`), overridden per
provider, and — for buffering — per request on the generic endpoints. One checker,
`parse_policy`, turns a TOML/JSON table into a value and reports every bad key in one
sentence each, so the config file and a request body are checked by the same rules.

Sans-IO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final, TypeVar

from ._exceptions import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

__all__ = [
    "CONTINUABLE",
    "DEFAULT_RETRY_ON",
    "FAILURE_KINDS",
    "BreakerConfig",
    "BufferConfig",
    "RetryConfig",
    "StreamsConfig",
    "Timeouts",
    "failure_kind",
    "parse_policy",
]


@dataclass(frozen=True, slots=True)
class BufferConfig:
    """
    How tokens are merged into chunks. Off by default: tokens pass straight through.

    - `min_chunk_size`: hold text until at least this many characters are ready;
    - `max_chunk_size`: never send a chunk longer than this (0: no limit); splits fall
      between characters, and between words in word mode;
    - `flush_interval_ms`: a character waits in the buffer at most this long (0: no timer);
    - `buffer_by_word`: send only whole words;
    - `buffer_by_sentence`: send only whole sentences.
    """

    min_chunk_size: int = 0
    max_chunk_size: int = 0
    flush_interval_ms: float = 0.0
    buffer_by_word: bool = False
    buffer_by_sentence: bool = False

    @property
    def enabled(self) -> bool:
        return self != BufferConfig()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """
    The named deadlines of a stream, in seconds; 0 turns one off (all but `connect_timeout`).

    - `connect_timeout`: opening a connection to the upstream (never off: it must be positive);
    - `first_token_timeout`: from sending the request to the first token;
    - `silence_timeout`: the longest gap between two tokens;
    - `total_timeout`: the whole stream, retries included;
    - `heartbeat_interval`: how long the client may go without a byte before it gets a
      keep-alive;
    - `hedge_after`: how long a route may go without a first token before the next fallback
      is asked alongside it (a hedge: the first token wins, the other request is cancelled).
    """

    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0
    silence_timeout: float = 60.0
    total_timeout: float = 1200.0
    heartbeat_interval: float = 15.0
    hedge_after: float = 0.0


FAILURE_KINDS: Final = (
    "connect",
    "first_token_timeout",
    "connection_broken",
    "rate_limit",
    "server_error",
    "timeout",
    "protocol",
)
"""
The kinds of failure before the first token that `RetryConfig.retry_on` may name:

- `connect`: no connection (refused, unreachable, `connect_timeout`, no pool slot in time);
- `first_token_timeout`: connected, and no first token within `first_token_timeout`;
- `connection_broken`: the connection broke once it was made (a reset, a stale pooled one);
- `rate_limit`: a 429; `server_error`: a 5xx, or a 5xx-class error in the stream (`overloaded_error`);
- `timeout`: another timeout of the upstream request (a write that did not complete);
- `protocol`: the upstream's bytes are not its protocol.

A refusal (another 4xx) is no kind: it is never retried on the route that refused it.
"""

CONTINUABLE: Final = frozenset({"connection_broken", "rate_limit", "server_error", "timeout", "protocol"})
"""
Failures after the first token that a continuation may recover from: the upstream broke off
(a reset, silence, a body cut short, a malformed event, an in-stream `overloaded_error`), as
opposed to refusing the request.
"""

DEFAULT_RETRY_ON: Final = ("connection_broken", "rate_limit", "server_error", "timeout")
"""
Worth asking the same route again. A route that gives no connection or no first token in
time is not: it is left for the next fallback at once, rather than costing its timeout again.
"""


def failure_kind(error: UpstreamError) -> str | None:
    """The kind (one of `FAILURE_KINDS`) of an upstream failure; `None` for a refusal."""
    if isinstance(error, UpstreamTimeoutError):
        if error.kind in ("connect_timeout", "pool_timeout"):
            return "connect"
        return "first_token_timeout" if error.kind == "first_token_timeout" else "timeout"
    if isinstance(error, UpstreamBrokenError):
        return "connection_broken"
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamProtocolError):
        return "protocol"
    if error.status == 429:
        return "rate_limit"
    if 400 <= error.status < 500:
        return None
    return "server_error"


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """
    Retries before the first token: exponential backoff with jitter, `Retry-After` honoured.

    The n-th retry (from 0) waits `min(max_delay_ms, base_delay_ms * exponential_base ** n)`,
    less up to `jitter` of it at random, and never less than the upstream's `Retry-After`.
    Only failures of a kind in `retry_on` are retried on their route; any other goes to the
    next fallback at once (see `FAILURE_KINDS`). `max_hedges` bounds the hedges of one request
    (`Timeouts.hedge_after`), `max_continuations` its continuations after the first token; a
    route that refused a continuation is not asked for one again for `continuation_cooldown`
    seconds.
    """

    max_retries: int = 2
    base_delay_ms: float = 250.0
    max_delay_ms: float = 8000.0
    exponential_base: float = 2.0
    jitter: float = 0.2
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    max_hedges: int = 1
    max_continuations: int = 2
    continuation_cooldown: float = 300.0

    def retries(self, error: UpstreamError) -> bool:
        """Whether `error` is of a kind worth asking its route again for."""
        return failure_kind(error) in self.retry_on

    def delay(self, retry_number: int, *, retry_after: float | None = None, random: float = 0.0) -> float:
        """Seconds to wait before retry `retry_number`; `random` is uniform in [0, 1)."""
        try:
            growth = self.exponential_base**retry_number
        except OverflowError:  # a float power past ~1e308: the cap applies all the same
            growth = math.inf
        backoff = min(self.max_delay_ms, self.base_delay_ms * growth if self.base_delay_ms else 0.0) / 1000
        backoff *= 1 - self.jitter * random
        return max(backoff, retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """
    The circuit breaker of each of a provider's targets (`trioproxy._targets`): `failures`
    consecutive failures (no connection, a broken connection, a 5xx) open it for `cooldown`
    seconds, then one request probes the target.
    """

    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class StreamsConfig:
    """
    Resumable, shareable streams on the generic SSE endpoints (the `[streams]` table).

    - `resume_grace_period`: seconds a generation keeps running after its last watcher left,
      so that a reconnect finds it still going (0: cancel the upstream at once);
    - `retention`: seconds a finished stream can still be replayed;
    - `max_replay_bytes`: the replay log of one stream keeps at most this many bytes of
      events (the oldest go first; a resume from before them is refused);
    - `max_streams`: streams held at once, running or retained; a new one drops the oldest
      finished stream, and is refused (503) when every one is still running;
    - `watcher_queue`: writes one watcher may fall behind before it is disconnected (it can
      resume); a slow watcher never slows the others.
    """

    resume_grace_period: float = 30.0
    retention: float = 300.0
    max_replay_bytes: int = 1024 * 1024
    max_streams: int = 1000
    watcher_queue: int = 64


_Policy = TypeVar("_Policy", BufferConfig, Timeouts, RetryConfig, BreakerConfig, StreamsConfig)

_NUMBER: Final = (int, float)
_KINDS: Final[dict[type, dict[str, tuple[type, ...]]]] = {
    BufferConfig: {
        "min_chunk_size": (int,),
        "max_chunk_size": (int,),
        "flush_interval_ms": _NUMBER,
        "buffer_by_word": (bool,),
        "buffer_by_sentence": (bool,),
    },
    Timeouts: {f.name: _NUMBER for f in fields(Timeouts)},
    RetryConfig: {
        "max_retries": (int,),
        "base_delay_ms": _NUMBER,
        "max_delay_ms": _NUMBER,
        "exponential_base": _NUMBER,
        "jitter": _NUMBER,
        "retry_on": (list,),
        "max_hedges": (int,),
        "max_continuations": (int,),
        "continuation_cooldown": _NUMBER,
    },
    BreakerConfig: {"failures": (int,), "cooldown": _NUMBER},
    StreamsConfig: {
        "resume_grace_period": _NUMBER,
        "retention": _NUMBER,
        "max_replay_bytes": (int,),
        "max_streams": (int,),
        "watcher_queue": (int,),
    },
}


def parse_policy(base: _Policy, table: Any, *, where: str, problems: list[str]) -> _Policy:
    """
    `base` with the keys of `table` applied. Each bad key or value adds one sentence to
    `problems` and is left at its `base` value.
    """
    if not isinstance(table, Mapping):
        problems.append(f"{where} must be a table/object, got {table!r}")
        return base
    kinds = _KINDS[type(base)]
    changes: dict[str, Any] = {}
    for key, value in table.items():
        expected = kinds.get(key)
        if expected is None:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(kinds)})")
        elif (problem := _value_problem(value, expected)) is not None:
            problems.append(f"{where}.{key} {problem}, got {value!r}")
        else:
            changes[key] = tuple(value) if expected == (list,) else value
    _check_ranges(base, changes, where, problems)
    return replace(base, **changes)


def _value_problem(value: object, expected: tuple[type, ...]) -> str | None:
    """What is wrong with `value` for a key of the `expected` kinds, if anything."""
    if expected == (list,):
        if not isinstance(value, list) or not all(v in FAILURE_KINDS for v in value):
            return f"must be a list of failure kinds among {', '.join(FAILURE_KINDS)}"
        return None
    if isinstance(value, bool) != (expected == (bool,)) or not isinstance(value, expected):
        return "must be " + ("a boolean" if expected == (bool,) else "an integer" if expected == (int,) else "a number")
    if isinstance(value, float) and math.isnan(value):  # TOML has `nan`: it passes every check below
        return "must be a number"
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        return "must not be negative"
    return None


def _check_ranges(base: _Policy, changes: dict[str, Any], where: str, problems: list[str]) -> None:
    """The bounds of some values beyond their kind; a value out of them is dropped from `changes`."""
    if isinstance(base, RetryConfig):
        if changes.get("jitter", 0) > 1:
            problems.append(f"{where}.jitter must be between 0 and 1, got {changes.pop('jitter')!r}")
        if changes.get("exponential_base", 1) < 1:
            problems.append(f"{where}.exponential_base must be at least 1, got {changes.pop('exponential_base')!r}")
    if isinstance(base, BreakerConfig) and changes.get("failures", 1) < 1:
        problems.append(f"{where}.failures must be at least 1, got {changes.pop('failures')!r}")
    if isinstance(base, StreamsConfig):
        for key in ("max_replay_bytes", "max_streams", "watcher_queue"):
            if changes.get(key, 1) < 1:
                problems.append(f"{where}.{key} must be at least 1, got {changes.pop(key)!r}")
    if isinstance(base, BufferConfig):
        low = changes.get("min_chunk_size", base.min_chunk_size)
        high = changes.get("max_chunk_size", base.max_chunk_size)
        if high and low > high:
            problems.append(f"{where}: min_chunk_size ({low}) is larger than max_chunk_size ({high})")
            changes.pop("min_chunk_size", None)
