"""
`POST /v1/responses` end to end: the official openai SDK → trioproxy (hypercorn on
127.0.0.1:0) → a real scripted upstream speaking Chat Completions (`up`) or Anthropic
(`claude`), both translated, or the simulated one (`sim`).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import coredis
import httpx
import openai
import orjson
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    Instant,
    RedisServer,
    anthropic_sdk,
    chat_text,
    collect_into,
    hang_up_once_asked,
    interleaved_tool_calls,
    openai_sdk,
    openai_upstream_config,
    proxy_config,
    serve_proxy,
    stream_outcomes,
    upstream_closed_soon_after,
    wait_until,
    wait_until_idle,
)
from trioproxy import parse_config
from trioproxy._sse import SSEDecoder
from trioproxy.server._responses_front import TERMINAL_EVENTS, response_from_events
from trioproxy.testing import FakeUpstream, Reply, ToolCall, open_fake_upstream

TOKENS = ("Hel", "lo", ",", " wörld", " 🌍", "!")
MODELS = pytest.mark.parametrize("model", ["up/gpt-test", "claude/claude-test"])
#: The event types of a streamed answer of `TOKENS`, in the API's order.
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len(TOKENS),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# --- text ---------------------------------------------------------------------------------


@MODELS
async def test_a_streamed_answer_through_the_stream_helper(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(11, 6)))
    async with client.responses.stream(model=model, input="Say hello", instructions="Be brief.") as stream:
        pieces = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        response = await stream.get_final_response()
    assert pieces == list(TOKENS)
    assert response.output_text == "".join(TOKENS)
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (11, 6)


@MODELS
async def test_a_streamed_answer_s_events_are_in_the_api_s_order(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, model: str
) -> None:
    upstream.push(Reply(tokens=TOKENS))
    stream = await client.responses.create(model=model, input="Say hello", stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events] == TEXT_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))


@MODELS
async def test_a_non_streamed_answer(client: openai.AsyncOpenAI, upstream: FakeUpstream, model: str) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(9, 6)))
    response = await client.responses.create(model=model, input="Say hello", metadata={"ticket": "42"})
    assert response.output_text == "".join(TOKENS)
    assert (response.status, response.metadata) == ("completed", {"ticket": "42"})
    assert response.usage is not None
    assert response.usage.total_tokens == 15


async def test_the_chat_completions_upstream_gets_the_translated_request(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS))
    await client.responses.create(
        model="up/gpt-test",
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        max_output_tokens=64,
        store=False,
        include=["reasoning.encrypted_content"],
    )
    body = upstream.requests[-1].json
    assert upstream.requests[-1].path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (body["model"], body["max_tokens"], body["stream"]) == ("gpt-test", 64, True)
    assert "store" not in body
    assert "include" not in body


async def test_the_simulated_upstream(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    async with client.responses.stream(model="sim/echo", input="one two three") as stream:
        response = await stream.get_final_response()
    assert response.output_text == "one two three"
    assert list(upstream.requests) == []


async def test_the_sync_client(proxy_url: str, upstream: FakeUpstream) -> None:
    """The sync SDK, in a thread: the proxy runs in this test's trio loop."""
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))

    def use_the_sync_sdk() -> tuple[str, str]:
        with openai.OpenAI(base_url=proxy_url + "/v1", api_key="k", max_retries=0) as sdk:
            created = sdk.responses.create(model="up/m", input="hi")
            with sdk.responses.stream(model="claude/c", input="hi") as stream:
                streamed = stream.get_final_response().output_text
        return created.output_text, streamed

    assert await trio.to_thread.run_sync(use_the_sync_sdk) == ("".join(TOKENS), "".join(TOKENS))


# --- function calling -----------------------------------------------------------------------


@MODELS
async def test_function_calling_across_two_turns(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, model: str
) -> None:
    calls = (ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),)
    upstream.push(Reply(tokens=("Let me check.",), tool_calls=calls), Reply(tokens=("Sunny", " in Paris.")))
    async with client.responses.stream(model=model, input="Weather in Paris?", tools=[WEATHER]) as stream:
        argument_deltas = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
        first = await stream.get_final_response()
    assert "".join(argument_deltas) == '{"city": "Paris"}'
    assert [item.type for item in first.output] == ["message", "function_call"]
    call = first.output[1]
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments, call.status) == (
        "call_1",
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )

    second = await client.responses.create(
        model=model,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"},
        ],
    )
    assert second.output_text == "Sunny in Paris."
    body = upstream.requests[-1].json
    if model.startswith("up/"):
        assert body["messages"][1]["tool_calls"] == [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]
        assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}
    else:
        assert body["messages"][1]["content"][-1]["type"] == "tool_use"
        assert body["messages"][2]["content"][0] == {
            "type": "tool_result",
            "tool_use_id": "call_1",
            "content": "18C, sunny",
        }


# --- errors ---------------------------------------------------------------------------------


@MODELS
async def test_a_field_the_upstream_cannot_carry_is_a_400_naming_it(client: openai.AsyncOpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=model, input="hi", tools=[{"type": "local_shell"}])
    assert info.value.param == "tools[0].type"
    assert "Responses upstreams only" in info.value.message


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_field_another_upstream_has_no_equivalent_for_is_dropped_by_a_provider_that_names_it(
    nursery: trio.Nursery, upstream: FakeUpstream, kind: str
) -> None:
    base_url = upstream.url + "/v1" if kind == "openai" else upstream.url
    lenient = {"type": kind, "base_url": base_url, "drop_params": ["top_logprobs"]}
    proxy = await serve_proxy(nursery, proxy_config(upstream, lenient=lenient))
    async with openai_sdk(proxy) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model="up/gpt-test", input="hi", top_logprobs=2)
        assert info.value.param == "top_logprobs"
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.input_tokens.count(model="up/gpt-test", input="hi", extra_body={"top_logprobs": 2})
        assert info.value.param == "top_logprobs"
        assert not upstream.requests

        count = await client.responses.input_tokens.count(model="lenient/m", input="hi", extra_body={"top_logprobs": 2})
        upstream.push(Reply(tokens=("Hel", "lo")))
        response = await client.responses.create(model="lenient/m", input="hi", top_logprobs=2)
    assert count.model_extra == {"estimated": True}
    assert response.output_text == "Hello"
    assert "top_logprobs" not in upstream.requests[-1].json


