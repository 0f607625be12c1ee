"""
Tests of the simulated upstream's script: plain data, no clock and no trio.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import ModelNotFoundError, RequestError, UpstreamStatusError
from trioproxy._policy import RetryConfig
from trioproxy._request import ChatRequest, parse_chat_request
from trioproxy.providers.simulated import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    SIMULATED_MODELS,
    SimulatedSettings,
    Stall,
    script,
)

# ttft 0.2 s, interval 0.03 s
SETTINGS = SimulatedSettings()
TTFT = 0.2
ITL = 0.03


def chat(model: str, text: Any = "hello big world", **fields: Any) -> ChatRequest:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    return parse_chat_request({"model": f"sim/{model}", "messages": messages, **fields}).routed(model)


def texts(steps: Iterable[tuple[float, Any]]) -> list[str]:
    return [step.text for _, step in steps if isinstance(step, Delta) and step.text]


def test_models() -> None:
    assert SIMULATED_MODELS == ("echo", "lorem", "tools")


def test_echo_exact_script() -> None:
    assert list(script(chat("echo"), SETTINGS)) == [
        (0.0, Delta(role="assistant")),
        (TTFT, Delta(text="hello")),
        (ITL, Delta(text=" big")),
        (ITL, Delta(text=" world")),
        (0.0, Delta(finish_reason="stop")),
        # prompt: "be brief" (2 words) + "hello big world" (3 words)
        (0.0, Delta(usage=Usage(prompt_tokens=5, completion_tokens=3))),
    ]


@pytest.mark.parametrize(
    "text", ["one", "Hello,  wörld! 👋 two\tthree\nfour", "  leading spaces kept", "a b c d e f g h i j"]
)
def test_echo_tokens_concatenate_back_to_the_message(text: str) -> None:
    steps = list(script(chat("echo", text), SETTINGS))
    assert "".join(texts(steps)) == text


def test_echo_content_parts() -> None:
    steps = list(script(chat("echo", [{"type": "text", "text": "from "}, {"type": "text", "text": "parts"}]), SETTINGS))
    assert texts(steps) == ["from", " parts"]


def test_echo_empty_message() -> None:
    assert texts(script(chat("echo", ""), SETTINGS)) == ["(empty)"]


def test_echo_truncated_by_max_tokens() -> None:
    steps = list(script(chat("echo", max_tokens=2), SETTINGS))
    assert texts(steps) == ["hello", " big"]
    assert steps[-2:] == [
        (0.0, Delta(finish_reason="length")),
        (0.0, Delta(usage=Usage(prompt_tokens=5, completion_tokens=2))),
    ]


def test_lorem_counts_lorem_tokens() -> None:
    steps = list(script(chat("lorem"), SETTINGS))
    words = texts(steps)
    assert len(words) == 32
    assert words[:3] == ["Lorem", " ipsum", " dolor"]
    assert all(w.startswith(" ") for w in words[1:])
    assert steps[-2][1] == Delta(finish_reason="stop")
    assert steps[-1][1] == Delta(usage=Usage(prompt_tokens=5, completion_tokens=32))


def test_lorem_cycles_past_its_text() -> None:
    words = texts(script(chat("lorem"), SimulatedSettings(lorem_tokens=100)))
    assert len(words) == 100
    assert words[35] == " consequat."  # the 36th and last word of the text
    assert words[36] == " Lorem"


@pytest.mark.parametrize("max_tokens", [1, 5, 70])
def test_lorem_counts_max_tokens(max_tokens: int) -> None:
    steps = list(script(chat("lorem", max_completion_tokens=max_tokens), SETTINGS))
    assert len(texts(steps)) == max_tokens
    assert steps[-2][1] == Delta(finish_reason="stop")  # exactly max_tokens asked, none cut


def test_tools_fragments_join_to_valid_json() -> None:
    steps = list(
        script(
            chat("tools", "weather in Paris?", tools=[{"type": "function", "function": {"name": "lookup"}}]), SETTINGS
        )
    )
    assert steps[0] == (0.0, Delta(role="assistant"))
    assert steps[1] == (TTFT, Delta(tool_calls=(ToolCallDelta(index=0, id="call_sim_0", name="lookup", arguments=""),)))
    fragments = []
    for delay, step in steps[2:-2]:
        assert delay == ITL
        [tc] = step.tool_calls
        assert (tc.index, tc.id, tc.name) == (0, None, None)
        assert step.text == ""
        fragments.append(tc.arguments)
    assert len(fragments) == 5  # a quarter of the JSON at a time, the remainder in a fifth piece
    assert orjson.loads("".join(fragments)) == {"input": "weather in Paris?"}
    assert steps[-2] == (0.0, Delta(finish_reason="tool_calls"))
    assert steps[-1] == (0.0, Delta(usage=Usage(prompt_tokens=5, completion_tokens=1 + len(fragments))))


@pytest.mark.parametrize("function", ["lookup", ["lookup"], {"name": 5}, {"name": ""}])
def test_tools_default_name_for_a_tool_of_another_shape(function: object) -> None:
    """The simulator answers any request: a first tool whose function has no name is not one to call."""
    steps = list(script(chat("tools", "x", tools=[{"type": "function", "function": function}]), SETTINGS))
    assert steps[1][1].tool_calls[0].name == "get_weather"


def test_tools_default_name() -> None:
    steps = list(script(chat("tools", "x"), SETTINGS))
    assert steps[1][1].tool_calls[0].name == "get_weather"
    args = "".join(step.tool_calls[0].arguments for _, step in steps[1:-2])
    assert orjson.loads(args) == {"input": "x"}


def test_fail_before_first_token() -> None:
    steps = list(script(chat("echo"), SimulatedSettings(fail_before_first_token=True, fail_after_tokens=1)))
    assert len(steps) == 1
    delay, error = steps[0]
    assert delay == TTFT
    assert isinstance(error, UpstreamStatusError)
    assert (error.message, error.status, error.type, RetryConfig().retries(error)) == (
        "simulated failure before the first token",
        503,
        "upstream_error",
        True,
    )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fail_after_tokens(n: int) -> None:
    steps = list(script(chat("echo"), SimulatedSettings(fail_after_tokens=n)))
    assert steps[0] == (0.0, Delta(role="assistant"))
    assert steps[1 : 1 + n] == [(TTFT, Delta(text="hello")), (ITL, Delta(text=" big")), (ITL, Delta(text=" world"))][:n]
    assert len(steps) == n + 2
    delay, error = steps[-1]
    assert delay == ITL
    assert isinstance(error, UpstreamStatusError)
    assert (error.message, error.status) == (f"simulated failure after {n} tokens", 500)


def test_fail_after_zero_tokens_waits_the_first_token_time() -> None:
    steps = list(script(chat("echo"), SimulatedSettings(ttft_ms=1000, fail_after_tokens=0)))
    assert steps[0] == (0.0, Delta(role="assistant"))
    assert len(steps) == 2
    delay, error = steps[1]
    assert delay == 1.0
    assert isinstance(error, UpstreamStatusError)
    assert error.message == "simulated failure after 0 tokens"


def test_a_fault_before_any_token_waits_the_first_token_time_even_with_nothing_to_say() -> None:
    for settings in (SimulatedSettings(fail_after_tokens=0), SimulatedSettings(stall_after_tokens=0)):
        steps = list(script(chat("lorem"), replace(settings, ttft_ms=1000, lorem_tokens=0)))
        assert len(steps) == 2
        assert steps[1][0] == 1.0


def test_fail_after_more_tokens_than_generated_completes() -> None:
    steps = list(script(chat("echo"), SimulatedSettings(fail_after_tokens=4)))
    assert texts(steps) == ["hello", " big", " world"]
    assert steps[-2][1] == Delta(finish_reason="stop")


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_stall_after_tokens(n: int) -> None:
    steps = list(script(chat("echo"), SimulatedSettings(stall_after_tokens=n)))
    assert steps[0] == (0.0, Delta(role="assistant"))
    assert texts(steps) == ["hello", " big", " world"][:n]
    assert len(steps) == n + 2
    delay, stall = steps[-1]
    assert isinstance(stall, Stall)
    assert delay == (TTFT if n == 0 else ITL)


def test_stall_comes_before_a_later_failure() -> None:
    steps = list(script(chat("echo"), SimulatedSettings(stall_after_tokens=1, fail_after_tokens=2)))
    assert isinstance(steps[-1][1], Stall)
    assert texts(steps) == ["hello"]


def test_delays_follow_settings() -> None:
    steps = list(script(chat("lorem", max_tokens=4), SimulatedSettings(ttft_ms=1500, token_interval_ms=5)))
    assert [delay for delay, _ in steps] == [0.0, 1.5, 0.005, 0.005, 0.005, 0.0, 0.0]


def test_zero_delays() -> None:
    steps = list(script(chat("echo"), SimulatedSettings(ttft_ms=0, token_interval_ms=0)))
    assert {delay for delay, _ in steps} == {0.0}


@pytest.mark.parametrize("model", ["gpt-4o", "", "Echo"])
def test_unknown_model(model: str) -> None:
    c = parse_chat_request({"model": "sim/x", "messages": [{"role": "user", "content": "hi"}]}).routed(model)
    with pytest.raises(ModelNotFoundError) as info:
        script(c, SETTINGS)
    assert info.value.status == 404
    assert info.value.message == f"the simulated provider has no model {model!r}; try one of echo, lorem, tools"


# --------------------------------------------------------------------------------------------
# per-request overrides


def test_overridden() -> None:
    settings = SimulatedSettings(ttft_ms=5).overridden(
        {"token_interval_ms": 1, "fail_after_tokens": 2, "fail_before_first_token": False}, where="simulate"
    )
    assert settings == SimulatedSettings(ttft_ms=5, token_interval_ms=1, fail_after_tokens=2)
    assert SimulatedSettings().overridden({}, where="simulate") == SimulatedSettings()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"ttft": 1},
            (
                "simulate: unknown setting 'ttft' (expected one of ttft_ms, token_interval_ms, lorem_tokens, "
                "fail_before_first_token, fail_after_tokens, stall_after_tokens)"
            ),
        ),
        ({"ttft_ms": "1"}, "simulate.ttft_ms: expected int or float, got '1'"),
        ({"ttft_ms": True}, "simulate.ttft_ms: expected int or float, got True"),
        ({"token_interval_ms": -0.5}, "simulate.token_interval_ms: must not be negative, got -0.5"),
        ({"lorem_tokens": 3.0}, "simulate.lorem_tokens: expected int, got 3.0"),
        ({"fail_before_first_token": "yes"}, "simulate.fail_before_first_token: expected bool, got 'yes'"),
        ({"fail_after_tokens": None}, "simulate.fail_after_tokens: expected int, got None"),
        ({"stall_after_tokens": False}, "simulate.stall_after_tokens: expected int, got False"),
        ({"stall_after_tokens": -2}, "simulate.stall_after_tokens: must not be negative, got -2"),
    ],
)
def test_overridden_rejects(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as info:
        SimulatedSettings().overridden(overrides, where="simulate")
    assert info.value.status == 400
    assert info.value.param == "simulate"
    assert info.value.message == message


def test_overridden_reports_the_first_problem() -> None:
    with pytest.raises(RequestError) as info:
        SimulatedSettings().overridden({"lorem_tokens": "x", "ttft_ms": -1}, where="simulate")
    assert info.value.message == "simulate.lorem_tokens: expected int, got 'x'"


# --------------------------------------------------------------------------------------------
# what a client may ask for: steps made lazily, output capped


def test_a_huge_max_tokens_is_refused_before_any_step() -> None:
    with pytest.raises(RequestError) as info:
        script(chat("lorem", max_tokens=10**9), SETTINGS)
    assert (info.value.status, info.value.param) == (400, "max_tokens")
    assert info.value.message == (
        f"'max_tokens' is 1000000000, more than this simulated provider streams ({DEFAULT_MAX_OUTPUT_TOKENS}: "
        "its max_output_tokens)"
    )
    with pytest.raises(RequestError) as info:
        script(chat("echo", max_completion_tokens=11), SimulatedSettings(max_output_tokens=10))
    assert info.value.param == "max_completion_tokens"


def test_max_tokens_up_to_the_cap_streams() -> None:
    steps = list(script(chat("lorem", max_tokens=10), SimulatedSettings(max_output_tokens=10)))
    assert len(texts(steps)) == 10


def test_steps_are_made_one_at_a_time() -> None:
    steps = script(chat("lorem", max_tokens=DEFAULT_MAX_OUTPUT_TOKENS), SETTINGS)
    assert next(steps) == (0.0, Delta(role="assistant"))
    assert next(steps) == (TTFT, Delta(text="Lorem"))
    assert isinstance(steps, Iterator)


def test_an_echo_longer_than_the_cap_is_cut_there() -> None:
    steps = list(script(chat("echo", "word " * 50), SimulatedSettings(max_output_tokens=20)))
    assert len(texts(steps)) == 20
    assert steps[-2][1] == Delta(finish_reason="length")
    assert steps[-1][1].usage == Usage(prompt_tokens=52, completion_tokens=20)


@pytest.mark.parametrize("text", [" " * 100_000, "a " * 1_000_000, "\n" * 100_000 + "end"])
def test_a_long_message_is_echoed_in_time_linear_in_its_length(text: str) -> None:
    # `\s*\S+` backtracks over a run of spaces quadratically: 14 s for 40,000 of them, minutes here
    started = time.perf_counter()
    steps = list(script(chat("echo", text), SETTINGS))
    assert time.perf_counter() - started < 5.0
    assert len(texts(steps)) <= DEFAULT_MAX_OUTPUT_TOKENS
    assert steps[-1][1].usage.prompt_tokens == 2 + len(text.split())


def test_a_request_may_not_raise_the_cap() -> None:
    with pytest.raises(RequestError) as info:
        SimulatedSettings().overridden({"max_output_tokens": 10**9}, where="simulate")
    assert (info.value.status, info.value.param) == (400, "simulate.max_output_tokens")
    assert info.value.message == "simulate.max_output_tokens is the provider's limit: only its config sets it"


def test_lorem_tokens_above_the_cap_are_refused() -> None:
    with pytest.raises(RequestError) as info:
        SimulatedSettings(max_output_tokens=100).overridden({"lorem_tokens": 101}, where="simulate")
    assert (info.value.status, info.value.param) == (400, "simulate.lorem_tokens")
    assert info.value.message == "simulate.lorem_tokens: 101 is more than max_output_tokens (100)"
