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
`fail_after_tokens`, `stall_after_tokens`. Only the config sets `max_output_tokens`, the most
a generation may stream: a request may not raise it.

Sans-IO: `script()` checks the request and returns an iterator of the steps, each made only
when the upstream layer (which sleeps and sends) asks for it. Nothing here does work in
proportion to what a client asks for before the first step: one request for a billion tokens
must not freeze the event loop of a server that streams for everyone else.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

import orjson

from .._events import Delta, ToolCallDelta, Usage
from .._exceptions import ModelNotFoundError, RequestError, UpstreamStatusError
from .._request import ChatRequest, content_text

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "SIMULATED_MODELS", "SimulatedSettings", "Stall", "Step", "script"]

SIMULATED_MODELS: Final = ("echo", "lorem", "tools")
DEFAULT_MAX_OUTPUT_TOKENS: Final = 131_072
"""
As much as today's largest models stream, so that a client asking for their limit (Claude Code
sends `max_tokens: 128000`) is served; steps are made one at a time, so the cap bounds a
stream's length, never its memory.
"""

_LOREM: Final = (  # noqa: SIM905 - the sentence reads better than 36 quoted words
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat."
).split()
_NON_SPACE = re.compile(r"\S+")
_WORD_MARKS: Final = bytes(0x20 if byte in b" \t\n\r\x0b\x0c" else 0x78 for byte in range(256))
"""Every byte as a space or an `x`: words become runs of `x` that C code can count."""


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    """Timing and faults of the simulated upstream (milliseconds; token counts)."""

    ttft_ms: float = 200.0
    token_interval_ms: float = 30.0
    lorem_tokens: int = 32
    fail_before_first_token: bool = False
    fail_after_tokens: int | None = None
    stall_after_tokens: int | None = None
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS

    def overridden(self, overrides: Mapping[str, Any], *, where: str) -> SimulatedSettings:
        """These settings with a request's `overrides` applied; a `RequestError` names a bad key."""
        if "max_output_tokens" in overrides:
            raise RequestError(
                f"{where}.max_output_tokens is the provider's limit: only its config sets it",
                param=f"{where}.max_output_tokens",
            )
        problems = settings_problems(overrides, where=where, keys=_REQUEST_KEYS)
        if problems:
            raise RequestError(problems[0], param=where)
        settings = replace(self, **overrides)
        problems = settings.cap_problems(where=where)
        if problems:
            raise RequestError(problems[0], param=f"{where}.lorem_tokens")
        return settings

    def cap_problems(self, *, where: str) -> list[str]:
        """A sentence if `lorem_tokens` exceeds `max_output_tokens` (checked once both are known)."""
        if self.lorem_tokens > self.max_output_tokens:
            return [
                f"{where}.lorem_tokens: {self.lorem_tokens} is more than max_output_tokens ({self.max_output_tokens})"
            ]
        return []


_KINDS: Final[dict[str, tuple[type, ...]]] = {
    "ttft_ms": (int, float),
    "token_interval_ms": (int, float),
    "lorem_tokens": (int,),
    "fail_before_first_token": (bool,),
    "fail_after_tokens": (int,),
    "stall_after_tokens": (int,),
    "max_output_tokens": (int,),
}
assert set(_KINDS) == {f.name for f in fields(SimulatedSettings)}


_REQUEST_KEYS: Final = tuple(key for key in _KINDS if key != "max_output_tokens")
"""What a request's `simulate` object may set: not the limit that bounds what it may ask."""