THINKING_STREAM = Path(__file__).parent.parent / "fixtures" / "anthropic" / "stream_thinking_tools.sse"
THOUGHT = (
    'The user wants the weather in Paris. I have a get_weather tool that takes a city, so I should call it with "Paris"'
    " — no need to guess."
)


async def test_a_schema_and_an_effort_reach_an_anthropic_upstream_and_its_thinking_comes_back_as_reasoning(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(raw_body=THINKING_STREAM.read_bytes()))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    async with client.responses.stream(
        model="claude/claude-test",
        input="Weather in Paris?",
        tools=[WEATHER],
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        reasoning={"effort": "medium", "summary": "auto"},
        max_output_tokens=8000,
    ) as stream:
        summary = [event.delta async for event in stream if event.type == "response.reasoning_summary_text.delta"]
        response = await stream.get_final_response()
    body = upstream.requests[-1].json
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert (body["thinking"], body["max_tokens"]) == ({"type": "enabled", "budget_tokens": 4000}, 8000)
    assert "".join(summary) == THOUGHT
    reasoning, message, call = response.output
    assert reasoning.type == "reasoning"
    assert [part.text for part in reasoning.summary] == [THOUGHT]
    assert (message.type, call.type) == ("message", "function_call")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"reasoning": {"effort": "high"}, "max_output_tokens": 1000}, "reasoning.effort"),
    ],
)
async def test_what_an_anthropic_upstream_cannot_hold_the_answer_to_is_a_400_naming_it(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="claude/claude-test", input="hi", **fields)
    assert info.value.param is not None
    assert info.value.param.startswith(param)
    assert f"'{param}" in info.value.message
    assert not upstream.requests


async def test_an_unknown_model_is_a_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="nowhere/x", input="hi")


async def ask(client: openai.AsyncOpenAI, *, stream: bool) -> None:
    """One response for "hi", streamed through the SDK's helper or not."""
    if stream:
        async with client.responses.stream(model="up/gpt-test", input="hi") as events:
            await events.get_final_response()
    else:
        await client.responses.create(model="up/gpt-test", input="hi")


@pytest.mark.parametrize("stream", [True, False])
async def test_an_upstream_error_before_the_first_token_is_the_sdk_s_typed_error(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, stream: bool
) -> None:
    upstream.push(Reply(status=429, error_message="slow down", headers={"retry-after": "3"}))
    with pytest.raises(openai.RateLimitError) as info:
        await ask(client, stream=stream)
    assert "slow down" in info.value.message
    assert info.value.response.headers["retry-after"] == "3"


async def test_an_error_after_the_first_token_is_an_error_event_then_response_failed(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy_url + "/v1/responses", json={"model": "up/m", "input": "hi", "stream": True})
    assert response.status_code == 200
    events = [orjson.loads(event.data) for event in SSEDecoder().feed(response.content)]
    kinds = [event["type"] for event in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.completed" not in kinds
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert "after 5 characters were delivered" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hello"


async def test_the_sdk_raises_an_error_after_the_first_token(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2))
    with pytest.raises(openai.APIError, match="upstream failure"):
        async with client.responses.stream(model="up/gpt-test", input="hi") as stream:
            await stream.get_final_response()


@pytest.mark.parametrize("store", [False, True])
async def test_a_non_streaming_response_that_fails_midway_claims_no_delivered_text(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, store: bool
) -> None:
    """
    Sent whole or not at all: its client got none of the text. Stored, nobody else did either:
    its id, to watch it by, is in the answer it never got.
    """
    upstream.push(Reply(tokens=TOKENS, error_after=2, error_message="overloaded right now"))
    with pytest.raises(openai.APIStatusError) as info:
        await client.responses.create(model="up/gpt-test", input="hi", store=store)
    assert info.value.status_code == 502
    assert info.value.body["message"] == "overloaded right now"


async def test_a_truncated_answer_is_incomplete(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS, finish_reason="length"))
    response = await client.responses.create(model="up/gpt-test", input="hi", max_output_tokens=6)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


# --- stages and guarantees --------------------------------------------------------------------


@pytest.fixture
async def staged(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    config = proxy_config(
        upstream,
        patient={
            "type": "openai",
            "base_url": upstream.url + "/v1",
            "heartbeat_interval": 0.05,
            "first_token_timeout": 5,
        },
        hasty={"type": "openai", "base_url": upstream.url + "/v1", "first_token_timeout": 0.2},
    )
    return await serve_proxy(nursery, config)


async def test_heartbeats_are_comments_the_sdk_skips(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=0.3))
    async with httpx.AsyncClient() as http:
        response = await http.post(staged + "/v1/responses", json={"model": "patient/m", "input": "hi", "stream": True})
    assert response.content.startswith(b": keep-alive\n\n")
    async with openai_sdk(staged) as sdk:
        upstream.push(Reply(tokens=TOKENS, ttft=0.3))
        async with sdk.responses.stream(model="patient/m", input="hi") as stream:
            assert (await stream.get_final_response()).output_text == "".join(TOKENS)


