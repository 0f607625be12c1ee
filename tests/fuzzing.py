"""
What the property-based fuzz tests share: their hypothesis settings, and paths into JSON values
for the mutations that build inputs near valid ones.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings


def fuzzed(examples: int, *also_suppressed: HealthCheck) -> settings:
    """
    A fuzz test's settings: `examples` of them (`FUZZ_EXAMPLES=N` searches longer),
    derandomized so that CI runs the same examples every time, and no deadline, since an
    example may cross real sockets.
    """
    return settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", examples)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, *also_suppressed],
    )


def json_paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON `value` a mutation may hit, the whole value (`()`) first."""
    found = [at]
    if isinstance(value, dict):
        for key, child in value.items():
            found += json_paths(child, (*at, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += json_paths(child, (*at, index))
    return found


def value_at(value: Any, at: tuple[Any, ...]) -> Any:
    for step in at:
        value = value[step]
    return value


def replaced(value: Any, at: tuple[Any, ...], new: Any) -> Any:
    """`value` with what is at `at` replaced by `new` (a copy along the path only)."""
    if not at:
        return new
    head, *rest = at
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], tuple(rest), new)}
    return [replaced(child, tuple(rest), new) if i == head else child for i, child in enumerate(value)]
