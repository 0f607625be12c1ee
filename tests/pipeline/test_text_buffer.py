"""
Tests of the buffer's rules without its clock (`TextBuffer`): which text is ready to send as
a chunk after each token, and what `flush` gives back.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest

from trioproxy._policy import BufferConfig
from trioproxy.pipeline._text_buffer import TextBuffer


def run(config: BufferConfig, tokens: list[str]) -> list[list[str]]:
    """The chunks after each token, then what `flush` gives."""
    buffer = TextBuffer(config)
    out = [buffer.push(token) for token in tokens]
    out.append(buffer.flush())
    assert buffer.pending == 0
    return out


TOKENS = ["Hel", "lo", " wor", "ld", ".", " How", " are", " you", "?"]


# --------------------------------------------------------------------------------------------
# passthrough


@pytest.mark.parametrize(
    "config",
    [
        BufferConfig(),
        BufferConfig(flush_interval_ms=50),  # enabled, but only the timer: the rules keep nothing back
        BufferConfig(min_chunk_size=1),
        BufferConfig(max_chunk_size=1000),
    ],
)
def test_passthrough(config: BufferConfig) -> None:
    assert run(config, TOKENS) == [[t] for t in TOKENS] + [[]]


def test_empty_token_gives_no_chunk() -> None:
    buffer = TextBuffer(BufferConfig())
    assert buffer.push("") == []
    assert buffer.flush() == []
    word = TextBuffer(BufferConfig(buffer_by_word=True))
    assert word.push("") == []
    assert word.flush() == []


# --------------------------------------------------------------------------------------------
# size mode


def test_min_chunk_size() -> None:
    assert run(BufferConfig(min_chunk_size=5), ["ab", "cd", "ef", "g"]) == [[], [], ["abcdef"], [], ["g"]]


def test_min_chunk_size_exactly_reached() -> None:
    assert run(BufferConfig(min_chunk_size=4), ["ab", "cd", "efgh", "i"]) == [[], ["abcd"], ["efgh"], [], ["i"]]


def test_pending_counts_characters_held_back() -> None:
    buffer = TextBuffer(BufferConfig(min_chunk_size=10))
    assert buffer.pending == 0
    buffer.push("héllo")
    assert buffer.pending == 5
    buffer.push("🌍")
    assert buffer.pending == 6
    assert buffer.flush() == ["héllo🌍"]
    assert buffer.pending == 0
    assert buffer.flush() == []


# --------------------------------------------------------------------------------------------
# word mode


def test_word_mode_cuts_before_whitespace() -> None:
    assert run(BufferConfig(buffer_by_word=True), ["Hel", "lo", " wor", "ld", " again"]) == [
        [],
        [],
        ["Hello"],
        [],
        [" world"],
        [" again"],
    ]


def test_word_mode_several_words_in_one_token() -> None:
    assert run(BufferConfig(buffer_by_word=True), ["one two three", " four"]) == [["one two"], [" three"], [" four"]]


def test_word_mode_newlines_and_tabs_are_whitespace() -> None:
    assert run(BufferConfig(buffer_by_word=True), ["a\nb", "\tc", "d"]) == [["a"], ["\nb"], [], ["\tcd"]]


def test_word_mode_leading_whitespace_alone_is_no_word() -> None:
    # a cut at index 0 would give an empty chunk
    assert run(BufferConfig(buffer_by_word=True), [" ", "x", " "]) == [[], [], [" x"], [" "]]


def test_word_mode_with_min_chunk_size() -> None:
    # whole words are ready after "a b", "a b c", "a b c dd": only the last has 6 characters
    assert run(BufferConfig(buffer_by_word=True, min_chunk_size=6), ["a b", " c", " dd", " e"]) == [
        [],
        [],
        [],
        ["a b c dd"],
        [" e"],
    ]


# --------------------------------------------------------------------------------------------
# sentence mode


def test_sentence_mode_full_stop_then_space() -> None:
    assert run(BufferConfig(buffer_by_sentence=True), ["Hi", ".", " How", " are", " you?", " Fine", "!\n", "Ok"]) == [
        [],
        [],
        ["Hi."],
        [],
        [],
        [" How are you?"],
        [" Fine!\n"],
        [],
        ["Ok"],
    ]


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["Stop", "!", " Now"], [[], [], ["Stop!"], [" Now"]]),
        (["Why", "?", " Because"], [[], [], ["Why?"], [" Because"]]),
        (["Wait", "...", " ok"], [[], [], ["Wait..."], [" ok"]]),
        (["Really?!", " Yes"], [[], ["Really?!"], [" Yes"]]),
        (["Wait…", " ok"], [[], ["Wait…"], [" ok"]]),
        # a newline ends a sentence by itself, and stays with it
        (["a list:\n", "- one\n- two"], [["a list:\n"], ["- one\n"], ["- two"]]),
        # closing quotes and brackets stay with their sentence
        (['She said "go."', " Then"], [[], ['She said "go."'], [" Then"]]),
        (["He said “Stop!”", " Then ‘ok.’", " x"], [[], ["He said “Stop!”"], [" Then ‘ok.’"], [" x"]]),
        (["(see above.)", " Next"], [[], ["(see above.)"], [" Next"]]),
        (["It's 'done.'", " Next"], [[], ["It's 'done.'"], [" Next"]]),
        # punctuation not followed by whitespace ends nothing
        (["Pi is 3.14", " today", ". Yes"], [[], [], ["Pi is 3.14 today."], [" Yes"]]),
        (["see example.com", " now"], [[], [], ["see example.com now"]]),
    ],
)
def test_sentence_mode(tokens: list[str], expected: list[list[str]]) -> None:
    assert run(BufferConfig(buffer_by_sentence=True), tokens) == expected


def test_sentence_mode_several_sentences_in_one_token_go_together() -> None:
    assert run(BufferConfig(buffer_by_sentence=True), ["One. Two. Thr", "ee."]) == [["One. Two."], [], [" Three."]]


def test_sentence_mode_wins_over_word_mode() -> None:
    config = BufferConfig(buffer_by_sentence=True, buffer_by_word=True)
    assert run(config, ["One two", " three.", " Four"]) == [[], [], ["One two three."], [" Four"]]


# --------------------------------------------------------------------------------------------
# max_chunk_size


def test_max_chunk_size_splits_between_characters() -> None:
    assert run(BufferConfig(max_chunk_size=3), ["abcdefgh", "ij"]) == [["abc", "def", "gh"], ["ij"], []]


def test_max_chunk_size_in_word_mode_splits_between_words() -> None:
    assert run(BufferConfig(buffer_by_word=True, max_chunk_size=10), ["The quick brown fox jumps"]) == [
        ["The quick", " brown fox"],
        [" jumps"],
    ]


def test_max_chunk_size_hard_splits_a_word_longer_than_the_max() -> None:
    assert run(BufferConfig(buffer_by_word=True, max_chunk_size=4), ["abcdefghij", " k"]) == [
        ["abcd", "efgh"],
        ["ij"],
        [" k"],
    ]


def test_max_chunk_size_word_split_at_the_limit() -> None:
    # A whitespace right after `max` characters is a cut point: "abcd" goes whole. A chunk
    # carries its word's leading space, so " efgh" (5) no longer fits in 4 and is hard-split.
    assert run(BufferConfig(buffer_by_word=True, max_chunk_size=4), ["abcd efgh ij", " "]) == [
        ["abcd", " efg", "h"],
        [" ij"],
        [" "],
    ]


def test_max_chunk_size_never_holds_more_than_max() -> None:
    buffer = TextBuffer(BufferConfig(buffer_by_sentence=True, max_chunk_size=10))
    assert buffer.push("One two three four five") == ["One two th", "ree four f"]
    assert buffer.pending == 3
    assert buffer.push(". Six") == ["ive."]
    assert buffer.flush() == [" Six"]


def test_min_chunk_size_never_holds_more_than_max() -> None:
    # not a config parse_policy accepts, but the buffer still keeps its promise
    buffer = TextBuffer(BufferConfig(min_chunk_size=20, max_chunk_size=8))
    assert buffer.push("abcdefghijkl") == ["abcdefgh"]
    assert buffer.pending == 4


def test_flush_splits_at_max() -> None:
    buffer = TextBuffer(BufferConfig(min_chunk_size=10, max_chunk_size=10))
    assert buffer.push("abcdefg") == []
    assert buffer.flush() == ["abcdefg"]
    word = TextBuffer(BufferConfig(buffer_by_word=True, max_chunk_size=6))
    assert word.push("aaaa") == []
    assert word.push("bb") == []
    assert word.pending == 6
    assert word.push("c") == ["aaaabb"]
    assert word.flush() == ["c"]


# --------------------------------------------------------------------------------------------
# flush


def test_flush_returns_what_is_pending() -> None:
    buffer = TextBuffer(BufferConfig(buffer_by_sentence=True))
    assert buffer.push("No full stop yet") == []
    assert buffer.pending == 16
    assert buffer.flush() == ["No full stop yet"]
    assert buffer.pending == 0
    assert buffer.flush() == []
    # the buffer goes on after a flush
    assert buffer.push("Next. One") == ["Next."]
    assert buffer.flush() == [" One"]


# --------------------------------------------------------------------------------------------
# multi-byte text is never broken, whatever the tokens


TEXT = (
    "Héllo wörld! Ça va? 🌍 is a globe, 👍🏽 a thumb.\n"
    "日本語のテキスト。中文句子！ 한국어 문장? «Très» “bien.” "
    "Zażółć gęślą jaźń... naïve café — 🚀🚀🚀 ok.\t\nEnd"
)

CONFIGS = [
    BufferConfig(),
    BufferConfig(min_chunk_size=7),
    BufferConfig(max_chunk_size=1),
    BufferConfig(max_chunk_size=5),
    BufferConfig(min_chunk_size=3, max_chunk_size=5),
    BufferConfig(buffer_by_word=True),
    BufferConfig(buffer_by_word=True, max_chunk_size=4),
    BufferConfig(buffer_by_word=True, min_chunk_size=10, max_chunk_size=12),
    BufferConfig(buffer_by_sentence=True),
    BufferConfig(buffer_by_sentence=True, max_chunk_size=6),
    BufferConfig(buffer_by_sentence=True, min_chunk_size=20, max_chunk_size=25),
]


def random_tokens(rng: random.Random, text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5, 8, 13])
        tokens.append(text[i : i + n])
        i += n
    return tokens


def assert_ends_at_a_boundary(config: BufferConfig, chunk: str, after: str) -> None:
    """
    A word or sentence chunk (with no size cap) ends where whitespace follows, with a newline,
    or (sentences) with a CJK full stop, which needs no space after it.
    """
    if not (config.buffer_by_word or config.buffer_by_sentence) or config.max_chunk_size:
        return
    cjk_stop = config.buffer_by_sentence and chunk.rstrip("」』”’)]")[-1:] in ("。", "！", "？")
    assert chunk.endswith("\n") or after[:1].isspace() or cjk_stop, (chunk, after[:20])


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_any_token_split_gives_back_the_text(config: BufferConfig) -> None:
    rng = random.Random(20240611)
    texts = [TEXT, "é" * 40, "🌍" * 40, "日本語" * 20, "a é 🌍 日 " * 10]
    for _ in range(200):
        text = rng.choice(texts)
        tokens = random_tokens(rng, text)
        assert "".join(tokens) == text
        buffer = TextBuffer(config)
        chunks: list[str] = []
        pushed = sent = 0
        for token in tokens:
            ready = buffer.push(token)
            pushed += len(token)
            for chunk in ready:
                sent += len(chunk)
                assert_ends_at_a_boundary(config, chunk, text[sent:])
            chunks += ready
            assert text[: len("".join(chunks))] == "".join(chunks)
            assert sent + buffer.pending == pushed
            if config.max_chunk_size:
                assert buffer.pending <= config.max_chunk_size
        chunks += buffer.flush()
        assert "".join(chunks) == text
        assert all(chunks), chunks  # never an empty chunk
        for chunk in chunks:
            assert chunk.encode("utf-8").decode("utf-8") == chunk
            if config.max_chunk_size:
                assert len(chunk) <= config.max_chunk_size
        if config.buffer_by_word and config.max_chunk_size:
            # a word that fits in a chunk with its leading space is never split
            cuts = set(itertools.accumulate(len(c) for c in chunks))
            for word in re.finditer(r"\S+", text):
                if len(word.group()) < config.max_chunk_size:
                    assert not cuts & set(range(word.start() + 1, word.end())), (word, chunks)


def test_emoji_and_cjk_are_whole_characters() -> None:
    assert run(BufferConfig(max_chunk_size=1), ["🌍é日"]) == [["🌍", "é", "日"], []]
    assert run(BufferConfig(max_chunk_size=2), ["🌍🌍🌍"]) == [["🌍🌍", "🌍"], []]
    # CJK has no spaces between words: a long run is hard-split between characters
    assert run(BufferConfig(buffer_by_word=True, max_chunk_size=3), ["日本語の", " テキスト"]) == [
        ["日本語"],
        ["の", " テキ"],
        ["スト"],
    ]


def test_cjk_full_stops_end_a_sentence_without_a_space() -> None:
    buffer = TextBuffer(BufferConfig(buffer_by_sentence=True))
    assert buffer.push("日本語の") == []
    assert buffer.push("テキスト。次の") == ["日本語のテキスト。"]
    assert buffer.push("文！」そして") == ["次の文！」"]
    assert buffer.flush() == ["そして"]
