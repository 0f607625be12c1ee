"""A provider's targets: least outstanding requests per weight, and each one's circuit breaker."""

from __future__ import annotations

from trioproxy._policy import BreakerConfig
from trioproxy._targets import LocalBreakers, Target, choose

BREAKER = BreakerConfig(failures=2, cooldown=10)


async def take(targets: list[Target], now: float) -> str | None:
    """The URL of the target `choose` picks (its request now outstanding there), or None."""
    chosen = await choose(targets, now)
    return None if chosen is None else chosen[0].url


async def fail(breakers: LocalBreakers, url: str, now: float, *, probe: bool = False) -> str | None:
    return await breakers.settle(url, "failed", probe=probe, now=now)


async def test_the_least_outstanding_per_weight_takes_the_request() -> None:
    breakers = LocalBreakers(BREAKER)
    a, b = Target("a", breakers), Target("b", breakers, weight=3)
    picked = [await take([a, b], now=0) for _ in range(8)]
    assert picked.count("b") == 6
    assert picked.count("a") == 2  # b takes three for each of a's
    assert (a.outstanding, b.outstanding) == (2, 6)


async def test_consecutive_failures_open_the_breaker_for_its_cooldown_then_one_probe() -> None:
    breakers = LocalBreakers(BREAKER)
    a, b = Target("a", breakers), Target("b", breakers)
    assert await fail(breakers, "a", now=0) is None  # one failure: still closed
    assert await fail(breakers, "a", now=1) == "open"
    assert await take([a, b], now=5) == "b"  # skipped, no connection tried
    assert await take([a], now=10.9) is None

    assert await choose([a], now=11) == (a, True)  # the cooldown passed: half-open, and this is its one probe
    assert a.state == "half_open"
    assert await take([a], now=11) is None  # only one probe at a time
    assert await breakers.settle("a", "succeeded", probe=True, now=12) == "closed"
    assert await choose([a], now=12) == (a, False)


async def test_a_failed_probe_opens_it_again_and_a_success_resets_the_count() -> None:
    breakers = LocalBreakers(BREAKER)
    a = Target("a", breakers)
    for now in (0, 1):
        await fail(breakers, "a", now=now)
    assert await choose([a], now=11) == (a, True)
    assert await fail(breakers, "a", now=11, probe=True) == "open"
    assert await take([a], now=20.9) is None
    assert await take([a], now=21) == "a"  # open until 21

    await fail(breakers, "b", now=0)
    assert await breakers.settle("b", "succeeded", probe=False, now=0) is None
    assert await fail(breakers, "b", now=0) is None  # the count started again


async def test_an_older_request_failing_while_half_open_leaves_the_verdict_to_the_probe() -> None:
    breakers = LocalBreakers(BREAKER)
    for now in (0, 1):
        await fail(breakers, "a", now=now)
    assert await breakers.admit("a", now=11) == "half_open"
    assert await fail(breakers, "a", now=11) is None  # sent before it opened
    assert breakers.state("a") == "half_open"


async def test_a_request_without_a_verdict_frees_the_probe() -> None:
    breakers = LocalBreakers(BREAKER)
    a = Target("a", breakers)
    for now in (0, 1):
        await fail(breakers, "a", now=now)
    assert await choose([a], now=11) == (a, True)
    assert await breakers.settle("a", "released", probe=True, now=11) is None
    assert await choose([a], now=11) == (a, True)  # the next request probes it
