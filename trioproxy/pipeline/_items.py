"""
What flows through a session, and where it flows to: the leaf every pipeline module (and the
upstream) imports, so that none of them imports another for its types.

Items: `OPENED` (the upstream accepted), `Delta`s, `RetryNotice`s, `HEARTBEAT`s, and at most
one `TrioproxyError`, always last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from .._events import Delta, Opened
from .._exceptions import TrioproxyError, UpstreamError

__all__ = ["HEARTBEAT", "Heartbeat", "RetryNotice", "SessionItem", "Sink"]


class Heartbeat:
    """Nothing was sent for `heartbeat_interval`: the front adapter sends its keep-alive."""


HEARTBEAT: Final = Heartbeat()


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """
    Something the stream recovered from, and what happens next: a failed attempt before the
    first token, a hedge, a continuation after it, or an upstream event passed over.
    """

    kind: str
    """
    "retry" (same route, after `delay`), "failover" (the next route), "hedge" (the next route
    asked alongside a slow first token), "hedge_won" (that route's token came first: it
    answers), "hedge_failed" (one of the two racing routes, named, failed; the other goes on),
    "continuation" (after the first token, the route named is asked to continue the text
    delivered), "continuation_failed" (it gave no new text: the next way is tried), "breaker"
    (this attempt opened or closed a target's circuit breaker, as `reason` says), or
    "skipped_event" (an event the upstream's translation could not read, passed
    over as its provider allows).
    """
    attempt: int
    provider: str
    model: str
    delay: float
    reason: str
    error: UpstreamError | None = None
    """The failure that caused it."""


SessionItem = Opened | Delta | RetryNotice | Heartbeat | TrioproxyError


class Sink(Protocol):
    """
    Where items go next: an upstream's output, a stage's channel, the session's delivery, or
    the response writing them to the client.
    """

    async def send(self, item: SessionItem, /) -> None: ...
