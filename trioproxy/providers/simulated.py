"""
The built-in simulated upstream: streams with no key and no network, deterministically.

It exists so that `make serve` streams on a fresh machine, and so that tests and demos can
reproduce an upstream's timing and failures on demand. Models:

- `echo`: repeats the last user message, word by word;
- `lorem`: `max_tokens` (else `lorem_tokens`) words of lorem ipsum;
- `tools`: calls the request's first tool (or `get_weather`) with the last user message as
  its `input` argument, streamed in fragments.

Timing and faults come from the provider's config and, per request, from a `simulate` object
in the request body (the openai SDK's `extra_body`), with the same keys:
`ttft_ms`, `token_interval_ms`, `lorem_tokens`, `fail_before_first_token`,
`fail_after_tokens`, `stall_after_tokens`.

Sans-IO: `script()` returns the steps; the upstream layer sleeps and sends.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

import orjson

from .._events import Delta, ToolCallDelta, Usage
from .._exceptions import ModelNotFoundError, RequestError, UpstreamStatusError
from .._request import ChatRequest, content_text

__all__ = ["SIMULATED_MODELS", "SimulatedSettings", "Stall", "Step", "script"]

SIMULATED_MODELS: Final = ("echo", "lorem", "tools")

_LOREM: Final = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat."
).split()
_WORD = re.compile(r"\s*\S+")


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    """Timing and faults of the simulated upstream (milliseconds; token counts)."""

    ttft_ms: float = 200.0
    token_interval_ms: float = 30.0
    lorem_tokens: int = 32
    fail_before_first_token: bool = False
    fail_after_tokens: int | None = None
    stall_after_tokens: int | None = None

    def overridden(self, overrides: Mapping[str, Any], *, where: str) -> SimulatedSettings:
        """These settings with `overrides` applied; a `RequestError` names a bad key."""
        problems = settings_problems(overrides, where=where)
        if problems:
            raise RequestError(problems[0], param=where)
        return replace(self, **overrides)


_KINDS: Final[dict[str, tuple[type, ...]]] = {
    "ttft_ms": (int, float),
    "token_interval_ms": (int, float),
    "lorem_tokens": (int,),
    "fail_before_first_token": (bool,),
    "fail_after_tokens": (int,),
    "stall_after_tokens": (int,),
}
assert set(_KINDS) == {f.name for f in fields(SimulatedSettings)}


def settings_problems(values: Mapping[str, Any], *, where: str) -> list[str]:
    """One sentence per bad key or value; shared by the config loader and per-request overrides."""
    problems = []
    for key, value in values.items():
        kinds = _KINDS.get(key)
        if kinds is None:
            problems.append(f"{where}: unknown setting {key!r} (expected one of {', '.join(_KINDS)})")
        elif isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            problems.append(f"{where}.{key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        elif not isinstance(value, bool) and value < 0:
            problems.append(f"{where}.{key}: must not be negative, got {value!r}")
    return problems


class Stall:
    """A step that never ends: the upstream goes silent with the connection open."""


Step = tuple[float, "Delta | UpstreamStatusError | Stall"]
"""Seconds to wait, then what happens."""


def script(chat: ChatRequest, settings: SimulatedSettings) -> list[Step]:
    """Every step of one simulated generation, in order."""
    model = chat.upstream_model
    if model not in SIMULATED_MODELS:
        raise ModelNotFoundError(
            f"the simulated provider has no model {model!r}; try one of {', '.join(SIMULATED_MODELS)}"
        )
    ttft = settings.ttft_ms / 1000
    interval = settings.token_interval_ms / 1000
    if settings.fail_before_first_token:
        return [(ttft, UpstreamStatusError("simulated failure before the first token", status=503))]

    pieces, finish = _pieces(model, chat, settings)
    prompt_tokens = sum(len(_WORD.findall(content_text(m.get("content")))) for m in chat.messages)
    steps: list[Step] = [(0.0, Delta(role="assistant"))]
    for n in range(len(pieces) + 1):  # a fault may also come after the last piece
        delay = ttft if n == 0 else interval
        if n == settings.stall_after_tokens:
            steps.append((delay, Stall()))
            return steps
        if n == settings.fail_after_tokens:
            steps.append((delay, UpstreamStatusError(f"simulated failure after {n} tokens", status=500)))
            return steps
        if n < len(pieces):
            steps.append((delay, pieces[n]))
    steps.append((0.0, Delta(finish_reason=finish)))
    steps.append((0.0, Delta(usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces)))))
    return steps


def _pieces(model: str, chat: ChatRequest, settings: SimulatedSettings) -> tuple[list[Delta], str]:
    limit = chat.max_tokens
    if model == "tools":
        return _tool_call_pieces(chat), "tool_calls"
    if model == "echo":
        words = _WORD.findall(chat.last_user_text) or ["(empty)"]
    else:
        count = limit if limit is not None else settings.lorem_tokens
        words = [
            word if i == 0 else " " + word for i, word in enumerate(itertools.islice(itertools.cycle(_LOREM), count))
        ]
    finish = "stop"
    if limit is not None and len(words) > limit:
        words, finish = words[:limit], "length"
    return [Delta(text=word) for word in words], finish


def _tool_call_pieces(chat: ChatRequest) -> list[Delta]:
    name = "get_weather"
    tools = chat.body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        name = (tools[0].get("function") or {}).get("name") or name
    arguments = orjson.dumps({"input": chat.last_user_text}).decode()
    first = ToolCallDelta(index=0, id="call_sim_0", name=name, arguments="")
    step = max(1, len(arguments) // 4)
    fragments = [arguments[i : i + step] for i in range(0, len(arguments), step)]
    return [Delta(tool_calls=(first,))] + [
        Delta(tool_calls=(ToolCallDelta(index=0, arguments=fragment),)) for fragment in fragments
    ]
