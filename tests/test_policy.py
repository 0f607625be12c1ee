"""
Tests of the stream policies (`trioproxy._policy`): buffering, timeouts and retries as checked
values, and the retry backoff.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from trioproxy._exceptions import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from trioproxy._policy import FAILURE_KINDS, BufferConfig, RetryConfig, Timeouts, failure_kind, parse_policy


def parsed(base: Any, table: Any, where: str = "[x]") -> tuple[Any, list[str]]:
    problems: list[str] = []
    value = parse_policy(base, table, where=where, problems=problems)
    return value, problems


# --------------------------------------------------------------------------------------------
# defaults


def test_defaults() -> None:
    assert BufferConfig() == BufferConfig(
        min_chunk_size=0, max_chunk_size=0, flush_interval_ms=0.0, buffer_by_word=False, buffer_by_sentence=False
    )
    assert Timeouts() == Timeouts(
        connect_timeout=10.0,
        first_token_timeout=120.0,
        silence_timeout=60.0,
        total_timeout=1200.0,
        heartbeat_interval=15.0,
    )
    assert RetryConfig() == RetryConfig(
        max_retries=2, base_delay_ms=250.0, max_delay_ms=8000.0, exponential_base=2.0, jitter=0.2
    )


def test_empty_table_gives_the_base_itself() -> None:
    for base in (BufferConfig(), Timeouts(), RetryConfig(), RetryConfig(max_retries=7)):
        value, problems = parsed(base, {})
        assert value == base
        assert problems == []


# --------------------------------------------------------------------------------------------
# BufferConfig.enabled


def test_buffer_off_by_default() -> None:
    assert BufferConfig().enabled is False


@pytest.mark.parametrize(
    "config",
    [
        BufferConfig(min_chunk_size=1),
        BufferConfig(max_chunk_size=100),
        BufferConfig(flush_interval_ms=50),
        BufferConfig(flush_interval_ms=0.5),
        BufferConfig(buffer_by_word=True),
        BufferConfig(buffer_by_sentence=True),
    ],
)
def test_any_one_field_enables_the_buffer(config: BufferConfig) -> None:
    assert config.enabled is True


def test_explicit_defaults_leave_the_buffer_off() -> None:
    value, problems = parsed(
        BufferConfig(),
        {
            "min_chunk_size": 0,
            "max_chunk_size": 0,
            "flush_interval_ms": 0,
            "buffer_by_word": False,
            "buffer_by_sentence": False,
        },
    )
    assert problems == []
    assert value == BufferConfig()
    assert value.enabled is False


# --------------------------------------------------------------------------------------------
# parse_policy: good tables


def test_buffer_table() -> None:
    value, problems = parsed(
        BufferConfig(),
        {"min_chunk_size": 8, "max_chunk_size": 64, "flush_interval_ms": 25, "buffer_by_word": True},
    )
    assert problems == []
    assert value == BufferConfig(min_chunk_size=8, max_chunk_size=64, flush_interval_ms=25, buffer_by_word=True)
    assert value.enabled is True


def test_timeouts_table_takes_integers_and_floats() -> None:
    value, problems = parsed(Timeouts(), {"first_token_timeout": 5, "silence_timeout": 2.5, "heartbeat_interval": 0})
    assert problems == []
    assert value == Timeouts(first_token_timeout=5, silence_timeout=2.5, heartbeat_interval=0)
    # the keys not named keep the base's values
    assert (value.connect_timeout, value.total_timeout) == (10.0, 1200.0)


def test_retry_table() -> None:
    value, problems = parsed(
        RetryConfig(),
        {"max_retries": 0, "base_delay_ms": 100, "max_delay_ms": 1500.5, "exponential_base": 1, "jitter": 1},
    )
    assert problems == []
    assert value == RetryConfig(max_retries=0, base_delay_ms=100, max_delay_ms=1500.5, exponential_base=1, jitter=1)


def test_table_applies_over_a_base_that_is_not_the_default() -> None:
    base = RetryConfig(max_retries=5, base_delay_ms=10)
    value, problems = parsed(base, {"jitter": 0})
    assert problems == []
    assert value == RetryConfig(max_retries=5, base_delay_ms=10, jitter=0)
    assert base == RetryConfig(max_retries=5, base_delay_ms=10)  # frozen, untouched


def test_max_chunk_size_zero_means_no_limit_so_any_minimum_is_fine() -> None:
    value, problems = parsed(BufferConfig(), {"min_chunk_size": 500, "max_chunk_size": 0})
    assert problems == []
    assert value == BufferConfig(min_chunk_size=500)


def test_equal_min_and_max_chunk_size() -> None:
    value, problems = parsed(BufferConfig(), {"min_chunk_size": 16, "max_chunk_size": 16})
    assert problems == []
    assert value == BufferConfig(min_chunk_size=16, max_chunk_size=16)


# --------------------------------------------------------------------------------------------
# parse_policy: one mistake, one sentence, the key left at its base value


@pytest.mark.parametrize(
    ("base", "table", "expected"),
    [
        # types
        (BufferConfig(), {"min_chunk_size": 1.5}, "[x].min_chunk_size must be an integer, got 1.5"),
        (BufferConfig(), {"max_chunk_size": "64"}, "[x].max_chunk_size must be an integer, got '64'"),
        (BufferConfig(), {"flush_interval_ms": "50"}, "[x].flush_interval_ms must be a number, got '50'"),
        (BufferConfig(), {"buffer_by_word": 1}, "[x].buffer_by_word must be a boolean, got 1"),
        (BufferConfig(), {"buffer_by_sentence": "yes"}, "[x].buffer_by_sentence must be a boolean, got 'yes'"),
        (Timeouts(), {"silence_timeout": "30"}, "[x].silence_timeout must be a number, got '30'"),
        (Timeouts(), {"total_timeout": None}, "[x].total_timeout must be a number, got None"),
        (Timeouts(), {"first_token_timeout": [1]}, "[x].first_token_timeout must be a number, got [1]"),
        (RetryConfig(), {"max_retries": 2.0}, "[x].max_retries must be an integer, got 2.0"),
        (RetryConfig(), {"base_delay_ms": "250"}, "[x].base_delay_ms must be a number, got '250'"),
        (
            RetryConfig(),
            {"retry_on": ["rate_limit", "bad_request"]},
            "[x].retry_on must be a list of failure kinds among connect, first_token_timeout, connection_broken, "
            "rate_limit, server_error, timeout, protocol, got ['rate_limit', 'bad_request']",
        ),
        # bool is not an int, nor a number
        (BufferConfig(), {"min_chunk_size": True}, "[x].min_chunk_size must be an integer, got True"),
        (BufferConfig(), {"flush_interval_ms": False}, "[x].flush_interval_ms must be a number, got False"),
        (Timeouts(), {"connect_timeout": True}, "[x].connect_timeout must be a number, got True"),
        (RetryConfig(), {"max_retries": False}, "[x].max_retries must be an integer, got False"),
        (RetryConfig(), {"jitter": True}, "[x].jitter must be a number, got True"),
        # NaN compares false with everything: never a valid value
        (Timeouts(), {"silence_timeout": math.nan}, "[x].silence_timeout must be a number, got nan"),
        (RetryConfig(), {"jitter": math.nan}, "[x].jitter must be a number, got nan"),
        (BufferConfig(), {"flush_interval_ms": math.nan}, "[x].flush_interval_ms must be a number, got nan"),
        # negatives
        (BufferConfig(), {"min_chunk_size": -1}, "[x].min_chunk_size must not be negative, got -1"),
        (BufferConfig(), {"max_chunk_size": -8}, "[x].max_chunk_size must not be negative, got -8"),
        (BufferConfig(), {"flush_interval_ms": -0.5}, "[x].flush_interval_ms must not be negative, got -0.5"),
        (Timeouts(), {"connect_timeout": -1}, "[x].connect_timeout must not be negative, got -1"),
        (Timeouts(), {"heartbeat_interval": -15.0}, "[x].heartbeat_interval must not be negative, got -15.0"),
        (RetryConfig(), {"max_retries": -1}, "[x].max_retries must not be negative, got -1"),
        (RetryConfig(), {"max_delay_ms": -1.0}, "[x].max_delay_ms must not be negative, got -1.0"),
        (RetryConfig(), {"jitter": -0.1}, "[x].jitter must not be negative, got -0.1"),
        # ranges
        (RetryConfig(), {"jitter": 1.5}, "[x].jitter must be between 0 and 1, got 1.5"),
        (RetryConfig(), {"jitter": 2}, "[x].jitter must be between 0 and 1, got 2"),
        (RetryConfig(), {"exponential_base": 0.5}, "[x].exponential_base must be at least 1, got 0.5"),
        (RetryConfig(), {"exponential_base": 0}, "[x].exponential_base must be at least 1, got 0"),
        (
            BufferConfig(),
            {"min_chunk_size": 100, "max_chunk_size": 10},
            "[x]: min_chunk_size (100) is larger than max_chunk_size (10)",
        ),
    ],
)
def test_bad_value(base: Any, table: dict[str, Any], expected: str) -> None:
    value, problems = parsed(base, table)
    assert problems == [expected]
    # the bad key keeps its base value
    if len(table) == 1:
        assert value == base


def test_min_larger_than_max_keeps_the_max() -> None:
    value, problems = parsed(BufferConfig(), {"min_chunk_size": 100, "max_chunk_size": 10}, where="buffer_config")
    assert problems == ["buffer_config: min_chunk_size (100) is larger than max_chunk_size (10)"]
    assert value == BufferConfig(max_chunk_size=10)


def test_min_larger_than_a_max_from_the_base() -> None:
    value, problems = parsed(BufferConfig(max_chunk_size=10), {"min_chunk_size": 11})
    assert problems == ["[x]: min_chunk_size (11) is larger than max_chunk_size (10)"]
    assert value == BufferConfig(max_chunk_size=10)


@pytest.mark.parametrize(
    ("base", "known"),
    [
        (BufferConfig(), "min_chunk_size, max_chunk_size, flush_interval_ms, buffer_by_word, buffer_by_sentence"),
        (
            Timeouts(),
            "connect_timeout, first_token_timeout, silence_timeout, total_timeout, heartbeat_interval, hedge_after",
        ),
        (
            RetryConfig(),
            "max_retries, base_delay_ms, max_delay_ms, exponential_base, jitter, retry_on, max_hedges, "
            "max_continuations, continuation_cooldown",
        ),
    ],
)
def test_unknown_key(base: Any, known: str) -> None:
    value, problems = parsed(base, {"flush_interval": 5}, where="[providers.p].buffer")
    assert problems == [f"[providers.p].buffer: unknown key 'flush_interval' (known: {known})"]
    assert value == base


@pytest.mark.parametrize("table", [5, "fast", [1, 2], None, True])
def test_not_a_table(table: Any) -> None:
    for base in (BufferConfig(), Timeouts(), RetryConfig()):
        value, problems = parsed(base, table, where="[retry]")
        assert problems == [f"[retry] must be a table/object, got {table!r}"]
        assert value is base


def test_every_mistake_reported_and_good_keys_kept() -> None:
    value, problems = parsed(
        RetryConfig(),
        {
            "max_retries": 4,
            "base_delay_ms": -5,
            "jitter": 3,
            "exponential_base": 0.9,
            "retries": 1,
            "max_delay_ms": 100,
        },
        where="[retry]",
    )
    assert problems == [
        "[retry].base_delay_ms must not be negative, got -5",
        "[retry]: unknown key 'retries' (known: max_retries, base_delay_ms, max_delay_ms, exponential_base, jitter, "
        "retry_on, max_hedges, max_continuations, continuation_cooldown)",
        "[retry].jitter must be between 0 and 1, got 3",
        "[retry].exponential_base must be at least 1, got 0.9",
    ]
    assert value == RetryConfig(max_retries=4, max_delay_ms=100)


def test_problems_are_appended_to_the_given_list() -> None:
    problems = ["earlier"]
    parse_policy(Timeouts(), {"total_timeout": -1}, where="[timeouts]", problems=problems)
    parse_policy(BufferConfig(), {"buffer_by_word": "no"}, where="[buffer]", problems=problems)
    assert problems == [
        "earlier",
        "[timeouts].total_timeout must not be negative, got -1",
        "[buffer].buffer_by_word must be a boolean, got 'no'",
    ]


# --------------------------------------------------------------------------------------------
# RetryConfig.delay


def test_delay_without_jitter() -> None:
    config = RetryConfig()  # 250 ms, doubling, capped at 8 s
    assert [config.delay(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert [config.delay(n, random=0.0) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_delay_with_the_most_jitter() -> None:
    config = RetryConfig()  # jitter 0.2: up to a fifth less
    expected = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    factor = 1 - 0.2 * 0.999
    assert factor == pytest.approx(0.8002, abs=1e-12)
    assert [config.delay(n, random=0.999) for n in range(6)] == pytest.approx([e * factor for e in expected], rel=1e-12)
    assert config.delay(0, random=0.999) == pytest.approx(0.20005, rel=1e-12)
    assert config.delay(5, random=0.999) == pytest.approx(6.4016, rel=1e-12)


def test_jitter_only_shortens() -> None:
    config = RetryConfig(jitter=0.5)
    for n in range(6):
        full = config.delay(n)
        for random in (0.0, 0.25, 0.5, 0.999):
            assert full * 0.5 < config.delay(n, random=random) <= full


def test_no_jitter_ignores_random() -> None:
    config = RetryConfig(jitter=0)
    assert [config.delay(n, random=0.999) for n in range(4)] == [0.25, 0.5, 1.0, 2.0]


def test_delay_capped_at_max_delay() -> None:
    config = RetryConfig(base_delay_ms=100, max_delay_ms=1000, exponential_base=3, jitter=0)
    assert [config.delay(n) for n in range(6)] == pytest.approx([0.1, 0.3, 0.9, 1.0, 1.0, 1.0], rel=1e-12)
    # jitter applies to the capped value
    jittered = RetryConfig(base_delay_ms=100, max_delay_ms=1000, exponential_base=3, jitter=0.5)
    assert jittered.delay(5, random=0.5) == pytest.approx(0.75, rel=1e-12)


def test_delay_stays_capped_for_any_retry_number() -> None:
    # 2.0 ** 1100 overflows a float: the cap must hold all the same
    config = RetryConfig()
    for n in (10, 100, 1023, 1024, 1100, 10_000):
        assert config.delay(n) == 8.0
        assert config.delay(n, random=0.5) == pytest.approx(7.2, rel=1e-12)
    assert RetryConfig(base_delay_ms=0, max_delay_ms=0).delay(5000) == 0.0
    assert RetryConfig(base_delay_ms=0).delay(5000) == 0.0
    assert RetryConfig(exponential_base=1).delay(10_000) == 0.25


def test_exponential_base_one_is_a_constant_delay() -> None:
    config = RetryConfig(base_delay_ms=300, exponential_base=1, jitter=0)
    assert [config.delay(n) for n in range(6)] == [0.3] * 6


def test_retry_after_wins_when_larger() -> None:
    config = RetryConfig()
    assert config.delay(0, retry_after=3.0) == 3.0
    assert config.delay(0, retry_after=3.0, random=0.999) == 3.0
    assert config.delay(5, retry_after=30) == 30
    # beyond the cap too: the upstream said when
    assert config.delay(10, retry_after=60.0) == 60.0


def test_retry_after_smaller_than_the_backoff_is_ignored() -> None:
    config = RetryConfig()
    assert config.delay(3, retry_after=0.5) == 2.0
    assert config.delay(3, retry_after=0.0) == 2.0
    assert config.delay(3, retry_after=None) == 2.0
    assert config.delay(3, retry_after=0.5, random=0.999) == pytest.approx(2.0 * 0.8002, rel=1e-12)


def test_zero_delays() -> None:
    config = RetryConfig(base_delay_ms=0, max_delay_ms=0)
    assert [config.delay(n, random=0.5) for n in range(4)] == [0.0] * 4
    assert config.delay(2, retry_after=1.5) == 1.5


# failure kinds: what retries on its route, what goes to the next fallback at once


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (UpstreamConnectError("refused"), "connect"),
        (UpstreamTimeoutError("slow connect", kind="connect_timeout"), "connect"),
        (UpstreamTimeoutError("no slot", kind="pool_timeout"), "connect"),
        (UpstreamTimeoutError("no token", kind="first_token_timeout"), "first_token_timeout"),
        (UpstreamTimeoutError("stuck write", kind="write_timeout"), "timeout"),
        (UpstreamBrokenError("reset"), "connection_broken"),
        (UpstreamStatusError("slow down", status=429), "rate_limit"),
        (UpstreamStatusError("down", status=503), "server_error"),
        (UpstreamStatusError("overloaded", status=529, type="overloaded_error"), "server_error"),
        (UpstreamError("failed"), "server_error"),
        (UpstreamProtocolError("garbage"), "protocol"),
        (UpstreamStatusError("bad request", status=400), None),
        (UpstreamStatusError("filtered", status=400, code="content_filter"), None),
        (UpstreamStatusError("no key", status=401), None),
    ],
)
def test_failure_kinds(error: UpstreamError, kind: str | None) -> None:
    assert failure_kind(error) == kind


def test_by_default_only_what_may_pass_is_retried_on_its_route() -> None:
    retry = RetryConfig()
    retried = {kind for kind in FAILURE_KINDS if retry.retries(_an_error_of(kind))}
    assert retried == {"connection_broken", "rate_limit", "server_error", "timeout"}
    assert not retry.retries(UpstreamStatusError("bad request", status=400))


def test_retry_on_is_a_list_of_kinds() -> None:
    value, problems = parsed(RetryConfig(), {"retry_on": ["connect", "first_token_timeout"]})
    assert problems == []
    assert value.retry_on == ("connect", "first_token_timeout")
    assert value.retries(UpstreamConnectError("refused"))
    assert not value.retries(UpstreamStatusError("down", status=503))


def _an_error_of(kind: str) -> UpstreamError:
    return {
        "connect": UpstreamConnectError("refused"),
        "first_token_timeout": UpstreamTimeoutError("no token", kind="first_token_timeout"),
        "connection_broken": UpstreamBrokenError("reset"),
        "rate_limit": UpstreamStatusError("slow down", status=429),
        "server_error": UpstreamStatusError("down", status=500),
        "timeout": UpstreamTimeoutError("stuck", kind="write_timeout"),
        "protocol": UpstreamProtocolError("garbage"),
    }[kind]
