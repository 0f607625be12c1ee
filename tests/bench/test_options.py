"""The bench flags: no flag means the settings' defaults; `--quick` fills in, explicit flags win."""

from __future__ import annotations

import argparse

import pytest

from trioproxy._bench.options import QUICK, BenchSettings, add_arguments, settings_from_args


def settings(*argv: str) -> BenchSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_no_flag_gives_the_settings_defaults() -> None:
    # The parser's own defaults (--compare-model, --upstream-port, --max-concurrency) must not drift.
    assert settings() == BenchSettings()


def test_quick_fills_in_the_workload_and_an_explicit_flag_wins() -> None:
    assert settings("--quick") == BenchSettings(**QUICK)
    quick_with_tokens = settings("--quick", "--tokens", "5", "--concurrency", "3,1,3")
    assert quick_with_tokens == BenchSettings(**{**QUICK, "tokens": 5, "concurrency": (1, 3)})


@pytest.mark.parametrize(
    "argv",
    [("--concurrency", "0"), ("--concurrency", ","), ("--tokens", "20001"), ("--compare", "https://x")],
)
def test_a_bad_flag_is_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit):
        settings(*argv)


def test_staggered_starts_spread_over_one_streams_duration_with_a_round_more() -> None:
    staggered = settings("--staggered")
    assert staggered == BenchSettings(staggered=True)
    assert staggered.stream_s == pytest.approx(0.05 + 63 * 0.02)  # 50 ms to the first token, 63 gaps of 20 ms
    assert [staggered.rounds_for(c) for c in (1, 50, 200)] == [10, 3, 3]
    assert [BenchSettings().rounds_for(c) for c in (1, 50, 200)] == [10, 2, 2]


def test_fronts_are_chosen_by_flag_in_a_fixed_order() -> None:
    assert settings().fronts == ("openai",)
    assert settings("--fronts", "anthropic,openai").fronts == ("openai", "anthropic")
    assert settings("--fronts", "anthropic").fronts == ("anthropic",)
    assert settings("--fronts", "responses-ws,openai,responses").fronts == ("openai", "responses", "responses-ws")
    for bad in ("grpc", ",", "openai,grpc"):
        with pytest.raises(SystemExit):
            settings("--fronts", bad)


def test_workers_adds_a_concurrency_that_many_times_the_largest_unless_one_is_given() -> None:
    assert settings("--workers", "2").concurrency == (1, 50, 200, 400)
    assert settings("--quick", "--workers", "3").concurrency == (1, 10, 30)
    assert settings("--workers", "2", "--concurrency", "1,8") == BenchSettings(concurrency=(1, 8), workers=2)


@pytest.mark.parametrize("workers", ["1", "0", "two"])
def test_workers_is_a_count_of_two_or_more(workers: str) -> None:
    with pytest.raises(SystemExit):
        settings("--workers", workers)
