"""
What a stream did, tallied as it runs, for its request's log line and the metrics.

A plain record: the session writes it (it is the one place every delivered token passes) and
the server reads it once the stream has ended. No I/O, no clock of its own; times are the
trio clock's seconds, handed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._exceptions import StreamInterrupted, TrioproxyError, UpstreamError, UpstreamTimeoutError, ValidationError

__all__ = ["StreamStats"]


@dataclass(slots=True)
class StreamStats:
    started: float
    provider: str
    """The provider answering: the first route's, then whichever a failover moved to."""
    model: str
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive content deltas handed to the client (inter-token latency)."""
    buffer_waits: list[float] = field(default_factory=list)
    """Seconds each text delta spent inside the proxy, from upstream to the client (buffer latency)."""
    retries: list[str] = field(default_factory=list)
    """The provider of each retry, in order."""
    providers_left: list[str] = field(default_factory=list)
    """The provider of each failover, in order (the one the stream moved away from)."""
    failures: list[tuple[str, UpstreamError]] = field(default_factory=list)
    """Every failed upstream attempt, retried or not, with its provider, in order."""
    recoveries: list[tuple[str, str]] = field(default_factory=list)
    """
    `(kind, provider)` of each recovery other than a retry or failover (`hedge`,
    `skipped_event`), in order, with the provider answering then.
    """
    breaker_transitions: list[str] = field(default_factory=list)
    """What became of a target's circuit breaker after this stream's attempts there, in order."""
    error: TrioproxyError | None = None
    """The error the stream ended with, if it failed."""
    cancelled: bool = False
    """Ended by `cancel()` before it finished (its client left): the upstream request was cut."""

    def failed(self, error: UpstreamError) -> None:
        self.failures.append((self.provider, error))

    def counted(self, error: UpstreamError) -> bool:
        """Whether this very failure is counted already (it was announced before it ended the stream)."""
        return any(counted is error for _, counted in self.failures)

    def failed_over(self, provider: str, model: str) -> None:
        self.providers_left.append(self.provider)
        self.provider, self.model = provider, model

    def token(self, now: float, arrived: float | None = None) -> None:
        """A content delta reached the client at `now`; `arrived`: when its text came from the upstream."""
        if self.first_token is None:
            self.first_token = now
        if self.last_token is not None:
            self.token_gaps.append(now - self.last_token)
        self.last_token = now
        if arrived is not None:
            self.buffer_waits.append(now - arrived)

    @property
    def attempts(self) -> int:
        """Upstream requests made for the stream: the first, then one per retry, failover, hedge and continuation."""
        asked = sum(1 for kind, _ in self.recoveries if kind in ("hedge", "continuation"))
        return 1 + len(self.retries) + len(self.providers_left) + asked

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def outcome(self) -> str:
        """completed, cancelled, interrupted, timeout, upstream_error, validation_error or error."""
        if self.error is not None:
            if isinstance(self.error, StreamInterrupted):
                return "interrupted"  # by the server: it is shutting down
            if isinstance(self.error, UpstreamTimeoutError):
                return "timeout"
            if isinstance(self.error, UpstreamError):
                return "upstream_error"
            if isinstance(self.error, ValidationError):
                return "validation_error"
            return "error"
        return "cancelled" if self.cancelled else "completed"
