"""The metrics' own arithmetic, with plain prometheus_client objects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from trioproxy.server._metrics import _observe_all

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


def samples(histogram: Histogram) -> dict[str, float]:
    (family,) = histogram.collect()
    return {f"{sample.name}{sample.labels}": sample.value for sample in family.samples if "created" not in sample.name}


@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False) | st.sampled_from(BUCKETS), max_size=200))
def test_observing_a_stream_s_values_at_once_is_observing_each(values: list[float]) -> None:
    """Bucket by bucket, a value on a bound included (`le`), as `observe` counts them."""
    each = Histogram("each", "", buckets=BUCKETS, registry=CollectorRegistry())
    at_once = Histogram("at_once", "", buckets=BUCKETS, registry=CollectorRegistry())
    for value in values:
        each.observe(value)

    _observe_all(at_once, iter(values))

    expected = {name.replace("each", "at_once", 1): value for name, value in samples(each).items()}
    got = samples(at_once)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
