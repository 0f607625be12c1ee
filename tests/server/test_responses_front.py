"""
Tests of the Responses front's renderer: session items in, Responses events out, no sockets.

Chat Completions streams come through the real `OpenAIStreamParser` from SSE bytes, as they
do in the proxy; the order and fields checked are those of the recorded OpenAI streams in
`responses_protocol.md` §2.5-§2.7.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from trioproxy._events import Delta, ToolCallDelta, Usage
from trioproxy._exceptions import UpstreamProtocolError, UpstreamStatusError
from trioproxy._sse import SSEDecoder
from trioproxy.providers.openai import OpenAIStreamParser
from trioproxy.providers.responses import ResponsesStreamParser
from trioproxy.server._responses_front import KEEP_ALIVE, ResponsesEventRenderer, response_from_events

MODEL = "up/gpt-test"
REQUEST = {"model": MODEL, "input": "Hi", "instructions": "Be brief.", "metadata": {"ticket": "42"}}


def events(stream: bytes) -> list[dict[str, Any]]:
    """The data of every event, checking that each names its own `type` and numbers follow on."""
    out = []
    for number, event in enumerate(SSEDecoder().feed(stream)):
        data = orjson.loads(event.data)
        assert data["type"] == event.event
        assert data["sequence_number"] == number
        out.append(data)
    return out


def kinds(stream: bytes) -> list[str]:
    return [event["type"] for event in events(stream)]


def renderer(**request: Any) -> ResponsesEventRenderer:
    return ResponsesEventRenderer(request={**REQUEST, **request}, model=MODEL, prompt_chars=40)


def chat_stream(*chunks: dict[str, Any]) -> list[Delta]:
    """Chat Completions chunks (only their `choices[0]`/usage parts given) through the real parser."""
    wire = b"".join(
        b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", **chunk}) + b"\n\n" for chunk in chunks
    )
    parser = OpenAIStreamParser(keep_raw=False)
    return [delta for event in SSEDecoder().feed(wire + b"data: [DONE]\n\n") for delta in parser.feed(event)]


def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def render_all(r: ResponsesEventRenderer, deltas: list[Delta]) -> bytes:
    return b"".join(r.delta(d) for d in deltas) + r.done()


TEXT = chat_stream(
    choice({"role": "assistant", "content": ""}),
    choice({"content": "Hel"}),
    choice({"content": "lo"}),
    choice({}, "stop"),
    {
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}},
    },
)


def test_a_text_answer_in_the_api_s_order() -> None:
    assert kinds(render_all(renderer(), TEXT)) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_a_text_answer_s_events_carry_stable_ids_and_the_whole_response() -> None:
    r = renderer()
    out = events(render_all(r, TEXT))
    created, added, part_added, delta = out[0]["response"], out[2], out[3], out[4]
    assert created["id"] == r.id
    assert r.id.startswith("resp_")
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    assert (created["instructions"], created["metadata"], created["model"]) == ("Be brief.", {"ticket": "42"}, MODEL)
    item_id = added["item"]["id"]
    assert item_id.startswith("msg_")
    assert added["item"] == {
        "id": item_id,
        "type": "message",
        "status": "in_progress",
        "content": [],
        "role": "assistant",
    }
    assert part_added["part"] == {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    assert (delta["item_id"], delta["output_index"], delta["content_index"], delta["delta"]) == (item_id, 0, 0, "Hel")
    assert out[6]["text"] == "Hello"
    done_item = out[8]["item"]
    assert done_item["status"] == "completed"
    assert done_item["content"] == [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello"}]
    completed = out[9]["response"]
    assert (completed["id"], completed["status"], completed["output"]) == (r.id, "completed", [done_item])
    assert completed["usage"] == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 14,
    }
    assert isinstance(completed["completed_at"], int)


def test_reasoning_then_text_then_two_tool_calls_are_four_items_in_order() -> None:
    deltas = chat_stream(
        choice({"role": "assistant", "reasoning_content": "Think"}),
        choice({"reasoning_content": "ing."}),
        choice({"content": "Checking."}),
        choice({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "w", "arguments": '{"c'}}]}),
        choice({"tool_calls": [{"index": 0, "function": {"arguments": '":"A"}'}}]}),
        choice({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "w", "arguments": "{}"}}]}),
        choice({}, "tool_calls"),
    )
    out = events(render_all(renderer(), deltas))
    added = [e["item"] for e in out if e["type"] == "response.output_item.added"]
    assert [(i["type"], i["id"][:3]) for i in added] == [
        ("reasoning", "rs_"),
        ("message", "msg"),
        ("function_call", "fc_"),
        ("function_call", "fc_"),
    ]
    assert [e["output_index"] for e in out if e["type"] == "response.output_item.added"] == [0, 1, 2, 3]
    summary = [e["delta"] for e in out if e["type"] == "response.reasoning_summary_text.delta"]
    assert summary == ["Think", "ing."]
    arguments = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert [a["arguments"] for a in arguments] == ['{"c":"A"}', "{}"]
    completed = out[-1]["response"]
    assert completed["status"] == "completed"
    assert completed["output"][0]["summary"] == [{"type": "summary_text", "text": "Thinking."}]
    calls = completed["output"][2:]
    assert [(c["call_id"], c["name"], c["arguments"], c["status"]) for c in calls] == [
        ("call_1", "w", '{"c":"A"}', "completed"),
        ("call_2", "w", "{}", "completed"),
    ]
    # every item added is done, before the next one is added
    opened = [e["type"] for e in out if e["type"].startswith("response.output_item")]
    assert opened == ["response.output_item.added", "response.output_item.done"] * 4


@pytest.mark.parametrize(
    ("finish_reason", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_truncated_answer_ends_incomplete(finish_reason: str, reason: str) -> None:
    deltas = chat_stream(choice({"role": "assistant", "content": "Hel"}), choice({}, finish_reason))
    out = events(render_all(renderer(), deltas))
    assert out[-1]["type"] == "response.incomplete"
    assert out[-1]["response"]["status"] == "incomplete"
    assert out[-1]["response"]["incomplete_details"] == {"reason": reason}
    assert "response.completed" not in kinds(render_all(renderer(), deltas))


def test_nothing_is_sent_before_the_first_token_and_a_failover_shows_one_response() -> None:
    r = renderer()
    assert r.opened() == b""
    assert r.delta(Delta(role="assistant")) == b""
    assert r.heartbeat() == KEEP_ALIVE
    assert r.delta(Delta(role="assistant")) == b""  # the next attempt's role chunk
    out = r.delta(Delta(text="Hi")) + r.done()
    assert kinds(out).count("response.created") == 1
    assert SSEDecoder().feed(KEEP_ALIVE) == []  # a comment: no event for any SSE client


def test_a_failure_after_the_first_token_is_an_error_then_response_failed() -> None:
    r = renderer()
    failure = UpstreamStatusError("upstream overloaded", status=529, type="overloaded_error").after_delivery(
        3, content_delivered=True
    )
    out = events(r.delta(Delta(text="Hel")) + r.error(failure))
    assert [e["type"] for e in out][-2:] == ["error", "response.failed"]
    error = out[-2]["error"]
    assert error["message"] == "upstream overloaded (after 3 characters were delivered; they are not repeated)"
    assert error["code"] == "overloaded_error"
    failed = out[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "overloaded_error", "message": error["message"]}
    assert [(i["type"], i["status"], i["content"][0]["text"]) for i in failed["output"]] == [
        ("message", "incomplete", "Hel")
    ]


def test_a_failure_before_any_event_still_starts_with_response_created() -> None:
    out = kinds(renderer().error(UpstreamStatusError("boom", status=502, type="upstream_error")))
    assert out == ["response.created", "response.in_progress", "error", "response.failed"]


def test_an_empty_answer_completes_with_no_output() -> None:
    out = events(renderer().done())
    assert [e["type"] for e in out] == ["response.created", "response.in_progress", "response.completed"]
    assert out[-1]["response"]["output"] == []


def test_usage_is_estimated_when_the_upstream_reports_none() -> None:
    out = events(render_all(renderer(), [Delta(text="12345678")]))
    assert out[-1]["response"]["usage"]["input_tokens"] == 10
    assert out[-1]["response"]["usage"]["output_tokens"] == 2


def test_a_tool_call_fragment_after_another_started_is_an_upstream_protocol_error() -> None:
    r = renderer()
    r.delta(Delta(tool_calls=(ToolCallDelta(index=0, id="a", name="f"),)))
    r.delta(Delta(tool_calls=(ToolCallDelta(index=1, id="b", name="f"),)))
    with pytest.raises(UpstreamProtocolError):
        r.delta(Delta(tool_calls=(ToolCallDelta(index=0, arguments="{}"),)))


def test_the_non_stream_response_is_the_one_the_stream_ends_with() -> None:
    r = renderer()
    stream = render_all(r, [Delta(text="Hi"), Delta(finish_reason="stop", usage=Usage(3, 1))])
    response = response_from_events(stream)
    assert response == events(stream)[-1]["response"]
    assert (response["status"], response["output"][0]["content"][0]["text"]) == ("completed", "Hi")
    with pytest.raises(UpstreamProtocolError):
        response_from_events(stream.split(b"event: response.completed")[0])


def upstream_deltas(wire: bytes) -> list[Delta]:
    parser = ResponsesStreamParser(keep_raw=True)
    return [delta for event in SSEDecoder().feed(wire) for delta in parser.feed(event)]


RECORDED = (Path(__file__).parent.parent / "fixtures" / "responses" / "text_stream.sse").read_bytes()


def test_a_responses_upstream_s_events_are_forwarded_and_a_failover_shows_one_opening() -> None:
    r = ResponsesEventRenderer(request=REQUEST, model=MODEL)
    deltas = upstream_deltas(RECORDED)
    first_attempt = b"".join(r.delta(d) for d in deltas[:2])  # created, in_progress; then the attempt fails
    assert first_attempt == b""
    r.notice(object())
    out = b"".join(r.delta(d) for d in deltas)
    assert out + r.done() == RECORDED
    assert r.id == "resp_sanitized_streaming"


def test_a_failure_after_a_responses_upstream_s_events_continues_its_numbering() -> None:
    r = ResponsesEventRenderer(request=REQUEST, model=MODEL)
    out = b"".join(r.delta(d) for d in upstream_deltas(RECORDED)[:5])  # up to the first delta
    out += r.error(UpstreamStatusError("cut", status=502, type="upstream_error"))
    assert [e["type"] for e in events(out)][-2:] == ["error", "response.failed"]
    assert events(out)[-1]["response"]["id"] == "resp_sanitized_streaming"


def test_a_failure_after_the_upstream_s_held_terminal_event_continues_the_numbering_without_a_gap() -> None:
    """The upstream's `response.completed` waits for done: a failure instead (a validator's) takes its number."""
    r = ResponsesEventRenderer(request=REQUEST, model=MODEL)
    out = b"".join(r.delta(d) for d in upstream_deltas(RECORDED))
    out += r.error(UpstreamStatusError("refused at the end", status=502, type="upstream_error"))
    numbers = [e["sequence_number"] for e in events(out)]
    assert numbers == list(range(len(numbers)))
    assert [e["type"] for e in events(out)][-2:] == ["error", "response.failed"]
