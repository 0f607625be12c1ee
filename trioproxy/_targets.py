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

Sans-IO: times are the caller's clock, handed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from ._policy import BreakerConfig

__all__ = ["BREAKER_STATES", "BreakerState", "Target", "choose"]

BreakerState = Literal["closed", "open", "half_open"]
BREAKER_STATES: Final[tuple[BreakerState, ...]] = ("closed", "open", "half_open")


@dataclass(eq=False, slots=True)
class Target:
    """One replica of a provider: where it is, its share, and how it has been doing."""

    url: str
    weight: float = 1.0
    outstanding: int = 0
    failures: int = 0
    """Consecutive failures counted against it."""
    state: BreakerState = "closed"
    open_until: float = 0.0
    probing: bool = False
    """Half-open, and its one probe is in flight."""

    def available(self, now: float) -> bool:
        """Whether a request may go to it now; a breaker whose cooldown passed turns half-open."""
        if self.state == "open" and now >= self.open_until:
            self.state = "half_open"
        if self.state == "half_open":
            return not self.probing
        return self.state == "closed"

    def taken(self) -> None:
        """A request goes to it."""
        self.outstanding += 1
        if self.state == "half_open":
            self.probing = True

    def succeeded(self) -> BreakerState | None:
        """Its request ended well: the breaker closes. The new state, if it changed."""
        self.outstanding -= 1
        self.failures = 0
        self.probing = False
        if self.state == "closed":
            return None
        self.state = "closed"
        return "closed"

    def failed(self, now: float, breaker: BreakerConfig) -> BreakerState | None:
        """Its request failed in a way that counts against it. The new state, if it changed."""
        self.outstanding -= 1
        self.failures += 1
        probe, self.probing = self.probing, False
        if self.state == "half_open" and not probe:
            return None  # an older request, sent before it opened: the probe decides
        if self.state == "open" or (self.state == "closed" and self.failures < breaker.failures):
            return None
        self.state, self.open_until = "open", now + breaker.cooldown
        return "open"

    def released(self) -> None:
        """Its request ended with no verdict on the target (cancelled, or refused as a bad request)."""
        self.outstanding -= 1
        self.probing = False


def choose(targets: list[Target], now: float) -> Target | None:
    """The available target with the fewest outstanding requests per weight (the first of equals); None if none is."""
    best: Target | None = None
    best_load = 0.0
    for target in targets:
        if not target.available(now):
            continue
        load = target.outstanding / target.weight
        if best is None or load < best_load:
            best, best_load = target, load
    return best
