"""
Tests of the accumulator: deltas folded into one whole answer.
"""

from __future__ import annotations

from trioproxy._accumulator import Accumulator
from trioproxy._events import Delta, ToolCallDelta, Usage


def accumulate(*deltas: Delta) -> Accumulator:
    acc = Accumulator()
    for delta in deltas:
        acc.add(delta)
    return acc


def test_empty() -> None:
    acc = Accumulator()
    assert acc.text == ""
    assert acc.role == "assistant"
    assert acc.finish_reason is None
    assert acc.usage is None
    assert acc.content_deltas == 0
    assert acc.tool_calls() == []
    assert acc.usage_or_estimate() == Usage(prompt_tokens=0, completion_tokens=0, estimated=True)


def test_text_role_finish_usage() -> None:
    acc = accumulate(
        Delta(role="assistant", text=""),
        Delta(text="Hel"),
        Delta(text="lo, "),
        Delta(text="wörld"),
        Delta(finish_reason="length"),
        Delta(usage=Usage(prompt_tokens=9, completion_tokens=3)),
    )
    assert acc.text == "Hello, wörld"
    assert acc.text == "Hello, wörld"  # reading twice gives the same
    assert acc.text_parts == ["Hello, wörld"]
    assert acc.role == "assistant"
    assert acc.finish_reason == "length"
    assert acc.usage == Usage(prompt_tokens=9, completion_tokens=3)
    assert acc.content_deltas == 3


def test_text_after_reading() -> None:
    acc = accumulate(Delta(text="a"), Delta(text="b"))
    assert acc.text == "ab"
    acc.add(Delta(text="c"))
    assert acc.text == "abc"


def test_later_values_win() -> None:
    acc = accumulate(
        Delta(role="developer"),
        Delta(finish_reason="stop"),
        Delta(usage=Usage(1, 1)),
        Delta(finish_reason=None, usage=None, role=None),
        Delta(finish_reason="tool_calls", usage=Usage(2, 5)),
    )
    assert acc.role == "developer"
    assert acc.finish_reason == "tool_calls"
    assert acc.usage == Usage(prompt_tokens=2, completion_tokens=5)


def test_tool_calls_merged_by_index_in_index_order() -> None:
    acc = accumulate(
        Delta(tool_calls=(ToolCallDelta(index=1, id="call_b", name="second", arguments=""),)),
        Delta(tool_calls=(ToolCallDelta(index=0, id="call_a", name="first", arguments='{"x"'),)),
        Delta(tool_calls=(ToolCallDelta(index=0, arguments=": 1}"), ToolCallDelta(index=1, arguments="{}"))),
        # a later fragment repeating id or name does not replace the first
        Delta(tool_calls=(ToolCallDelta(index=1, id="call_other", name="other"),)),
    )
    assert acc.tool_calls() == [
        {"id": "call_a", "type": "function", "function": {"name": "first", "arguments": '{"x": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "second", "arguments": "{}"}},
    ]
    assert acc.content_deltas == 4
    assert acc.text == ""


def test_tool_call_without_id_or_name() -> None:
    acc = accumulate(Delta(tool_calls=(ToolCallDelta(index=3, arguments="{}"),)))
    assert acc.tool_calls() == [{"id": "call_3", "type": "function", "function": {"name": "", "arguments": "{}"}}]


def test_usage_or_estimate_prefers_upstream_usage() -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=20)
    acc = accumulate(Delta(text="x" * 400), Delta(usage=usage))
    assert acc.usage_or_estimate(prompt_chars=1000) is usage


def test_usage_estimate_four_chars_a_token_rounded_up() -> None:
    acc = accumulate(Delta(text="abcdefghi"))  # 9 chars -> 3 tokens, 1 delta
    assert acc.usage_or_estimate(prompt_chars=10) == Usage(prompt_tokens=3, completion_tokens=3, estimated=True)
    assert acc.usage_or_estimate() == Usage(prompt_tokens=0, completion_tokens=3, estimated=True)


def test_usage_estimate_counts_at_least_one_token_a_delta() -> None:
    acc = accumulate(*(Delta(text="a") for _ in range(6)))  # 6 chars -> 2 by length, 6 deltas
    assert acc.usage_or_estimate(prompt_chars=4) == Usage(prompt_tokens=1, completion_tokens=6, estimated=True)


def test_usage_estimate_counts_tool_arguments() -> None:
    acc = accumulate(
        Delta(tool_calls=(ToolCallDelta(index=0, id="c", name="f", arguments="x" * 17),)),
    )  # 17 chars -> 5 tokens
    assert acc.usage_or_estimate() == Usage(prompt_tokens=0, completion_tokens=5, estimated=True)