def settings_problems(values: Mapping[str, Any], *, where: str, keys: tuple[str, ...] = tuple(_KINDS)) -> list[str]:
    """One sentence per bad key or value; shared by the config loader and per-request overrides."""
    problems = []
    for key, value in values.items():
        kinds = _KINDS.get(key) if key in keys else None
        if kinds is None:
            problems.append(f"{where}: unknown setting {key!r} (expected one of {', '.join(keys)})")
        elif (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            problems.append(f"{where}.{key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            problems.append(f"{where}.{key}: must not be negative, got {value!r}")
    return problems


class Stall:
    """A step that never ends: the upstream goes silent with the connection open."""


Step = tuple[float, "Delta | UpstreamStatusError | Stall"]
"""Seconds to wait, then what happens."""


def script(chat: ChatRequest, settings: SimulatedSettings) -> Iterator[Step]:
    """
    The steps of one simulated generation, in order, made one at a time.

    The request is checked here, before the first step: an unknown model is a 404, and a
    `max_tokens` above the provider's `max_output_tokens` a 400.
    """
    model = chat.upstream_model
    if model not in SIMULATED_MODELS:
        raise ModelNotFoundError(
            f"the simulated provider has no model {model!r}; try one of {', '.join(SIMULATED_MODELS)}"
        )
    cap = settings.max_output_tokens
    if chat.max_tokens is not None and chat.max_tokens > cap:
        param = "max_completion_tokens" if chat.body.get("max_completion_tokens") is not None else "max_tokens"
        raise RequestError(
            f"'{param}' is {chat.max_tokens}, more than this simulated provider streams ({cap}: its max_output_tokens)",
            param=param,
        )
    return _steps(model, chat, settings)


def _steps(model: str, chat: ChatRequest, settings: SimulatedSettings) -> Iterator[Step]:
    ttft = settings.ttft_ms / 1000
    interval = settings.token_interval_ms / 1000
    if settings.fail_before_first_token:
        yield ttft, UpstreamStatusError("simulated failure before the first token", status=503)
        return
    yield 0.0, Delta(role="assistant")
    pieces = _pieces(model, chat, settings)
    finish = "tool_calls" if model == "tools" else "stop"
    # `script()` admits no max_tokens above the cap; a tool call is short whatever it is asked
    limit = chat.max_tokens if chat.max_tokens is not None and model != "tools" else settings.max_output_tokens
    n = 0
    while True:  # a fault may also come after the last piece
        delay = ttft if n == 0 else interval
        if n == settings.stall_after_tokens:
            yield delay, Stall()
            return
        if n == settings.fail_after_tokens:
            yield delay, UpstreamStatusError(f"simulated failure after {n} tokens", status=500)
            return
        piece = next(pieces, None)
        if piece is None:
            break
        if n == limit:
            finish = "length"
            break
        yield delay, piece
        n += 1
    prompt_tokens = sum(_word_count(content_text(m.get("content"))) for m in chat.messages)
    yield 0.0, Delta(finish_reason=finish)
    yield 0.0, Delta(usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=n))


def _pieces(model: str, chat: ChatRequest, settings: SimulatedSettings) -> Iterator[Delta]:
    if model == "tools":
        return _tool_call_pieces(chat)
    if model == "echo":
        text = chat.last_user_text
        words = _words(text) if _NON_SPACE.search(text) else iter(["(empty)"])
    else:
        count = chat.max_tokens if chat.max_tokens is not None else settings.lorem_tokens
        lorem = itertools.islice(itertools.cycle(_LOREM), count)
        words = itertools.chain(itertools.islice(lorem, 1), (" " + word for word in lorem))
    return (Delta(text=word) for word in words)


def _words(text: str) -> Iterator[str]:
    """
    `text` in words, each with the whitespace before it, so that they join back to the text
    (less its trailing whitespace). Found one at a time, in time linear in the text: a
    pattern like `\\s*\\S+` would backtrack over every run of spaces, quadratically.
    """
    start = 0
    for match in _NON_SPACE.finditer(text):
        yield text[start : match.end()]
        start = match.end()


def _word_count(text: str) -> int:
    """The words of `text` (split at ASCII whitespace), counted in C, without a string per word."""
    marks = text.encode("utf-8", "surrogatepass").translate(_WORD_MARKS)
    return marks.count(b" x") + marks.startswith(b"x")


def _tool_call_pieces(chat: ChatRequest) -> Iterator[Delta]:
    name = "get_weather"
    tools = chat.body.get("tools")
    function = tools[0].get("function") if isinstance(tools, list) and tools and isinstance(tools[0], dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]:
        name = function["name"]
    yield Delta(tool_calls=(ToolCallDelta(index=0, id="call_sim_0", name=name, arguments=""),))
    arguments = orjson.dumps({"input": chat.last_user_text}).decode()
    step = max(1, len(arguments) // 4)
    for i in range(0, len(arguments), step):
        yield Delta(tool_calls=(ToolCallDelta(index=0, arguments=arguments[i : i + step]),))
