"""
The arithmetic of a benchmark, kept pure (no I/O, no clock) so it can be unit-tested.

The load generator uses `check_tokens` to turn what a stream delivered into token arrival
times and loss counts; the runner uses `phase_figures` and friends to turn the records of a
phase into the figures of the report.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

#: The benchmark upstream's tokens are " tok0", " tok1", …: their numbers reveal loss and order.
_TOKEN = re.compile(r" tok(\d+)")


def percentile(values: Sequence[float], q: float) -> float | None:
    """
    The `q`-th percentile (0-100) of `values`, interpolating linearly between closest ranks
    (numpy's default), or None when there are no values.

    Interpolation, rather than nearest rank, keeps p99 of a small sample from jumping to the
    maximum or the next value as one sample is added.
    """
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Percentiles of one quantity, in the unit the field name says (None: no samples)."""

    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    count: int


def summarize(values: Sequence[float], scale: float = 1.0) -> Summary:
    """p50/p90/p99/max of `values`, each multiplied by `scale` (e.g. 1000 for seconds to ms)."""

    def scaled(value: float | None) -> float | None:
        return None if value is None else value * scale

    return Summary(
        p50=scaled(percentile(values, 50)),
        p90=scaled(percentile(values, 90)),
        p99=scaled(percentile(values, 99)),
        max=scaled(max(values) if values else None),
        count=len(values),
    )


@dataclass(frozen=True)
class TokenCheck:
    """What a stream delivered, against " tok0" … " tok{n-1}" in order, once each."""

    #: Token numbers in arrival order.
    indices: list[int]
    #: When each of `indices` arrived: the arrival time of the piece that completed it.
    arrivals: list[float]
    #: Expected tokens that never arrived.
    lost: int
    #: Arrivals beyond the first of a token.
    duplicated: int
    #: Tokens that arrived after a higher-numbered one.
    reordered: int
    #: Text that is not a token, or a token number outside 0…n-1: the stream is corrupt.
    unexpected: bool


def check_tokens(pieces: Sequence[tuple[str, float]], expected: int) -> TokenCheck:
    """
    Check the text pieces of one stream (text, arrival time) against `expected` tokens.

    The pieces are joined before matching, so a proxy that merges tokens into chunks or splits
    one across chunks is judged on the text it delivered, not on its chunking; each token
    counts as arrived when the piece holding its last character did.
    """
    texts = [piece for piece, _ in pieces]
    if texts == _whole_tokens(expected):
        # The usual stream, one piece per token, each once and in order: nothing to search.
        return TokenCheck(list(range(expected)), [arrival for _, arrival in pieces], 0, 0, 0, unexpected=False)
    text = "".join(texts)
    ends = list(itertools.accumulate(map(len, texts)))
    indices: list[int] = []
    arrivals: list[float] = []
    matched = 0
    for match in _TOKEN.finditer(text):
        start, end = match.span()
        indices.append(int(match[1]))
        arrivals.append(pieces[bisect.bisect_left(ends, end)][1])
        matched += end - start
    lost, duplicated, reordered = sequence_faults(indices, expected)
    unexpected = matched != len(text) or any(not 0 <= index < expected for index in indices)
    return TokenCheck(indices, arrivals, lost, duplicated, reordered, unexpected)


@functools.lru_cache(maxsize=8)
def _whole_tokens(count: int) -> list[str]:
    """[" tok0", …, " tok{count-1}"]: what a stream delivers when nothing re-chunked it (never mutated)."""
    return [f" tok{index}" for index in range(count)]


def sequence_faults(indices: Sequence[int], expected: int) -> tuple[int, int, int]:
    """
    (lost, duplicated, reordered) for token numbers received in `indices`, against 0…expected-1.

    A duplicate is not also counted as reordered: only first arrivals are checked for order,
    each against the highest number seen before it.
    """
    counts = Counter(indices)
    lost = sum(1 for index in range(expected) if index not in counts)
    duplicated = sum(count - 1 for count in counts.values())
    reordered = 0
    seen: set[int] = set()
    highest = -1
    for index in indices:
        if index in seen:
            continue
        seen.add(index)
        if index < highest:
            reordered += 1
        highest = max(highest, index)
    return lost, duplicated, reordered


def gaps(arrivals: Sequence[float]) -> list[float]:
    """Inter-token latencies: the time between each token's arrival and the previous one's."""
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


# --------------------------------------------------------------------------------------------
# A phase: many streams at one concurrency


@dataclass(frozen=True)
class StreamRecord:
    """
    One measured stream, as the load generator reports it (times in seconds, gaps in µs).

    `lost`, `duplicated` and `reordered` count only in a stream that ended as complete (no
    `error`): a failed stream is already counted as an error, and a silent loss is the worse
    fault, so the two are kept apart.
    """

    error: str | None
    ttft_s: float | None
    duration_s: float | None
    gaps_us: list[int]
    tokens: int
    chunks: int
    lost: int
    duplicated: int
    reordered: int
    #: From the generic endpoint's `done` event: how long text waited inside the proxy.
    buffer_latency_ms: dict[str, float] | None = None


@dataclass(frozen=True)
class PhaseFigures:
    """Everything the client saw in one phase (one target, one concurrency)."""

    streams: int
    errors: int
    lost: int
    duplicated: int
    reordered: int
    tokens: int
    ttft_ms: Summary
    itl_ms: Summary
    duration_ms: Summary
    streams_per_s: float
    tokens_per_s: float
    wall_s: float
    #: A few distinct error messages, to tell why without the raw records.
    error_examples: list[str]


def phase_figures(records: Sequence[StreamRecord], expected_streams: int, wall_s: float) -> PhaseFigures:
    """
    The figures of a phase. Streams that never produced a record (the phase deadline cut them
    off, or their connection could not be opened) count as errors.
    """
    ok = [record for record in records if record.error is None]
    errors = len(records) - len(ok) + max(0, expected_streams - len(records))
    examples = sorted({record.error for record in records if record.error is not None})[:3]
    if len(records) < expected_streams:
        examples.append(f"{expected_streams - len(records)} streams never finished")
    tokens = sum(record.tokens for record in records)
    return PhaseFigures(
        streams=expected_streams,
        errors=errors,
        lost=sum(record.lost for record in ok),
        duplicated=sum(record.duplicated for record in ok),
        reordered=sum(record.reordered for record in ok),
        tokens=tokens,
        ttft_ms=summarize([r.ttft_s for r in records if r.ttft_s is not None], 1000),
        itl_ms=summarize([gap for r in records for gap in r.gaps_us], 1e-3),
        duration_ms=summarize([r.duration_s for r in ok if r.duration_s is not None], 1000),
        streams_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        wall_s=wall_s,
        error_examples=examples,
    )


def difference(proxied: float | None, direct: float | None) -> float | None:
    """`proxied - direct`: what a proxy adds (None when either side has no samples)."""
    if proxied is None or direct is None:
        return None
    return proxied - direct


#: The shortest gap that counts as a stall, whatever the interval: with `--interval-ms 0` the
#: upstream sends every token at once, and 10x its interval would make any gap a stall.
MIN_STALL_MS = 10.0


def sustained_fault(figures: PhaseFigures, interval_ms: float) -> str | None:
    """
    Why a phase does not count as sustained, or None if it does: any lost, duplicated or
    reordered token, an inter-token stall over 10× the upstream's interval (and over
    `MIN_STALL_MS`), or more than 0.1% of streams failing.
    """
    damaged = figures.lost + figures.duplicated + figures.reordered
    if damaged:
        return f"{damaged} lost, duplicated or reordered tokens"
    stall_ms = max(10 * interval_ms, MIN_STALL_MS)
    if figures.itl_ms.max is not None and figures.itl_ms.max > stall_ms:
        bound = f"10x {interval_ms:g} ms" if stall_ms > MIN_STALL_MS else f"{MIN_STALL_MS:g} ms"
        return f"inter-token stall of {figures.itl_ms.max:.0f} ms (over {bound})"
    if figures.errors > 0.001 * figures.streams:
        return f"{figures.errors} of {figures.streams} streams failed"
    return None


# --------------------------------------------------------------------------------------------
# Buffer latency


@dataclass(frozen=True)
class BufferFigures:
    """
    One buffering mode. The proxy reports p50/p99/max per stream; across streams this takes
    the median of the p50s (a typical stream) and the maximum of the p99s and maxima (the
    worst stream), because percentiles of percentiles cannot be merged exactly.
    """

    streams: int
    errors: int
    lost: int
    duplicated: int
    reordered: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    chunks_per_stream: float | None
    #: Chunks a client receives per second of its stream (median over streams).
    chunks_per_s: float | None


def buffer_figures(records: Sequence[StreamRecord], expected_streams: int) -> BufferFigures:
    """Aggregate the per-stream buffer latencies and chunk rates of one buffering mode."""
    ok = [record for record in records if record.error is None]
    reported = [record.buffer_latency_ms for record in ok if record.buffer_latency_ms]
    rates = [record.chunks / record.duration_s for record in ok if record.duration_s]
    return BufferFigures(
        streams=expected_streams,
        errors=expected_streams - len(ok),
        lost=sum(record.lost for record in ok),
        duplicated=sum(record.duplicated for record in ok),
        reordered=sum(record.reordered for record in ok),
        p50_ms=percentile([latency["p50"] for latency in reported], 50),
        p99_ms=max((latency["p99"] for latency in reported), default=None),
        max_ms=max((latency["max"] for latency in reported), default=None),
        chunks_per_stream=percentile([record.chunks for record in ok], 50),
        chunks_per_s=percentile(rates, 50),
    )
