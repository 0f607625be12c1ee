"""
The admission rules (`trioproxy._limits`) with plain numbers for time: the sliding window,
the concurrency leases, the bounded memory, and the shape checks of a request body.
"""

from __future__ import annotations

import pytest

from trioproxy._exceptions import OverloadedError, RateLimitedError, RequestError
from trioproxy._limits import (
    CONCURRENCY_RETRY_AFTER,
    DAY_BUCKET,
    RATE_WINDOW,
    Limiter,
    SlidingWindow,
    check_request_shape,
)

T0 = 1000.0  # a bucket boundary; trio's clock starts anywhere


# --------------------------------------------------------------------------------------------
# requests per minute


def admit_all(rate: SlidingWindow, client: str, times: list[float]) -> None:
    for now in times:
        assert rate.retry_after(client, now) == 0
        rate.record(client, now)


def test_the_limit_is_reached_and_retry_after_is_when_the_oldest_bucket_leaves() -> None:
    rate = SlidingWindow(3)
    admit_all(rate, "a", [T0 + 0.2, T0 + 10.5, T0 + 20.0])
    # The first request counts until the end of its second plus the window.
    assert rate.retry_after("a", T0 + 30.0) == pytest.approx(T0 + 1 + RATE_WINDOW - (T0 + 30.0))
    assert rate.retry_after("a", T0 + 60.9) == pytest.approx(0.1)
    assert rate.retry_after("a", T0 + 61.0) == 0
    rate.record("a", T0 + 61.0)
    # Now the request at 10.5 is the oldest.
    assert rate.retry_after("a", T0 + 61.0) == pytest.approx(T0 + 11 + RATE_WINDOW - (T0 + 61.0))


@pytest.mark.parametrize("start", [0.0, 0.999, 12345.5, -7.25])
def test_no_window_of_sixty_seconds_holds_more_than_the_limit(start: float) -> None:
    """Requests as fast as admitted, for five minutes: every 60 s span holds at most `limit`."""
    rate = SlidingWindow(5)
    admitted: list[float] = []
    now = start
    while now < start + 300:
        wait = rate.retry_after("a", now)
        if wait == 0:
            rate.record("a", now)
            admitted.append(now)
            now += 0.3
        else:
            assert wait > 0
            now += wait  # retrying exactly when told succeeds
            assert rate.retry_after("a", now) == 0
    for i, t in enumerate(admitted):
        in_window = [u for u in admitted[i:] if u < t + RATE_WINDOW]
        assert len(in_window) <= 5
    # ... and the limit is used: about 5 a minute, not fewer.
    assert len(admitted) >= 5 * 300 / (RATE_WINDOW + 1)


def test_clients_are_counted_apart() -> None:
    rate = SlidingWindow(1)
    admit_all(rate, "a", [T0])
    assert rate.retry_after("a", T0) > 0
    assert rate.retry_after("b", T0) == 0


def test_idle_clients_are_forgotten() -> None:
    rate = SlidingWindow(10)
    for i in range(100):
        rate.record(f"client-{i}", T0 + i * 0.01)
    assert len(rate) == 100
    rate.record("late", T0 + 1 + RATE_WINDOW + 1)
    assert len(rate) == 1


def test_memory_is_bounded_whatever_the_number_of_clients() -> None:
    rate = SlidingWindow(1, max_clients=50)
    for i in range(1000):
        rate.record(f"client-{i}", T0)
    assert len(rate) == 50
    # The most recently admitted are still limited; the least recently admitted were let go
    # (the price of bounded memory under a flood of addresses).
    assert rate.retry_after("client-999", T0) > 0
    assert rate.retry_after("client-950", T0) > 0
    assert rate.retry_after("client-949", T0) == 0


def test_a_client_keeps_at_most_one_counter_a_second() -> None:
    rate = SlidingWindow(1_000_000)
    for i in range(10_000):
        rate.record("busy", T0 + i * 0.001)  # ten seconds, a thousand a second
    window = rate._clients["busy"]
    assert window.total == 10_000
    assert len(window.buckets) == 10


def test_a_limit_below_one_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SlidingWindow(0)


# --------------------------------------------------------------------------------------------
# token budgets


