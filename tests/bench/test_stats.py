"""The benchmark's arithmetic: percentiles, the token-sequence check, a phase's figures."""

from __future__ import annotations

import pytest

from trioproxy._bench.stats import (
    StreamRecord,
    Summary,
    buffer_figures,
    check_tokens,
    gaps,
    percentile,
    phase_figures,
    sequence_faults,
    summarize,
    sustained_fault,
)


def tokens(*numbers: int) -> str:
    return "".join(f" tok{n}" for n in numbers)


def record(**fields: object) -> StreamRecord:
    defaults: dict[str, object] = {
        "error": None, "ttft_s": 0.05, "duration_s": 1.0, "gaps_us": [20_000], "tokens": 2, "chunks": 2,
        "lost": 0, "duplicated": 0, "reordered": 0,
    }  # fmt: skip
    return StreamRecord(**{**defaults, **fields})  # type: ignore[arg-type]


# -- percentiles


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # order does not matter
        (list(map(float, range(101))), 99, 99.0),
        ([0.0, 10.0], 90, 9.0),  # linear between the closest ranks
    ],
)
def test_percentile_interpolates_between_closest_ranks(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be between 0 and 100"):
        percentile([1.0], 101)


def test_summarize_scales_every_figure() -> None:
    summary = summarize([0.001, 0.002, 0.003], 1000)
    assert summary.p50 == pytest.approx(2.0)
    assert summary.p90 == pytest.approx(2.8)
    assert summary.p99 == pytest.approx(2.98)
    assert summary.max == pytest.approx(3.0)
    assert summary.count == 3
    assert summarize([]) == Summary(p50=None, p90=None, p99=None, max=None, count=0)


# -- the token sequence


def test_a_perfect_stream_has_no_faults_and_one_arrival_per_token() -> None:
    check = check_tokens([(" tok0", 1.0), (" tok1", 2.0), (" tok2", 3.5)], 3)
    assert check.indices == [0, 1, 2]
    assert check.arrivals == [1.0, 2.0, 3.5]
    assert (check.lost, check.duplicated, check.reordered, check.unexpected) == (0, 0, 0, False)
    assert gaps(check.arrivals) == [1.0, 1.5]


def test_merged_and_split_chunks_are_judged_on_the_text() -> None:
    # A buffer merges tokens, or one token is split across chunks: same text, no fault, and a
    # token arrives with the chunk that completes it.
    check = check_tokens([(" tok0 tok1 to", 1.0), ("k2", 2.0)], 3)
    assert check.indices == [0, 1, 2]
    assert check.arrivals == [1.0, 1.0, 2.0]
    assert (check.lost, check.duplicated, check.reordered, check.unexpected) == (0, 0, 0, False)


def test_lost_duplicated_and_reordered_tokens_are_counted() -> None:
    assert sequence_faults([0, 1, 3], 4) == (1, 0, 0)
    assert sequence_faults([0, 1, 1, 2], 3) == (0, 1, 0)
    assert sequence_faults([0, 2, 1, 3], 4) == (0, 0, 1)
    assert sequence_faults([3, 0, 1, 2], 4) == (0, 0, 3)
    assert sequence_faults([0, 1, 0, 2], 3) == (0, 1, 0)  # a duplicate is not also "reordered"
    assert sequence_faults([], 2) == (2, 0, 0)


def test_text_that_is_not_a_token_makes_the_stream_unexpected() -> None:
    assert check_tokens([(tokens(0, 1) + " hello", 1.0)], 2).unexpected
    assert check_tokens([(tokens(0, 1, 7), 1.0)], 2).unexpected  # a number beyond the expected range


# -- a phase


def test_phase_figures_count_missing_streams_as_errors_and_losses_only_in_complete_streams() -> None:
    records = [
        record(),
        record(lost=1, tokens=1, gaps_us=[]),
        record(error="HTTP 502: bad gateway", ttft_s=None, duration_s=None, gaps_us=[], tokens=0, chunks=0),
    ]
    figures = phase_figures(records, expected_streams=4, wall_s=2.0)
    assert figures.streams == 4
    assert figures.errors == 2  # the failed one and the one that never finished
    assert (figures.lost, figures.duplicated, figures.reordered) == (1, 0, 0)
    assert figures.tokens == 3
    assert figures.streams_per_s == pytest.approx(1.0)
    assert figures.tokens_per_s == pytest.approx(1.5)
    assert figures.itl_ms.max == pytest.approx(20.0)
    assert figures.itl_ms.count == 1
    assert figures.ttft_ms.count == 2
    assert figures.ttft_ms.p50 == pytest.approx(50.0)
    assert (figures.duration_ms.count, figures.duration_ms.p50) == (2, pytest.approx(1000.0))
    assert figures.wall_s == 2.0
    assert figures.error_examples == ["HTTP 502: bad gateway", "1 streams never finished"]


def test_sustained_fault_names_what_went_wrong() -> None:
    fine = phase_figures([record() for _ in range(1000)], 1000, 1.0)
    assert sustained_fault(fine, interval_ms=20) is None
    stalled = phase_figures([record(gaps_us=[250_000])], 1, 1.0)
    assert sustained_fault(stalled, interval_ms=20) == "inter-token stall of 250 ms (over 10x 20 ms)"
    at_the_bound = phase_figures([record(gaps_us=[200_000])], 1, 1.0)
    assert sustained_fault(at_the_bound, interval_ms=20) is None  # 10x exactly is not a stall
    one_error_in_1000 = phase_figures([record() for _ in range(999)] + [record(error="boom")], 1000, 1.0)
    assert sustained_fault(one_error_in_1000, interval_ms=20) is None  # 0.1%: still sustained
    two_errors = phase_figures([record() for _ in range(998)] + [record(error="boom")] * 2, 1000, 1.0)
    assert sustained_fault(two_errors, interval_ms=20) == "2 of 1000 streams failed"
    lossy = phase_figures([record(lost=1), record(reordered=1)], 2, 1.0)
    assert sustained_fault(lossy, interval_ms=20) == "2 lost, duplicated or reordered tokens"


def test_with_no_interval_a_stall_is_a_gap_over_the_floor() -> None:
    # `--interval-ms 0`: the upstream sends every token at once; 10x 0 ms would make any gap a stall.
    assert sustained_fault(phase_figures([record(gaps_us=[3_000])], 1, 1.0), interval_ms=0) is None
    stalled = phase_figures([record(gaps_us=[15_000])], 1, 1.0)
    assert sustained_fault(stalled, interval_ms=0) == "inter-token stall of 15 ms (over 10 ms)"


def test_buffer_figures_take_the_typical_p50_and_the_worst_p99() -> None:
    records = [
        record(buffer_latency_ms={"p50": 1.0, "p99": 5.0, "max": 6.0}, chunks=10, duration_s=1.0),
        record(buffer_latency_ms={"p50": 2.0, "p99": 9.0, "max": 12.0}, chunks=20, duration_s=1.0),
        record(buffer_latency_ms={"p50": 3.0, "p99": 4.0, "max": 4.0}, chunks=30, duration_s=2.0, duplicated=1),
        # A failed stream: its latencies, chunks and faults are left out, and it counts as an error.
        record(error="boom", buffer_latency_ms={"p50": 90.0, "p99": 99.0, "max": 99.0}, chunks=1, lost=5),
    ]
    figures = buffer_figures(records, expected_streams=5)
    assert (figures.p50_ms, figures.p99_ms, figures.max_ms) == (2.0, 9.0, 12.0)
    assert figures.chunks_per_stream == 20
    assert figures.chunks_per_s == 15.0  # median of 10, 20 and 15 chunks/s
    assert (figures.streams, figures.errors) == (5, 2)  # the failed one and the one that never finished
    assert (figures.lost, figures.duplicated, figures.reordered) == (0, 1, 0)
