"""
A provider's targets (its replicas), each behind a circuit breaker, and which one takes the
next request.

The choice is the least outstanding requests per unit of weight, among the targets whose
breaker lets a request through. A breaker opens after `failures` consecutive failures of the
kinds that say the target itself is unwell (no connection, a broken connection, a 5xx); it
stays open for `cooldown` seconds, during which the target is skipped without a connection
being tried; then it is half-open: one request probes it, and its outcome closes the breaker
or opens it again. So an outage costs one connect timeout per `failures` requests, not one
per request.

The breakers' state lives behind `Breakers`: `LocalBreakers` keeps it in this process;
`_redis.SharedBreakers`, with `[redis]`, keeps it for every process, so that what one process
learns of a target the others need not pay for again. Requests in flight (`outstanding`)
stay per process: they are this process's load on the target.

Sans-IO: times are the caller's clock, handed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

from ._policy import BreakerConfig

__all__ = ["BREAKER_STATES", "BreakerState", "Breakers", "LocalBreakers", "Target", "Verdict", "choose"]

BreakerState = Literal["closed", "open", "half_open"]
BREAKER_STATES: Final[tuple[BreakerState, ...]] = ("closed", "open", "half_open")

Verdict = Literal["succeeded", "failed", "released"]
"""
What a request said of its target: it `succeeded`, it `failed` in a way that counts against
the target, or it was `released` with no verdict (cancelled, or refused as a bad request).
"""


class Breakers(Protocol):
    """
    Where a provider's circuit breakers keep their state, one per target (by its URL).

    A shared store's calls go over the network: each must be bounded in time, and `settle` is
    awaited shielded from cancellation (a cancelled request must still free a probe it held).
    `state` is read synchronously by `/health` and `/metrics`: the last state this process
    knows.
    """

    async def admit(self, url: str, now: float) -> BreakerState | None:
        """
        Whether a request may go to the target now: `closed`, or `half_open` when this call
        took its one probe; None while it is skipped (open, or its probe is out).
        """

    async def settle(self, url: str, verdict: Verdict, *, probe: bool, now: float) -> BreakerState | None:
        """A request `admit`ted earlier (as the probe, or not) ended: the breaker's new state, if it changed."""

    def state(self, url: str) -> BreakerState: ...


@dataclass(slots=True)
class _Breaker:
    failures: int = 0
    """Consecutive failures counted against the target."""
    state: BreakerState = "closed"
    open_until: float = 0.0
    probing: bool = False
    """Half-open, and its one probe is in flight."""


class LocalBreakers:
    """The breakers of one provider's targets, in this process's memory."""

    def __init__(self, config: BreakerConfig) -> None:
        self._config = config
        self._breakers: dict[str, _Breaker] = {}

    def _of(self, url: str) -> _Breaker:
        breaker = self._breakers.get(url)
        if breaker is None:
            breaker = self._breakers[url] = _Breaker()
        return breaker

    async def admit(self, url: str, now: float) -> BreakerState | None:
        breaker = self._of(url)
        if breaker.state == "open" and now >= breaker.open_until:
            breaker.state = "half_open"
        if breaker.state == "closed":
            return "closed"
        if breaker.state == "half_open" and not breaker.probing:
            breaker.probing = True
            return "half_open"
        return None

    async def settle(self, url: str, verdict: Verdict, *, probe: bool, now: float) -> BreakerState | None:
        breaker = self._of(url)
        if probe:
            breaker.probing = False
        if verdict == "released":
            return None
        if verdict == "succeeded":
            breaker.failures = 0
            if breaker.state == "closed":
                return None
            breaker.state = "closed"
            return "closed"
        breaker.failures += 1
        if breaker.state == "half_open" and not probe:
            return None  # an older request, sent before it opened: the probe decides
        if breaker.state == "open" or (breaker.state == "closed" and breaker.failures < self._config.failures):
            return None
        breaker.state, breaker.open_until = "open", now + self._config.cooldown
        return "open"

    def state(self, url: str) -> BreakerState:
        return self._of(url).state


class Target:
    """One replica of a provider: where it is, its share, this process's requests to it, and its breaker."""

    __slots__ = ("breakers", "outstanding", "url", "weight")

    def __init__(self, url: str, breakers: Breakers, weight: float = 1.0) -> None:
        self.url = url
        self.weight = weight
        self.breakers = breakers
        self.outstanding = 0

    @property
    def state(self) -> BreakerState:
        return self.breakers.state(self.url)


async def choose(targets: list[Target], now: float) -> tuple[Target, bool] | None:
    """
    The target with the fewest outstanding requests per weight (the first of equals) whose
    breaker admits a request, and whether that request is its probe; None if none admits one.
    The request is counted as outstanding on it.
    """
    for target in sorted(targets, key=lambda t: t.outstanding / t.weight):
        admitted = await target.breakers.admit(target.url, now)
        if admitted is not None:
            target.outstanding += 1
            return target, admitted == "half_open"
    return None