async def test_a_first_token_timeout_is_a_504(staged: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=5))
    async with openai_sdk(staged) as sdk:
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.responses.create(model="hasty/m", input="hi")
    assert info.value.status_code == 504
    assert "first_token_timeout" in info.value.message


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_the_upstream(proxy_url: str, upstream: FakeUpstream, stream: bool) -> None:
    upstream.push(Reply(tokens=("a",) * 1000, interval=0.01))
    body = {"model": "up/m", "input": "hi", "stream": stream}
    # Streamed, it hangs up mid-stream; a non-streamed answer is read whole, so any time is mid-answer.
    await hang_up_once_asked(proxy_url + "/v1/responses", body, upstream, tokens_sent=3 if stream else 0)


# --- WebSocket mode ---------------------------------------------------------------------------


def ws_url(proxy_url: str) -> str:
    return proxy_url.replace("http://", "ws://", 1) + "/v1/responses"


async def one_response(connection: trio_websocket.WebSocketConnection, **create: Any) -> list[dict[str, Any]]:
    """Send one `response.create` and read its events, up to the terminal one (or an `error` frame alone)."""
    await connection.send_message(orjson.dumps({"type": "response.create", **create}).decode())
    events = []
    with trio.fail_after(5):
        while True:
            event = orjson.loads(await connection.get_message())
            events.append(event)
            if event["type"] in TERMINAL_EVENTS or (event["type"] == "error" and "status" in event):
                return events


async def test_websocket_mode_answers_responses_in_turn_and_continues_from_the_last(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=("Again",)))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        first = await one_response(connection, model="up/m", input="hi", stream=True, store=False)
        assert [e["type"] for e in first] == TEXT_EVENTS
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        response_id = first[-1]["response"]["id"]
        second = await one_response(
            connection, model="up/m", previous_response_id=response_id, input=[{"role": "user", "content": "more"}]
        )
        assert second[-1]["response"]["output"][0]["content"][0]["text"] == "Again"
        assert second[-1]["response"]["id"] != response_id
        unknown = await one_response(connection, model="up/m", previous_response_id="resp_nope", input="x")
    assert [m["role"] for m in upstream.requests[-1].json["messages"]] == ["user", "assistant", "user"]
    assert upstream.requests[-1].json["messages"][1]["content"] == "".join(TOKENS)
    assert unknown == [
        {
            "type": "error",
            "status": 404,
            "status_code": 404,
            "error": {
                "type": "not_found_error",
                "code": "previous_response_not_found",
                "message": "no response 'resp_nope': it was never stored, or it has expired or been deleted",
                "param": "previous_response_id",
            },
        }
    ]


async def test_websocket_mode_refuses_a_bad_frame_and_stays_open(proxy_url: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        await connection.send_message("not json")
        assert orjson.loads(await connection.get_message())["status"] == 400
        refused = await one_response(connection, model="up/m", input="hi", tools=[{"type": "local_shell"}])
        assert (refused[0]["status"], refused[0]["error"]["param"]) == (400, "tools[0].type")
        unknown = await one_response(connection, model="nowhere/m", input="hi")
        assert unknown[0]["status"] == 404
        answered = await one_response(connection, model="up/m", input="hi")
    assert answered[-1]["type"] == "response.completed"


async def test_websocket_mode_failures_before_and_after_the_first_token(proxy_url: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(status=429, error_message="slow down"), Reply(tokens=TOKENS, error_after=2))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        before = await one_response(connection, model="up/m", input="hi")
        after = await one_response(connection, model="up/m", input="hi")
    assert [(e["type"], e["status"], e["error"]["message"]) for e in before] == [("error", 429, "slow down")]
    kinds = [e["type"] for e in after]
    assert kinds[0] == "response.created"
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.completed" not in kinds


async def test_websocket_mode_disconnect_closes_the_upstream(proxy_url: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=("a",) * 1000, interval=0.01))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        await connection.send_message(
            orjson.dumps({"type": "response.create", "model": "up/m", "input": "hi"}).decode()
        )
        with trio.fail_after(5):
            while orjson.loads(await connection.get_message())["type"] != "response.output_text.delta":
                pass
    await upstream_closed_soon_after(upstream.requests[-1], Instant.now())


# --- stored responses -------------------------------------------------------------------------


async def test_previous_response_id_continues_a_stored_response(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("Paris.",)), Reply(tokens=("About 2 million.",)))
    first = await client.responses.create(model="up/gpt-test", instructions="Be brief.", input="Capital of France?")
    second = await client.responses.create(model="up/gpt-test", previous_response_id=first.id, input="Its population?")
    assert second.output_text == "About 2 million."
    assert second.previous_response_id == first.id
    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Its population?"},
    ]  # instructions are not inherited, as in the API
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="up/gpt-test", previous_response_id="resp_gone", input="x")
    assert (info.value.code, info.value.param) == ("previous_response_not_found", "previous_response_id")


async def test_a_stored_response_is_retrieved_and_deleted_and_store_false_keeps_none(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))
    created = await client.responses.create(model="up/gpt-test", input="hi")
    retrieved = await client.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    unstored = await client.responses.create(model="up/gpt-test", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("st_not_a_response")


async def test_a_background_response_is_resumed_after_a_sequence_number_then_followed_live(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("a", "b", "c", "d", "e", "f"), interval=0.05))
    queued = await client.responses.create(model="up/gpt-test", input="hi", background=True)
    assert (queued.status, queued.background) == ("queued", True)
    watching = await client.responses.retrieve(queued.id, stream=True)
    async for event in watching:
        if event.sequence_number == 4:  # the first delta: then the connection drops
            assert event.type == "response.output_text.delta"
            assert event.delta == "a"
            break
    await watching.close()
    stream = await client.responses.retrieve(queued.id, stream=True, starting_after=4)
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(5, 5 + len(events)))
    assert [event.delta for event in events if event.type == "response.output_text.delta"] == ["b", "c", "d", "e", "f"]
    assert events[-1].type == "response.completed"
    assert len(upstream.requests) == 1  # asked once
    again = await client.responses.retrieve(queued.id, stream=True, starting_after=-1)
    replayed = [event async for event in again]
    assert replayed[0].type == "response.created"
    assert replayed[-1].type == "response.completed"
    with pytest.raises(openai.BadRequestError):
        await client.responses.retrieve(queued.id, stream=True, starting_after=999)


