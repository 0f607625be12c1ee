"""
Transforms and validators: what a route may do to, and demand of, the text it streams.

- A **transform** is `Callable[[str], str]`: it rewrites each chunk of text, in order with
  the others. It sees chunks as the buffer makes them, so a pattern that may span tokens
  (a phone number, a name) needs a buffer that keeps it whole (`buffer_by_sentence`).
- A **validator** is `Callable[[str, str], str | None]`: given the text so far and the chunk
  just added to it, it returns `None` when all is well, or the reason the stream must stop.
  The chunk that failed is not sent, the upstream request is cancelled at once, and the
  client gets an error saying why.

Built-ins a config can name (`{type = "..."}` tables in a provider's `transforms` or
`validators` list): `regex_redact`, `replace`; `banned_phrases`, `max_length`. Your own:
`{type = "python", function = "package.module:name"}`; with `args = {...}`, `name(**args)` is
called once at start-up and must return the transform or validator.

Sans-IO.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "Transform",
    "Validator",
    "banned_phrases",
    "build_transforms",
    "build_validators",
    "max_length",
    "regex_redact",
    "replace_text",
]

Transform = Callable[[str], str]
Validator = Callable[[str, str], "str | None"]


def regex_redact(pattern: str, replacement: str = "[REDACTED]", *, ignore_case: bool = False) -> Transform:
    """Replace every match of `pattern` in a chunk."""
    try:
        compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except (re.error, TypeError) as exc:
        raise ValueError(f"'pattern' is not a regular expression: {exc}") from None
    try:
        compiled.sub(replacement, "")  # a bad replacement (a missing group, not a string) fails now, not mid-stream
    except (re.error, IndexError, TypeError) as exc:
        raise ValueError(f"'replacement' cannot replace a match of 'pattern': {exc}") from None

    def redact(text: str) -> str:
        return compiled.sub(replacement, text)

    return redact


def replace_text(old: str, new: str) -> Transform:
    if not isinstance(old, str) or not old or not isinstance(new, str):
        raise ValueError(f"'old' must be a non-empty string and 'new' a string, got {old!r} and {new!r}")

    def replace(text: str) -> str:
        return text.replace(old, new)

    return replace


def banned_phrases(phrases: Sequence[str], *, case_sensitive: bool = False) -> Validator:
    """Fail as soon as the text contains one of `phrases`, also across chunk boundaries."""
    if isinstance(phrases, str) or not isinstance(phrases, Sequence) or not all(isinstance(p, str) for p in phrases):
        # a lone string would ban each of its characters
        raise ValueError(f"'phrases' must be a list of strings, got {phrases!r}")
    wanted = [p if case_sensitive else p.casefold() for p in phrases if p]
    longest = max((len(p) for p in wanted), default=0)

    def check(text: str, new: str) -> str | None:
        # Only the new text and the tail it may complete a phrase with can hold a new match.
        window = text[-(len(new) + longest - 1) :] if longest else ""
        if not case_sensitive:
            window = window.casefold()
        for phrase in wanted:
            if phrase in window:
                return f"the response contains a banned phrase ({phrase!r})"
        return None

    return check


def max_length(characters: int) -> Validator:
    if not isinstance(characters, int) or isinstance(characters, bool) or characters < 0:
        raise ValueError(f"'characters' must be a non-negative integer, got {characters!r}")

    def check(text: str, new: str) -> str | None:
        if len(text) > characters:
            return f"the response is longer than {characters} characters"
        return None

    return check


_TRANSFORMS: dict[str, Callable[..., Transform]] = {"regex_redact": regex_redact, "replace": replace_text}
_VALIDATORS: dict[str, Callable[..., Validator]] = {"banned_phrases": banned_phrases, "max_length": max_length}


def build_transforms(specs: Any, *, where: str, problems: list[str]) -> tuple[Transform, ...]:
    return tuple(_build(specs, _TRANSFORMS, where=where, problems=problems))


def build_validators(specs: Any, *, where: str, problems: list[str]) -> tuple[Validator, ...]:
    return tuple(_build(specs, _VALIDATORS, where=where, problems=problems))


def _build(
    specs: Any, builtins: Mapping[str, Callable[..., Any]], *, where: str, problems: list[str]
) -> list[Callable[..., Any]]:
    if not isinstance(specs, list):
        problems.append(f'{where} must be a list of tables like {{type = "{next(iter(builtins))}", ...}}')
        return []
    built = []
    for i, spec in enumerate(specs):
        here = f"{where}[{i}]"
        known = ", ".join([*builtins, "python"])
        if not isinstance(spec, Mapping):
            problems.append(f'{here} must be a table like {{type = "{next(iter(builtins))}", ...}}, got {spec!r}')
            continue
        kind = spec.get("type")
        if not isinstance(kind, str):
            what = "has no 'type'" if kind is None else f"type must be a string, got {kind!r}"
            problems.append(f"{here} {what} (one of: {known})")
            continue
        options = {k: v for k, v in spec.items() if k != "type"}
        try:
            if kind == "python":
                built.append(_python_hook(options))
            elif kind in builtins:
                built.append(_called(builtins[kind], options))
            else:
                problems.append(f"{here}.type {kind!r} is unknown (known: {known})")
        except Exception as exc:  # reported as a config problem: the server does not start
            problems.append(f"{here} ({kind}): {exc}")
    return built


def _called(function: Callable[..., Any], arguments: Mapping[str, Any], *, where: str = "") -> Any:
    """
    `function(**arguments)`, a missing or unknown argument named in the config's words rather
    than in a Python `TypeError` (which names the function's Python name, not the config key).
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the call itself says what is wrong
        return function(**arguments)
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    any_name = any(p.kind is p.VAR_KEYWORD for p in parameters)
    unknown = [] if any_name else [a for a in arguments if a not in named]
    missing = [
        p.name
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in arguments
    ]
    problems = []
    if missing:
        problems.append(f"missing {_arguments(missing)}")
    if unknown:
        takes = f"takes {', '.join(map(repr, named))}" if named else "takes none"
        problems.append(f"unknown {_arguments(unknown)} ({takes})")
    if problems:
        raise ValueError(where + "; ".join(problems))
    return function(**arguments)


def _arguments(names: list[str]) -> str:
    return ("argument " if len(names) == 1 else "arguments ") + ", ".join(map(repr, names))


def _python_hook(options: Mapping[str, Any]) -> Callable[..., Any]:
    target = options.get("function")
    extra = set(options) - {"function", "args"}
    if extra:
        raise ValueError(f"unknown keys {sorted(extra)} (a python hook takes 'function' and 'args')")
    if not isinstance(target, str) or ":" not in target:
        raise ValueError("'function' must be 'package.module:name'")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"module {module_name!r} has no {attribute!r}")
    args = options.get("args")
    hook: object
    if args is None:
        hook = function
    elif isinstance(args, Mapping):
        hook = _called(function, args, where=f"'args' for {target}: ")
    else:
        raise ValueError("'args' must be a table")
    if not callable(hook):
        raise ValueError(f"{target} is not callable")
    return hook