def test_a_reservation_counts_until_reconciled_with_the_usage() -> None:
    limiter = Limiter(tokens_per_minute=1000)
    lease = limiter.admit("a", T0, tokens=700)
    with pytest.raises(RateLimitedError) as info:  # 700 reserved + 400 > 1000
        limiter.admit("a", T0 + 1, tokens=400)
    assert (info.value.status, info.value.code) == (429, "tokens_per_minute_exceeded")
    assert info.value.retry_after == pytest.approx(1 + RATE_WINDOW - 1)  # when the reservation leaves
    assert "1000 tokens per minute" in info.value.message
    assert "reserves 400" in info.value.message
    lease.reconcile(150)  # it used far less than it reserved
    lease.reconcile(999)  # once only
    limiter.admit("a", T0 + 1, tokens=850).release()
    with pytest.raises(RateLimitedError):
        limiter.admit("a", T0 + 1, tokens=1)
    limiter.admit("b", T0 + 1, tokens=1000)  # another client has its own budget


def test_a_stream_that_used_more_than_it_reserved_counts_what_it_used() -> None:
    limiter = Limiter(tokens_per_minute=1000)
    limiter.admit("a", T0, tokens=100).reconcile(900)
    with pytest.raises(RateLimitedError):
        limiter.admit("a", T0, tokens=101)
    limiter.admit("a", T0, tokens=100)


def test_a_reservation_that_left_the_window_is_not_reconciled() -> None:
    limiter = Limiter(tokens_per_minute=1000)
    old = limiter.admit("a", T0, tokens=1000)
    limiter.admit("a", T0 + 1 + RATE_WINDOW, tokens=1000)
    old.reconcile(0)  # a stream that ran for over a minute: its bucket is gone, nothing given back twice
    with pytest.raises(RateLimitedError):
        limiter.admit("a", T0 + 1 + RATE_WINDOW, tokens=1)


def test_the_day_budget_counts_per_quarter_hour() -> None:
    limiter = Limiter(tokens_per_day=10_000)
    limiter.admit("a", T0 * DAY_BUCKET + 10, tokens=6000)
    limiter.admit("a", T0 * DAY_BUCKET + 3600, tokens=4000)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a", T0 * DAY_BUCKET + 7200, tokens=1)
    assert info.value.code == "tokens_per_day_exceeded"
    # The first reservation leaves at the end of its quarter hour plus a day.
    assert info.value.retry_after == pytest.approx(DAY_BUCKET + 86_400 - 7200)


def test_a_request_larger_than_the_whole_budget_is_refused_without_retry_after() -> None:
    limiter = Limiter(tokens_per_minute=1000, tokens_per_day=5000)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a", T0, tokens=1001)
    assert (info.value.code, info.value.retry_after) == ("tokens_per_minute_exceeded", None)
    assert "more than the 1000 tokens per minute" in info.value.message
    limiter.admit("a", T0, tokens=1000)  # and it reserved nothing


def test_a_refusal_by_another_limit_reserves_no_tokens() -> None:
    limiter = Limiter(tokens_per_minute=1000, max_streams_per_key=1)
    lease = limiter.admit("a", T0, tokens=500)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a", T0, tokens=500)
    assert info.value.code == "too_many_streams"
    lease.release()
    limiter.admit("a", T0, tokens=500)  # the refused one took none of the budget


# --------------------------------------------------------------------------------------------
# concurrency leases


def test_streams_per_key_are_refused_with_429_and_a_short_retry_after() -> None:
    limiter = Limiter(max_streams_per_key=2)
    first, second = limiter.admit("a", T0), limiter.admit("a", T0)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a", T0)
    assert (info.value.status, info.value.code) == (429, "too_many_streams")
    assert info.value.retry_after == CONCURRENCY_RETRY_AFTER
    limiter.admit("b", T0)  # another key has its own share
    first.release()
    limiter.admit("a", T0)
    assert limiter.streams_of("a") == 2
    assert limiter.streams == 3
    del second