async def running_in_background(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> openai.types.responses.Response:
    """A background response whose upstream answer runs on (10 s of tokens), once the upstream has its request."""
    upstream.push(Reply(tokens=("a",) * 1000, interval=0.01))
    queued = await client.responses.create(model="up/gpt-test", input="hi", background=True)
    with trio.fail_after(5):
        await upstream.wait_for_requests(1)
    return queued


async def test_cancelling_a_background_response_cancels_its_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    queued = await running_in_background(client, upstream)
    cancelled = await client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    with trio.fail_after(1):
        await upstream.requests[-1].disconnected.wait()
    assert (await client.responses.retrieve(queued.id)).status == "cancelled"


async def test_the_stream_helper_resumes_a_response_by_id(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    """`responses.stream(response_id=...)` replays from event 0 and filters on the client."""
    upstream.push(Reply(tokens=TOKENS))
    queued = await client.responses.create(model="up/gpt-test", input="hi", background=True)
    async with client.responses.stream(response_id=queued.id, starting_after=3) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "".join(TOKENS)


class SpawnedTasks(trio.abc.Instrument):
    """The names of the tasks spawned while it is on: the proxy's too, since it runs in this test's trio run."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def stored_streamed_and_in_background(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> list[str]:
    """A stored response streamed and one in the background, run to their ends, watched by `SpawnedTasks`: their ids."""
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=TOKENS))
    async with client.responses.stream(model="up/gpt-test", input="hi") as stream:
        streamed = await stream.get_final_response()
    queued = await client.responses.create(model="up/gpt-test", input="hi", background=True)
    async with client.responses.stream(response_id=queued.id) as stream:
        assert (await stream.get_final_response()).status == "completed"
    return [streamed.id, queued.id]


async def test_without_redis_no_task_is_started_to_keep_a_conversation(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    spawned = SpawnedTasks()
    trio.lowlevel.add_instrument(spawned)
    try:
        streamed, background = await stored_streamed_and_in_background(client, upstream)
    finally:
        trio.lowlevel.remove_instrument(spawned)
    assert {f"stream {streamed}", f"response {background}"} <= set(spawned.names)  # each one's run is seen
    assert [name for name in spawned.names if name.endswith(" conversation")] == []


async def test_with_redis_a_streamed_or_background_response_s_conversation_is_kept_there(
    nursery: trio.Nursery, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = parse_config(
        {
            "redis": {"url": redis_server.url},
            "providers": {"up": {"type": "openai", "base_url": upstream.url + "/v1"}},
        }
    )
    url = await serve_proxy(nursery, config)
    async with openai_sdk(url) as client, coredis.Redis.from_url(redis_server.url) as redis:
        ids = await stored_streamed_and_in_background(client, upstream)
        for response_id in ids:  # kept by a task once the response ended: soon after its last event
            await wait_until(partial(redis.exists, [f"trioproxy:stream:{response_id}:conversation"]))


# --- a Responses upstream ---------------------------------------------------------------------

FIXTURES = Path(__file__).parent.parent / "fixtures" / "responses"


@pytest.fixture
async def responses_proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    """`resp` speaks Responses upstream; `up` and `claude` as everywhere."""
    config = proxy_config(upstream, resp={"type": "openai_responses", "base_url": upstream.url + "/v1"})
    return await serve_proxy(nursery, config)


async def test_a_responses_client_s_stream_passes_through_byte_for_byte(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    recorded = (FIXTURES / "text_stream.sse").read_bytes()
    upstream.push(Reply(raw_body=recorded))
    sent_body = {
        "model": "resp/gpt-4o-mini",
        "input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}, {"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search"}, {"type": "custom", "name": "apply_patch"}],
        "include": ["reasoning.encrypted_content"],
        "store": False,
        "stream": True,
        "vendor_field": {"kept": True},
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(responses_proxy + "/v1/responses", json=sent_body)
    assert response.status_code == 200
    assert response.content == recorded
    assert upstream.requests[-1].path == "/v1/responses"
    assert upstream.requests[-1].json == {**sent_body, "model": "gpt-4o-mini"}


async def test_a_responses_client_stores_a_response_from_a_responses_upstream(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    calls = (ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),)
    upstream.push(Reply(tokens=TOKENS, tool_calls=calls, usage=(9, 8)))
    async with openai_sdk(responses_proxy) as sdk:
        async with sdk.responses.stream(model="resp/m", input="hi", tools=[WEATHER]) as stream:
            final = await stream.get_final_response()
        assert (await sdk.responses.retrieve(final.id)).id == final.id
    assert final.output_text == "".join(TOKENS)
    call = final.output[1]
    assert call.type == "function_call"
    assert (call.call_id, call.arguments) == ("call_1", '{"city": "Paris"}')
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 8)


async def test_a_chat_completions_client_reaches_a_responses_upstream(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    calls = (ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),)
    upstream.push(Reply(tokens=TOKENS, tool_calls=calls, usage=(9, 8)), Reply(tokens=TOKENS, finish_reason="length"))
    async with openai_sdk(responses_proxy) as sdk:
        stream = await sdk.chat.completions.create(
            model="resp/m",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"]}}],
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        truncated = await sdk.chat.completions.create(model="resp/m", messages=[{"role": "user", "content": "hi"}])
    text = chat_text(chunks)
    assert text == "".join(TOKENS)
    arguments = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function is not None
    )
    assert arguments == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 17
    assert truncated.choices[0].finish_reason == "length"
    body = upstream.requests[0].json
    assert body["input"] == [
        {"type": "message", "role": "system", "content": "Be brief."},
        {"type": "message", "role": "user", "content": "Weather?"},
    ]
    assert body["tools"] == [{"type": "function", "name": "get_weather", "parameters": WEATHER["parameters"]}]
    assert (body["max_output_tokens"], body["stream"]) == (50, True)


async def chat_stream_fails(proxy_url: str, *, match: str) -> None:
    """A chat client's stream of `resp/m` through the proxy ends in an error whose message has `match`."""
    async with openai_sdk(proxy_url) as sdk:
        stream = await sdk.chat.completions.create(
            model="resp/m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match=match):
            async for _ in stream:
                pass


async def test_a_responses_upstream_s_in_stream_failure_reaches_a_chat_client(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, error_after=2))
    await chat_stream_fails(responses_proxy, match="upstream failure")


async def test_a_field_chat_has_and_responses_has_not_is_a_400(responses_proxy: str, upstream: FakeUpstream) -> None:
    async with openai_sdk(responses_proxy) as sdk:
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(model="resp/m", messages=[{"role": "user", "content": "hi"}], stop=["x"])
    assert info.value.param == "stop"


async def test_websocket_mode_generate_false_asks_nothing_upstream_and_can_be_continued(
    proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        warmed = await one_response(connection, model="up/m", input="hi", generate=False)
        assert [e["type"] for e in warmed] == ["response.created", "response.in_progress", "response.completed"]
        assert warmed[-1]["response"]["output"] == []
        answered = await one_response(
            connection, model="up/m", previous_response_id=warmed[-1]["response"]["id"], input="more"
        )
    assert answered[-1]["type"] == "response.completed"
    assert len(upstream.requests) == 1
    assert [m["content"] for m in upstream.requests[0].json["messages"]] == ["hi", "more"]


async def test_an_anthropic_client_reaches_a_responses_upstream(responses_proxy: str, upstream: FakeUpstream) -> None:
    calls = (ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),)
    upstream.push(Reply(tokens=TOKENS, tool_calls=calls, usage=(9, 8)))
    async with (
        anthropic_sdk(responses_proxy) as claude,
        claude.messages.stream(
            model="resp/m",
            max_tokens=100,
            system="Be brief.",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[{"name": "get_weather", "input_schema": WEATHER["parameters"]}],
        ) as stream,
    ):
        message = await stream.get_final_message()
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(TOKENS)
    assert message.content[1].type == "tool_use"
    assert message.content[1].input == {"city": "Paris"}
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("tool_use", 9, 8)
    body = upstream.requests[-1].json
    assert upstream.requests[-1].path == "/v1/responses"
    assert body["input"][0] == {"type": "message", "role": "system", "content": "Be brief."}
    assert body["max_output_tokens"] == 100


async def test_websocket_mode_passes_a_responses_upstream_s_events_through_and_continues_them(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    recorded = (FIXTURES / "text_stream.sse").read_bytes()
    upstream.push(Reply(raw_body=recorded), Reply(tokens=("Again",)))
    async with trio_websocket.open_websocket_url(ws_url(responses_proxy)) as connection:
        first = await one_response(connection, model="resp/gpt-4o-mini", input="hi", store=False)
        second = await one_response(
            connection, model="resp/gpt-4o-mini", previous_response_id="resp_sanitized_streaming", input="more"
        )
    assert first == [orjson.loads(event.data) for event in SSEDecoder().feed(recorded)]
    assert second[-1]["type"] == "response.completed"
    continued_input = upstream.requests[-1].json["input"]
    assert [item.get("role") for item in continued_input] == ["user", "assistant", "user"]
    assert continued_input[1]["id"] == "msg_sanitized_streaming"  # the upstream's own output item, whole


async def test_a_stored_response_from_a_responses_upstream_keeps_its_events_under_the_store_s_id(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    recorded = (FIXTURES / "text_stream.sse").read_bytes()
    upstream.push(Reply(raw_body=recorded))
    async with httpx.AsyncClient() as http:
        body = {"model": "resp/gpt-4o-mini", "input": "hi", "stream": True}
        response = await http.post(responses_proxy + "/v1/responses", json=body)
        events = [orjson.loads(event.data) for event in SSEDecoder().feed(response.content)]
        stored_id = events[0]["response"]["id"]
        retrieved = (await http.get(f"{responses_proxy}/v1/responses/{stored_id}")).json()
    assert stored_id.startswith("resp_")
    assert stored_id != "resp_sanitized_streaming"
    upstream_events = [orjson.loads(event.data) for event in SSEDecoder().feed(recorded)]
    for event in upstream_events:
        if "response" in event:
            event["response"]["id"] = stored_id
    assert events == upstream_events  # every field of every event, the obfuscation padding too
    assert retrieved == upstream_events[-1]["response"]


async def test_a_responses_upstream_that_ends_before_its_response_completed_is_an_error_a_chat_client_sees(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    recorded = (FIXTURES / "text_stream.sse").read_bytes()
    upstream.push(Reply(raw_body=recorded[: recorded.index(b"event: response.completed")]))
    await chat_stream_fails(responses_proxy, match="ended the stream before a finish reason")


# --- input items, input tokens, compaction ------------------------------------------------------


async def test_a_stored_response_s_input_items_are_listed_in_pages(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("18C",)), Reply(tokens=("Warm.",)))
    given = [
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ]
    first = await client.responses.create(model="up/gpt-test", input=given, tools=[WEATHER])  # type: ignore[arg-type]
    second = await client.responses.create(model="up/gpt-test", previous_response_id=first.id, input="And?")

    newest_first = await client.responses.input_items.list(first.id)
    assert [item.type for item in newest_first.data] == ["function_call_output", "function_call", "message"]
    assert newest_first.has_more is False
    assert newest_first.data[2].content[0].text == "Weather in Paris?"  # type: ignore[union-attr]
    page = await client.responses.input_items.list(first.id, order="asc", limit=2)
    assert [item.type for item in page.data] == ["message", "function_call"]
    assert page.has_more is True
    every = [item async for item in client.responses.input_items.list(first.id, order="asc", limit=2)]  # page by page
    assert [item.id for item in every] == [item.id for item in reversed(newest_first.data)]
    assert len({item.id for item in every}) == 3  # ids made for items sent without one, the same on every call

    # The continued response's input is the whole conversation it answered.
    continued = [item async for item in client.responses.input_items.list(second.id, order="asc")]
    expected = ["message", "function_call", "function_call_output", "message", "message"]
    assert [item.type for item in continued] == expected
    assert continued[3].role == "assistant"
    assert continued[4].content[0].text == "And?"  # type: ignore[union-attr]

    async with httpx.AsyncClient(base_url=str(client.base_url)) as http:
        before = (await http.get(f"responses/{first.id}/input_items", params={"before": every[0].id})).json()
        assert [item["id"] for item in before["data"]] == [every[2].id, every[1].id]  # listed before it, newest first
        assert (await http.get(f"responses/{first.id}/input_items", params={"limit": 101})).status_code == 400
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.input_items.list(first.id, after="msg_unknown")
    assert info.value.param == "after"
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list("resp_unknown")


COMPACTED = {
    "id": "cmp_1",
    "object": "response.compaction",
    "created_at": 1,
    "output": [{"id": "cmp_item_1", "type": "compaction", "encrypted_content": "gAAAA"}],
    "usage": {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    },
}


async def test_input_tokens_and_compaction_are_forwarded_to_a_responses_upstream(
    responses_proxy: str, upstream: FakeUpstream
) -> None:
    counted = {"object": "response.input_tokens", "input_tokens": 7}
    upstream.push(Reply(raw_body=orjson.dumps(counted)), Reply(raw_body=orjson.dumps(COMPACTED)))
    items = [{"role": "user", "content": "hi"}, {"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]
    async with openai_sdk(responses_proxy) as sdk:
        count = await sdk.responses.input_tokens.count(model="resp/gpt-5", input=items)  # type: ignore[arg-type]
        compacted = await sdk.responses.compact(model="resp/gpt-5", input=items, instructions="Be brief.")  # type: ignore[arg-type]
    assert count.input_tokens == 7
    assert compacted.output[0].type == "compaction"
    assert compacted.usage.total_tokens == 15
    assert [request.path for request in upstream.requests] == ["/v1/responses/input_tokens", "/v1/responses/compact"]
    assert upstream.requests[0].json == {"model": "gpt-5", "input": items}
    assert upstream.requests[1].json == {"model": "gpt-5", "input": items, "instructions": "Be brief."}


async def test_input_tokens_are_estimated_and_compaction_refused_for_another_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    count = await client.responses.input_tokens.count(model="up/gpt-test", input="x" * 40, instructions="y" * 8)
    assert count.input_tokens == 12
    assert count.model_extra == {"estimated": True}
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.input_tokens.count(model="up/gpt-test", input="x", tools=[{"type": "shell"}])  # type: ignore[list-item]
    assert info.value.param == "tools[0].type"  # what the upstream could not be asked is refused, as on create
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.compact(model="up/gpt-test", input="x")
    assert (info.value.code, info.value.param) == ("unsupported_compaction", "model")
    assert "only the Responses API compacts" in info.value.message
    assert list(upstream.requests) == []


# --- a stage on a Responses upstream's stream ----------------------------------------------------


@pytest.fixture
async def redacting_proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    """`resp` speaks Responses upstream, and a transform rewrites its text: its events are re-rendered."""
    redact = {"type": "regex_redact", "pattern": "sunny", "replacement": "[weather]"}
    config = proxy_config(
        upstream, resp={"type": "openai_responses", "base_url": upstream.url + "/v1", "transforms": [redact]}
    )
    return await serve_proxy(nursery, config)


@pytest.mark.parametrize("store", [False, True])
async def test_items_the_common_model_does_not_carry_survive_a_stage_in_order(
    redacting_proxy: str, upstream: FakeUpstream, store: bool
) -> None:
    recorded = (FIXTURES / "builtin_tools_stream.sse").read_bytes()
    upstream.push(Reply(raw_body=recorded), Reply(raw_body=recorded))
    upstream_final = response_from_events(recorded)
    async with openai_sdk(redacting_proxy) as sdk:
        async with sdk.responses.stream(model="resp/gpt-5", input="Weather in Paris?", store=store) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        unstreamed = await sdk.responses.create(model="resp/gpt-5", input="Weather in Paris?", store=store)

    for response in (final, unstreamed):
        reasoning, search, message = response.output
        assert reasoning.model_dump(exclude_none=True) == {
            **upstream_final["output"][0],
            "id": reasoning.id,
        }  # its encrypted content and summary, under the id its events gave it
        assert search.model_dump(exclude_none=True) == upstream_final["output"][1]  # whole, as the upstream sent it
        assert message.type == "message"
        assert response.output_text == "Paris is [weather] today."
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    done = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"]
    assert added == done == [(0, "reasoning"), (1, "web_search_call"), (2, "message")]
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert summary == upstream_final["output"][0]["summary"][0]["text"]  # still streamed as it came
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_websocket_mode_needs_a_key_and_counts_against_its_limits(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    limits = {"max_streams_per_key": 1, "max_body_bytes": 1000}
    proxy = await serve_proxy(nursery, openai_upstream_config(upstream, auth={"keys": ["key-one"]}, limits=limits))
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with trio_websocket.open_websocket_url(ws_url(proxy)):
            pass
    assert info.value.status_code == 401
    assert orjson.loads(info.value.body or b"{}")["error"]["code"] == "invalid_api_key"  # OpenAI's shape

    key = [(b"authorization", b"Bearer key-one")]
    upstream.push(Reply(tokens=("a",) * 1000, interval=0.01), Reply(tokens=TOKENS))
    async with (
        trio_websocket.open_websocket_url(ws_url(proxy), extra_headers=key) as first,
        trio_websocket.open_websocket_url(ws_url(proxy), extra_headers=key) as second,
    ):
        await first.send_message(orjson.dumps({"type": "response.create", "model": "up/m", "input": "go"}).decode())
        with trio.fail_after(5):
            await upstream.wait_for_requests(1)
        [refused] = await one_response(second, model="up/m", input="hi")
        assert (refused["status"], refused["error"]["code"]) == (429, "too_many_streams")
        [too_large] = await one_response(second, model="up/m", input="x" * 1500)
        assert (too_large["status"], too_large["error"]["code"]) == (413, "request_too_large")
    await wait_until_idle(proxy)
    async with trio_websocket.open_websocket_url(ws_url(proxy), extra_headers=key) as again:
        answered = await one_response(again, model="up/m", input="hi")
    assert answered[-1]["type"] == "response.completed"
    assert len(upstream.requests) == 2


async def test_deleting_a_running_background_response_cancels_its_upstream_and_forgets_it(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    queued = await running_in_background(client, upstream)
    await client.responses.delete(queued.id)
    with trio.fail_after(1):
        await upstream.requests[-1].disconnected.wait()
    for retrieve in (
        client.responses.retrieve(queued.id),
        client.responses.retrieve(queued.id, stream=True, starting_after=3),
        client.responses.cancel(queued.id),
        client.responses.input_items.list(queued.id),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            await retrieve
        assert queued.id in info.value.message
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(queued.id)


async def test_usage_over_sse_and_websocket_mode_is_counted_in_the_metrics(
    client: openai.AsyncOpenAI, proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, usage=(9, 8)), Reply(tokens=TOKENS, usage=(5, 4)))
    async with client.responses.stream(model="up/gpt-test", input="hi") as stream:
        await stream.get_final_response()
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        await one_response(connection, model="up/gpt-test", input="hi")

    def tokens(metrics: str) -> dict[str, float]:
        return {
            sample.labels["direction"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "trioproxy_tokens_total" and sample.labels["model"] == "gpt-test"
        }

    counted: dict[str, float] = {}

    async def both_counted() -> bool:
        nonlocal counted
        async with httpx.AsyncClient() as http:
            counted = tokens((await http.get(proxy_url + "/metrics")).text)
        return counted.get("out") == 8 + 4

    await wait_until(both_counted)
    assert (counted["in"], counted["out"]) == (9 + 5, 8 + 4)


async def test_only_a_background_response_can_be_cancelled(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS))
    stored = await client.responses.create(model="up/gpt-test", input="hi")
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.cancel(stored.id)
    assert "background" in info.value.message
    assert (await client.responses.retrieve(stored.id)).status == "completed"


async def test_websocket_mode_through_the_sdk_s_own_connection(proxy_url: str, upstream: FakeUpstream) -> None:
    """
    `client.responses.connect()` (the sync SDK, in a thread): two responses in turn, the second
    continuing the first.
    """
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=("Again",)))

    def converse() -> list[list[Any]]:
        client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="k", max_retries=0)
        turns: list[list[Any]] = []
        with client.responses.connect(max_retries=0) as connection:
            previous = None
            for text in ("hi", "more"):
                connection.response.create(model="up/gpt-test", input=text, previous_response_id=previous)  # type: ignore[arg-type]
                events = []
                for event in connection:
                    events.append(event)
                    if event.type in TERMINAL_EVENTS or event.type == "error":
                        break
                turns.append(events)
                previous = events[-1].response.id
        return turns

    with trio.fail_after(20):
        first, second = await trio.to_thread.run_sync(converse)
    assert "".join(e.delta for e in first if e.type == "response.output_text.delta") == "".join(TOKENS)
    assert first[-1].type == second[-1].type == "response.completed"
    assert second[-1].response.output_text == "Again"
    assert [m["content"] for m in upstream.requests[1].json["messages"]] == ["hi", "".join(TOKENS), "more"]


async def test_websocket_mode_stores_a_response_unless_told_not_to(
    client: openai.AsyncOpenAI, proxy_url: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS), Reply(tokens=("Not kept",)), Reply(tokens=("Again",)))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        stored = await one_response(connection, model="up/gpt-test", input="hi")
        unstored = await one_response(connection, model="up/gpt-test", input="hi", store=False)
    assert [e["sequence_number"] for e in stored] == list(range(len(stored)))
    response_id = stored[-1]["response"]["id"]
    retrieved = await client.responses.retrieve(response_id)
    assert retrieved.model_dump(mode="json") == openai.types.responses.Response.model_validate(
        stored[-1]["response"]
    ).model_dump(mode="json")  # the SDK's own type, validated whole
    replayed = [event async for event in await client.responses.retrieve(response_id, stream=True)]
    assert [(e.type, e.sequence_number) for e in replayed] == [(e["type"], e["sequence_number"]) for e in stored]
    # Another connection (or plain HTTP) continues it, as with a response made over HTTP.
    continued = await client.responses.create(model="up/gpt-test", previous_response_id=response_id, input="more")
    assert continued.output_text == "Again"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored[-1]["response"]["id"])


async def test_a_stream_that_delivered_a_hosted_tool_s_call_is_not_continued_as_text(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    """
    A fallback can continue text only: after a `web_search_call` item was delivered, a text
    prefix is not the whole answer so far, so a broken stream ends with its error.
    """
    backup = await open_fake_upstream(nursery)
    recorded = (FIXTURES / "builtin_tools_stream.sse").read_bytes()
    events_sent = [event + b"\n\n" for event in recorded.split(b"\n\n") if event and b'"rs_builtin"' not in event]
    delta = b"event: response.output_text.delta"
    first_delta = next(i for i, event in enumerate(events_sent) if event.startswith(delta))
    # No reasoning: a search, then text.
    upstream.push(Reply(raw_body=b"".join(events_sent[: first_delta + 1]), reset_after=0))
    backup.push(Reply(tokens=("Paris is ", "sunny today."), continues=True))
    vllm = {"type": "openai", "continuation": "continue_final_message", "base_url": backup.url + "/v1"}
    config = proxy_config(
        upstream,
        resp={"type": "openai_responses", "base_url": upstream.url + "/v1", "fallbacks": ["vllm/m"]},
        vllm=vllm,
    )
    proxy = await serve_proxy(nursery, config)
    events: list[Any] = []
    async with openai_sdk(proxy) as sdk:
        stream = await sdk.responses.create(model="resp/gpt-5", input="Weather in Paris?", store=False, stream=True)
        with pytest.raises(openai.APIError, match="connection broke"):
            await collect_into(stream, events)
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["web_search_call"]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Paris is "]
    assert backup.request_count == 0


@pytest.mark.parametrize("store", [True, False])
async def test_tool_calls_the_responses_protocol_cannot_carry_end_the_stream_with_that_error(
    proxy_url: str, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture, store: bool
) -> None:
    """
    A Chat Completions upstream may go back to a tool call after starting another; a Response's
    function_call items cannot interleave. The client is told so, as the stream's error (or,
    before anything was sent, or not streamed, as the answer's status), and no bug is logged
    (it was: the broadcast failed, and the client heard only that the server ended the
    stream). Each counts as an upstream protocol error.
    """
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    upstream.push(
        interleaved_tool_calls(),
        interleaved_tool_calls(in_one_chunk=True),
        interleaved_tool_calls(),
    )
    async with httpx.AsyncClient(base_url=proxy_url) as http:
        body = {"model": "up/gpt-test", "input": "go", "stream": True, "store": store}
        response = await http.post("/v1/responses", json=body)
        held = await http.post("/v1/responses", json=body)
        whole = await http.post("/v1/responses", json={**body, "stream": False})
    events = [orjson.loads(event.data) for event in SSEDecoder().feed(response.content)]
    assert [event["type"] for event in events][-2:] == ["error", "response.failed"]
    assert events[-2]["error"]["message"].startswith("the upstream went back to tool call 0 after starting another")
    assert events[-1]["response"]["error"]["code"] == "upstream_error"
    # Refused before the first event, or not streamed: the status the answer could not be given with.
    assert (held.status_code, whole.status_code) == (502, 502)
    assert held.json()["error"]["message"].startswith("the upstream went back to tool call 0")
    assert whole.json()["error"]["message"].startswith("the upstream went back to tool call 0")

    def access_lines() -> list[dict[str, Any]]:
        return [r.fields for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]

    await wait_until(lambda: len(access_lines()) == 3)
    assert [(line["status"], line["outcome"]) for line in access_lines()] == [
        (200, "upstream_error"),
        (502, "upstream_error"),
        (502, "upstream_error"),
    ]
    assert await stream_outcomes(proxy_url, "/v1/responses") == {"upstream_error": 3, "upstream_errors:protocol": 3}
    # The upstreams never ended their streams: the proxy cancelled each (or the client would still wait).
    assert all(asked.disconnected.is_set() and not asked.completed for asked in upstream.requests)
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_websocket_mode_ends_a_response_it_cannot_carry_with_that_error(
    proxy_url: str, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The same over WebSocket: the response fails with the error, and the connection goes on."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    upstream.push(interleaved_tool_calls(), interleaved_tool_calls(), Reply(tokens=TOKENS))
    async with trio_websocket.open_websocket_url(ws_url(proxy_url)) as connection:
        unkept = await one_response(connection, model="up/m", input="hi", store=False)
        stored = await one_response(connection, model="up/m", input="hi")
        answered = await one_response(connection, model="up/m", input="hi")
    for events in (unkept, stored):
        assert [event["type"] for event in events][-2:] == ["error", "response.failed"]
        assert events[-2]["error"]["message"].startswith("the upstream went back to tool call 0 after starting another")
    assert answered[-1]["type"] == "response.completed"
    assert all(asked.disconnected.is_set() and not asked.completed for asked in list(upstream.requests)[:2])
    await wait_until(
        lambda: len([r for r in caplog.records if r.name == "trioproxy.access"]) == 4
    )  # (and the socket's)
    assert await stream_outcomes(proxy_url, "/v1/responses") == {
        "upstream_error": 2,
        "completed": 1,
        "upstream_errors:protocol": 2,
    }
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
