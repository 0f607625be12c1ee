"""A provider's targets: least outstanding requests per weight, and each one's circuit breaker."""

from __future__ import annotations

from trioproxy._policy import BreakerConfig
from trioproxy._targets import Target, choose

BREAKER = BreakerConfig(failures=2, cooldown=10)


def test_the_least_outstanding_per_weight_takes_the_request() -> None:
    a, b = Target("a"), Target("b", weight=3)
    picked = []
    for _ in range(8):
        target = choose([a, b], now=0)
        assert target is not None
        target.taken()
        picked.append(target.url)
    assert picked.count("b") == 6
    assert picked.count("a") == 2  # b takes three for each of a's


def test_consecutive_failures_open_the_breaker_for_its_cooldown_then_one_probe() -> None:
    a, b = Target("a"), Target("b")
    a.taken()
    assert a.failed(now=0, breaker=BREAKER) is None  # one failure: still closed
    a.taken()
    assert a.failed(now=1, breaker=BREAKER) == "open"
    assert choose([a, b], now=5) is b  # skipped, no connection tried
    assert choose([a], now=10.9) is None

    probe = choose([a], now=11)  # the cooldown passed: half-open, one probe
    assert probe is a
    assert a.state == "half_open"
    a.taken()
    assert choose([a], now=11) is None  # only one probe at a time
    assert a.succeeded() == "closed"
    assert choose([a], now=12) is a


def test_a_failed_probe_opens_it_again_and_a_success_resets_the_count() -> None:
    a = Target("a")
    for now in (0, 1):
        a.taken()
        a.failed(now=now, breaker=BREAKER)
    assert choose([a], now=11) is a
    a.taken()
    assert a.failed(now=11, breaker=BREAKER) == "open"
    assert (a.state, a.open_until) == ("open", 21)

    b = Target("b")
    b.taken()
    b.failed(now=0, breaker=BREAKER)
    b.taken()
    assert b.succeeded() is None
    assert b.failures == 0


def test_a_request_without_a_verdict_frees_its_slot_and_the_probe() -> None:
    a = Target("a", state="half_open")
    a.taken()
    a.released()
    assert (a.outstanding, a.probing, choose([a], now=0)) == (0, False, a)