def test_the_global_limit_is_refused_with_503() -> None:
    limiter = Limiter(max_concurrent_streams=2)
    leases = [limiter.admit("a", T0), limiter.admit("b", T0)]
    with pytest.raises(OverloadedError) as info:
        limiter.admit("c", T0)
    assert (info.value.status, info.value.type, info.value.code) == (503, "overloaded_error", "server_overloaded")
    assert info.value.retry_after == CONCURRENCY_RETRY_AFTER
    leases[1].release()
    limiter.admit("c", T0)


def test_a_lease_is_released_once_however_often_it_is_released() -> None:
    limiter = Limiter(max_concurrent_streams=1, max_streams_per_key=1)
    lease = limiter.admit("a", T0)
    lease.release()
    lease.release()  # the session's end and a handler's cleanup may both do it
    assert lease.released
    assert limiter.streams == 0
    assert limiter.streams_of("a") == 0
    other = limiter.admit("a", T0)
    with pytest.raises(OverloadedError):  # a second release did not free a slot it never held
        limiter.admit("b", T0)
    other.release()


def test_clients_without_streams_take_no_memory() -> None:
    limiter = Limiter(max_streams_per_key=5)
    for lease in [limiter.admit(f"c{i}", T0) for i in range(100)]:
        lease.release()
    assert limiter._streams == {}


def test_per_client_refusals_come_before_the_global_one_and_count_nothing() -> None:
    limiter = Limiter(requests_per_minute=2, max_streams_per_key=1, max_concurrent_streams=1)
    lease = limiter.admit("a", T0)
    with pytest.raises(RateLimitedError):  # a's own share: 429, not the server's 503
        limiter.admit("a", T0)
    with pytest.raises(OverloadedError):
        limiter.admit("b", T0)
    lease.release()
    limiter.admit("b", T0).release()
    # The refused requests were not counted against the minute: a still has one left.
    limiter.admit("a", T0).release()
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a", T0 + 5)
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.retry_after == pytest.approx(1 + RATE_WINDOW - 5)


def test_all_limits_off_admit_everything() -> None:
    limiter = Limiter()
    leases = [limiter.admit("a", T0) for _ in range(10_000)]
    assert limiter.streams == 10_000
    for lease in leases:
        lease.release()
    assert limiter.rate is None
    assert limiter.streams == 0


# --------------------------------------------------------------------------------------------
# the shape of a body


def test_too_many_messages_is_a_400_named_like_openai() -> None:
    body = {"messages": [{"role": "user", "content": "x"}] * 5}
    check_request_shape(body, max_messages=5, max_string_chars=0)
    with pytest.raises(RequestError) as info:
        check_request_shape(body, max_messages=4, max_string_chars=0)
    assert (info.value.status, info.value.code, info.value.param) == (400, "array_above_max_length", "messages")
    assert "5 items" in info.value.message
    assert "at most 4" in info.value.message


def test_too_many_responses_input_items_is_the_same_400() -> None:
    body = {"input": [{"role": "user", "content": "x"}] * 5}
    check_request_shape(body, max_messages=5, max_string_chars=0)
    with pytest.raises(RequestError) as info:
        check_request_shape(body, max_messages=4, max_string_chars=0)
    assert (info.value.code, info.value.param) == ("array_above_max_length", "input")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "x" * 11}]},
            "messages[1].content",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 11}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"d": {"e": "x" * 11}}}}]},
            "tools[0].function.parameters.d.e",
        ),
        ({"metadata": {"k" * 11: "v"}}, "metadata"),
        ({"user": "x" * 11}, "user"),
    ],
)
def test_any_string_at_any_depth_over_the_limit_is_a_400_naming_its_path(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as info:
        check_request_shape(body, max_messages=0, max_string_chars=10)
    assert (info.value.status, info.value.code, info.value.param) == (400, "string_above_max_length", param)
    assert "11 characters" in info.value.message


def test_strings_at_the_limit_and_deep_nesting_pass() -> None:
    deep: dict = {"v": "x" * 10}
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = {"d": [deep]}
    check_request_shape(
        {"messages": [{"role": "user", "content": "x" * 10}], "deep": deep}, max_messages=1, max_string_chars=10
    )


def test_checks_off_accept_anything() -> None:
    check_request_shape({"messages": [{"content": "x" * 10_000}] * 10_000}, max_messages=0, max_string_chars=0)
