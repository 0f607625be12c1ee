"""
Continuation requests and the overlap trim (`trioproxy._continuation`), including a property
test: wherever a stream is cut, however the continuation is split into tokens, and whatever
whitespace the prefill had to leave out, the client's text is the canonical text, once.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from trioproxy._continuation import Overlap, continuation, ends_with_assistant
from trioproxy._request import NativeRequest, parse_chat_request

CHAT = parse_chat_request({"model": "p/m", "messages": [{"role": "user", "content": "hi"}], "stream": True})


def test_a_prefill_leaves_out_the_trailing_whitespace_and_trims_it_from_the_answer() -> None:
    continued = continuation(CHAT, "Hello, \n", "prefill")
    assert continued.chat.messages[-1] == {"role": "assistant", "content": "Hello,"}
    assert continued.chat.body["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    assert "continue_final_message" not in continued.chat.body
    assert continued.overlap == " \n"
    assert CHAT.messages == [{"role": "user", "content": "hi"}]  # the client's request is left as it was


def test_continue_final_message_keeps_the_text_whole_and_leaves_the_message_open() -> None:
    continued = continuation(CHAT, "Hello, ", "continue_final_message")
    body = continued.chat.body
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello, "}
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert continued.overlap == ""


def test_an_anthropic_clients_own_body_is_continued_too() -> None:
    native = NativeRequest(
        "anthropic", {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    )
    continued = continuation(replace(CHAT, native=native), "Once upon", "prefill")
    assert continued.chat.native is not None
    assert continued.chat.native.body["messages"][-1] == {"role": "assistant", "content": "Once upon"}
    assert native.body["messages"] == [{"role": "user", "content": "hi"}]


def test_a_request_that_ends_with_its_own_assistant_turn_is_not_continued() -> None:
    assert not ends_with_assistant(CHAT)
    assert ends_with_assistant(continuation(CHAT, "x", "prefill").chat)


def test_overlap_drops_what_was_delivered_once_and_keeps_what_differs() -> None:
    overlap = Overlap(" \n")
    assert [overlap.trim(t) for t in (" ", "\nNext", " more")] == ["", "Next", " more"]
    overlap = Overlap("  ")
    assert overlap.trim("word") == "word"  # the model wrote no whitespace: the delivered one stays
    assert Overlap("").trim(" as is") == " as is"


canonical_texts = st.text(alphabet=st.sampled_from(list("ab \n\t.é🌍")), min_size=1, max_size=60)


@given(canonical=canonical_texts, data=st.data())
def test_random_cuts_and_overlaps_never_duplicate_or_drop_a_character(canonical: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=1, max_value=len(canonical)), label="cut")
    way = data.draw(st.sampled_from(["prefill", "continue_final_message"]), label="way")
    delivered = canonical[:cut]
    continued = continuation(CHAT, delivered, way)
    prefix = continued.chat.messages[-1]["content"]
    assert delivered.startswith(prefix)
    assert delivered == prefix + continued.overlap

    # The model continues its prefix with the rest of the canonical text, split anyhow.
    rest = canonical[len(prefix) :]
    splits = sorted(data.draw(st.sets(st.integers(min_value=0, max_value=len(rest))), label="splits"))
    bounds = [0, *splits, len(rest)]
    tokens = [rest[a:b] for a, b in itertools.pairwise(bounds)]

    overlap = Overlap(continued.overlap)
    assert delivered + "".join(overlap.trim(token) for token in tokens) == canonical
