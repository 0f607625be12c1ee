"""
Tests of the built-in transforms and validators (`trioproxy.pipeline._content`) and of the
config lists that name them (`build_transforms`, `build_validators`).

A validator is called as the validate stage calls it: with the text so far (the new chunk
included) and the new chunk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from trioproxy.pipeline._content import (
    Validator,
    banned_phrases,
    build_transforms,
    build_validators,
    max_length,
    regex_redact,
    replace_text,
)


def first_failure(validator: Validator, chunks: Sequence[str]) -> tuple[int, str] | None:
    """Feed `chunks` as the validate stage does; the index and reason of the first failure."""
    text = ""
    for i, chunk in enumerate(chunks):
        text += chunk
        reason = validator(text, chunk)
        if reason is not None:
            return i, reason
    return None


def built(builder: Any, specs: Any, where: str = "[providers.p].x") -> tuple[tuple[Any, ...], list[str]]:
    problems: list[str] = []
    result = builder(specs, where=where, problems=problems)
    return result, problems


# --------------------------------------------------------------------------------------------
# regex_redact


PHONE = r"\b\d{3}-\d{4}\b"


def test_regex_redact_default_replacement() -> None:
    redact = regex_redact(PHONE)
    assert redact("call 555-1234 or 555-9876.") == "call [REDACTED] or [REDACTED]."
    assert redact("no number here") == "no number here"
    assert redact("") == ""
    assert redact("5551-2345") == "5551-2345"  # \b: not inside a longer number


def test_regex_redact_replacement_and_groups() -> None:
    assert regex_redact(PHONE, "[phone]")("555-1234") == "[phone]"
    assert regex_redact(r"(\d{3})-\d{4}", r"\1-XXXX")("call 555-1234") == "call 555-XXXX"
    assert regex_redact(r"(?P<user>\w+)@\w+\.com", r"\g<user>@…")("mail bob@example.com") == "mail bob@…"


def test_regex_redact_case() -> None:
    assert regex_redact("secret")("Secret secret SECRET") == "Secret [REDACTED] SECRET"
    assert regex_redact("secret", ignore_case=True)("Secret secret SECRET") == "[REDACTED] [REDACTED] [REDACTED]"


def test_regex_redact_is_per_chunk() -> None:
    # a match split over two chunks is not seen: that is what a sentence buffer is for
    redact = regex_redact(PHONE)
    assert [redact(c) for c in ["call 555-", "1234 now"]] == ["call 555-", "1234 now"]


def test_regex_redact_unicode() -> None:
    assert regex_redact("wörld", "🌍")("héllo wörld 日本") == "héllo 🌍 日本"


def test_regex_redact_bad_pattern() -> None:
    with pytest.raises(
        ValueError, match=r"^'pattern' is not a regular expression: missing \), unterminated subpattern"
    ):
        regex_redact("(")


@pytest.mark.parametrize("replacement", [r"\2", r"\g<name>", 5])
def test_regex_redact_bad_replacement_fails_when_built(replacement: Any) -> None:
    # not at the first match, in the middle of a stream
    with pytest.raises(ValueError, match=r"^'replacement' cannot replace a match of 'pattern': "):
        regex_redact(r"(\d)", replacement)


# --------------------------------------------------------------------------------------------
# replace_text


def test_replace_text() -> None:
    replace = replace_text("colour", "color")
    assert replace("colour, colours and Colour") == "color, colors and Colour"
    assert replace("nothing") == "nothing"
    assert replace_text("🌍", "world")("hello 🌍🌍") == "hello worldworld"
    assert replace_text("x", "")("xaxbx") == "ab"


@pytest.mark.parametrize(("old", "new"), [("", "!"), (None, "a"), ("a", None), (1, "a")])
def test_replace_text_bad_arguments(old: Any, new: Any) -> None:
    # replacing "" would put `new` between every two characters
    with pytest.raises(ValueError, match="'old' must be a non-empty string and 'new' a string"):
        replace_text(old, new)


# --------------------------------------------------------------------------------------------
# banned_phrases


def test_banned_phrase_in_one_chunk() -> None:
    check = banned_phrases(["internal use only"])
    assert check("fine", "fine") is None
    assert check("this is for internal use only.", "this is for internal use only.") == (
        "the response contains a banned phrase ('internal use only')"
    )


def test_banned_phrases_case_insensitive_by_default() -> None:
    check = banned_phrases(["Internal Use Only"])
    for text in ("INTERNAL USE ONLY", "internal use only", "Internal use ONLY"):
        assert check(text, text) == "the response contains a banned phrase ('internal use only')"
    # casefold, not just lower: ß matches ss
    assert banned_phrases(["straße"])("STRASSE", "STRASSE") == "the response contains a banned phrase ('strasse')"


def test_banned_phrases_case_sensitive() -> None:
    check = banned_phrases(["Secret"], case_sensitive=True)
    assert check("a secret", "a secret") is None
    assert check("SECRET", "SECRET") is None
    assert check("a Secret", "a Secret") == "the response contains a banned phrase ('Secret')"


@pytest.mark.parametrize(
    "chunks",
    [
        ["the forb", "idden word"],
        ["the f", "o", "r", "b", "i", "d", "d", "e", "n word"],
        ["the forbidde", "n"],
        ["the ", "FORBIDDEN"],
        ["the fOrB", "iDdEn"],
    ],
)
def test_banned_phrase_across_chunk_boundaries(chunks: list[str]) -> None:
    assert first_failure(banned_phrases(["forbidden"]), chunks) == (
        len(chunks) - 1,  # the last chunk completes the phrase
        "the response contains a banned phrase ('forbidden')",
    )


def test_banned_phrase_fails_on_the_chunk_that_completes_it() -> None:
    chunks = ["safe ", "text ", "then forb", "idd", "en", " and more"]
    assert first_failure(banned_phrases(["forbidden"]), chunks) == (
        4,
        "the response contains a banned phrase ('forbidden')",
    )


def test_banned_phrases_several() -> None:
    check = banned_phrases(["alpha", "beta gamma"])
    assert first_failure(check, ["x beta ", "gam", "ma"]) == (2, "the response contains a banned phrase ('beta gamma')")
    assert first_failure(check, ["ALP", "HA"]) == (1, "the response contains a banned phrase ('alpha')")
    assert first_failure(check, ["alp", "hbet", " gam", "ut", " beta", " gamm"]) is None


def test_banned_phrases_checks_only_the_tail_window() -> None:
    # Only the new chunk and the (longest phrase - 1) characters before it can hold a new match:
    # an earlier match, already reported, is not looked at again.
    check = banned_phrases(["forbidden"])  # 9 characters: the window is the new chunk plus 8 before it
    assert check("forbidden fruit and more text", " text") is None
    assert check("forbiddenx", "x") is None  # ends one character before the window
    assert check("xforbidden", "n") == "the response contains a banned phrase ('forbidden')"
    assert check("forbidden", "forbidden") == "the response contains a banned phrase ('forbidden')"
    # the window is in characters of the text, not bytes
    assert check("🌍🌍forbidde" + "n", "n") is not None
    assert check("forbidden🌍", "🌍") is None


def test_banned_phrases_long_text_many_chunks() -> None:
    check = banned_phrases(["needle in a haystack"])
    chunks = ["hay " * 50] * 20 + ["needle in ", "a hay", "stack"] + ["more"] * 5
    assert first_failure(check, chunks) == (22, "the response contains a banned phrase ('needle in a haystack')")


def test_banned_phrases_empty() -> None:
    assert banned_phrases([])("anything at all", "all") is None
    assert banned_phrases(["", ""])("anything at all", "all") is None
    check = banned_phrases(["", "bad"])
    assert check("so bad", " bad") == "the response contains a banned phrase ('bad')"


@pytest.mark.parametrize("phrases", ["forbidden", 5, None, ["ok", 3], [["nested"]]])
def test_banned_phrases_must_be_a_list_of_strings(phrases: Any) -> None:
    # a lone string must not ban each of its letters
    with pytest.raises(ValueError, match=re.escape(f"'phrases' must be a list of strings, got {phrases!r}")):
        banned_phrases(phrases)


# --------------------------------------------------------------------------------------------
# max_length


def test_max_length() -> None:
    check = max_length(10)
    assert check("0123456789", "789") is None
    assert check("0123456789a", "a") == "the response is longer than 10 characters"
    # characters, not bytes: "héllo 🌍🌍🌍!" is 10 characters (19 bytes), the "?" makes 11
    chunks = ["héllo", " 🌍🌍", "🌍", "!", "?"]
    assert first_failure(check, chunks) == (4, "the response is longer than 10 characters")


def test_max_length_zero() -> None:
    check = max_length(0)
    assert check("", "") is None
    assert check("a", "a") == "the response is longer than 0 characters"


@pytest.mark.parametrize("characters", [-1, 1.5, "10", True, None])
def test_max_length_bad_argument(characters: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"'characters' must be a non-negative integer, got {characters!r}")):
        max_length(characters)


# --------------------------------------------------------------------------------------------
# build_transforms and build_validators


def test_build_transforms_in_order() -> None:
    transforms, problems = built(
        build_transforms,
        [
            {"type": "regex_redact", "pattern": PHONE, "replacement": "[phone]"},
            {"type": "replace", "old": "[phone]", "new": "<number>"},
            {"type": "regex_redact", "pattern": "SECRET", "ignore_case": True},
        ],
    )
    assert problems == []
    assert len(transforms) == 3
    text = "call 555-1234, it is secret"
    for transform in transforms:
        text = transform(text)
    assert text == "call <number>, it is [REDACTED]"


def test_build_validators() -> None:
    validators, problems = built(
        build_validators,
        [
            {"type": "banned_phrases", "phrases": ["Forbidden"], "case_sensitive": True},
            {"type": "max_length", "characters": 5},
        ],
    )
    assert problems == []
    banned, longest = validators
    assert banned("forbidden", "forbidden") is None
    assert banned("Forbidden", "Forbidden") == "the response contains a banned phrase ('Forbidden')"
    assert longest("123456", "6") == "the response is longer than 5 characters"


def test_build_empty_lists() -> None:
    assert built(build_transforms, []) == ((), [])
    assert built(build_validators, []) == ((), [])


@pytest.mark.parametrize("specs", [{"type": "replace"}, "regex_redact", None, 5])
def test_build_transforms_not_a_list(specs: Any) -> None:
    assert built(build_transforms, specs, where="[providers.p].transforms") == (
        (),
        ['[providers.p].transforms must be a list of tables like {type = "regex_redact", ...}'],
    )


def test_build_validators_not_a_list() -> None:
    assert built(build_validators, {"type": "max_length"}, where="[providers.p].validators") == (
        (),
        ['[providers.p].validators must be a list of tables like {type = "banned_phrases", ...}'],
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("regex_redact", "must be a table like {type = \"regex_redact\", ...}, got 'regex_redact'"),
        (["type", "replace"], "must be a table like {type = \"regex_redact\", ...}, got ['type', 'replace']"),
        ({"pattern": "x"}, "has no 'type' (one of: regex_redact, replace, python)"),
        ({"type": 5}, "type must be a string, got 5 (one of: regex_redact, replace, python)"),
    ],
)
def test_build_entry_without_a_type(spec: Any, expected: str) -> None:
    assert built(build_transforms, [spec], where="[providers.p].transforms") == (
        (),
        [f"[providers.p].transforms[0] {expected}"],
    )


def test_build_unknown_type() -> None:
    assert built(build_transforms, [{"type": "uppercase"}], where="t") == (
        (),
        ["t[0].type 'uppercase' is unknown (known: regex_redact, replace, python)"],
    )
    # a transform is not a validator, and the other way round
    assert built(build_validators, [{"type": "regex_redact", "pattern": "x"}], where="v") == (
        (),
        ["v[0].type 'regex_redact' is unknown (known: banned_phrases, max_length, python)"],
    )
    assert built(build_transforms, [{"type": "max_length", "characters": 3}], where="t")[1] == [
        "t[0].type 'max_length' is unknown (known: regex_redact, replace, python)"
    ]


@pytest.mark.parametrize(
    ("builder", "spec", "expected"),
    [
        (
            build_transforms,
            {"type": "regex_redact", "pattern": "(unclosed"},
            "w[0] (regex_redact): 'pattern' is not a regular expression: "
            "missing ), unterminated subpattern at position 0",
        ),
        (
            build_transforms,
            {"type": "regex_redact", "pattern": "[a-"},
            "w[0] (regex_redact): 'pattern' is not a regular expression: unterminated character set at position 0",
        ),
        (
            build_transforms,
            {"type": "regex_redact", "pattern": r"(\d)", "replacement": r"\2"},
            "w[0] (regex_redact): 'replacement' cannot replace a match of 'pattern': "
            "invalid group reference 2 at position 1",
        ),
        (
            build_transforms,
            {"type": "regex_redact"},
            "w[0] (regex_redact): missing argument 'pattern'",
        ),
        (
            build_transforms,
            {"type": "regex_redact", "patern": "x"},
            "w[0] (regex_redact): missing argument 'pattern'; "
            "unknown argument 'patern' (takes 'pattern', 'replacement', 'ignore_case')",
        ),
        (
            build_transforms,
            {"type": "replace", "old": "", "new": "x"},
            "w[0] (replace): 'old' must be a non-empty string and 'new' a string, got '' and 'x'",
        ),
        (
            build_validators,
            {"type": "banned_phrases", "phrases": "damn"},
            "w[0] (banned_phrases): 'phrases' must be a list of strings, got 'damn'",
        ),
        (
            build_validators,
            {"type": "max_length", "characters": "100"},
            "w[0] (max_length): 'characters' must be a non-negative integer, got '100'",
        ),
        (
            build_validators,
            {"type": "max_length"},
            "w[0] (max_length): missing argument 'characters'",
        ),
    ],
)
def test_build_bad_options(builder: Any, spec: dict[str, Any], expected: str) -> None:
    assert built(builder, [spec], where="w") == ((), [expected])


def test_build_reports_every_problem_and_keeps_the_good_entries() -> None:
    transforms, problems = built(
        build_transforms,
        [
            {"type": "replace", "old": "a", "new": "b"},
            {"type": "regex_redact", "pattern": "("},
            {"type": "nope"},
            "x",
            {"type": "replace", "old": "b", "new": "c"},
        ],
        where="[providers.p].transforms",
    )
    assert problems == [
        "[providers.p].transforms[1] (regex_redact): 'pattern' is not a regular expression: "
        "missing ), unterminated subpattern at position 0",
        "[providers.p].transforms[2].type 'nope' is unknown (known: regex_redact, replace, python)",
        "[providers.p].transforms[3] must be a table like {type = \"regex_redact\", ...}, got 'x'",
    ]
    assert [t("a") for t in transforms] == ["b", "a"]


# --------------------------------------------------------------------------------------------
# the python hook: errors (loading a module of one's own is in tests/test_config.py)


def test_python_hook_plain_function() -> None:
    # any importable callable will do: string.capwords is a ready-made transform
    (transform,), problems = built(build_transforms, [{"type": "python", "function": "string:capwords"}])
    assert problems == []
    assert transform("hello wide world") == "Hello Wide World"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "w[0] (python): 'function' must be 'package.module:name'"),
        ({"function": "string.capwords"}, "w[0] (python): 'function' must be 'package.module:name'"),
        ({"function": 5}, "w[0] (python): 'function' must be 'package.module:name'"),
        (
            {"function": "trioproxy_no_such_module:f"},
            "w[0] (python): cannot import 'trioproxy_no_such_module': No module named 'trioproxy_no_such_module'",
        ),
        ({"function": "string:no_such_name"}, "w[0] (python): module 'string' has no 'no_such_name'"),
        ({"function": "string:ascii_letters"}, "w[0] (python): string:ascii_letters is not callable"),
        ({"function": "string:capwords", "args": ["x"]}, "w[0] (python): 'args' must be a table"),
        (
            {"function": "string:capwords", "arg": {}},
            "w[0] (python): unknown keys ['arg'] (a python hook takes 'function' and 'args')",
        ),
        (
            # with args, the function is a factory called once: capwords(sep=...) lacks its text
            {"function": "string:capwords", "args": {"sep": "-"}},
            "w[0] (python): 'args' for string:capwords: missing argument 's'",
        ),
    ],
)
def test_python_hook_problems(options: dict[str, Any], expected: str) -> None:
    assert built(build_validators, [{"type": "python", **options}], where="w") == ((), [expected])
