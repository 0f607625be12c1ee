"""
Tests for `trioproxy.testing.FakeUpstream`, the scripted LLM upstream on loopback.

The fake is driven here the way trioproxy drives a real upstream: over real sockets with a
plain `httpx.AsyncClient` (`trust_env=False`, so that no proxy variable from the environment
gets between the two). Timing uses tiny real delays (50 ms or less), not `autojump_clock`.
MockClock only jumps when every task is blocked, and a test that waits on a socket is
blocked too, so real time is the more honest measure here. Every test finishes well under a
second.

The SSE bodies are parsed with the few lines below, not with `trioproxy._sse`: the fake must
be checkable independently of the code it will be used to test.
"""

from __future__ import annotations

import base64
import logging
import math
import struct
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from tests.conftest import Instant
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply, ToolCall, open_fake_upstream

OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
#: sse_protocol.md §5.2: a real upstream's "Hello there!", the shape the fake's Anthropic stream follows.
RECORDED_ANTHROPIC_STREAM = (Path(__file__).parent / "fixtures" / "anthropic" / "basic_response.sse").read_bytes()


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


def request_body(*, stream: bool = True, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def blocks(body: bytes) -> list[bytes]:
    """Split an SSE body into its events; every event must end with a blank line."""
    assert body.endswith(b"\n\n"), body[-40:]
    return body[:-2].split(b"\n\n")


def openai_payloads(body: bytes) -> list[Any]:
    """The data of each `data: ...` event: parsed JSON, or the bytes `[DONE]`."""
    payloads: list[Any] = []
    for block in blocks(body):
        assert block.startswith(b"data: "), block
        assert b"\n" not in block, block  # exactly one data line, nothing else (no event:/id:)
        data = block[len(b"data: ") :]
        payloads.append(data if data == b"[DONE]" else orjson.loads(data))
    return payloads


def anthropic_events(body: bytes) -> list[tuple[str, Any]]:
    """(event name, parsed data) per event; the data's `type` must equal the event name."""
    events = []
    for block in blocks(body):
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: "), block
        assert data_line.startswith(b"data: "), block
        name, data = event_line[len(b"event: ") :].decode(), orjson.loads(data_line[len(b"data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


def deltas(payloads: list[Any]) -> list[Any]:
    return [p["choices"][0]["delta"] for p in payloads if isinstance(p, dict) and p.get("choices")]


async def read_until(response: httpx.Response, done: Callable[[bytes], bool], *, then_wait: float = 0.0) -> bytes:
    """
    Read the raw body until `done(received)`, then for `then_wait` seconds more, then stop.

    Stopping is a cancellation of the whole `async for`, not a `break`: the generators inside
    httpx then end with the exception instead of being left half-iterated for the garbage
    collector (which trio reports as a ResourceWarning).
    """
    received = bytearray()
    with trio.CancelScope() as scope:
        async for chunk in response.aiter_raw():
            received += chunk
            if scope.deadline == math.inf and done(bytes(received)):
                scope.deadline = trio.current_time() + then_wait
    return bytes(received)


async def read_all(client: httpx.AsyncClient, url: str, received: bytearray) -> None:
    """Stream a request's raw body into `received`, so what came before a failure can be checked."""
    async with client.stream("POST", url, json=request_body()) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            received += chunk


async def first_request(upstream: FakeUpstream) -> RecordedRequest:
    await upstream.wait_for_requests(1)
    return upstream.requests[0]


# --------------------------------------------------------------------------------------------
# OpenAI format


async def test_openai_stream_exact_shape(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery)
    response = await client.post(upstream.url + OPENAI, json=request_body(model="my-model"))

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    payloads = openai_payloads(response.content)
    assert payloads[-1] == b"[DONE]"
    chunks = payloads[:-1]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": ","},
        {"content": " world"},
        {"content": "!"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["stop"]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "my-model"
        assert (chunk["id"], chunk["created"]) == (chunks[0]["id"], chunks[0]["created"])
        assert chunk["choices"][0]["index"] == 0
        assert chunk["choices"][0]["logprobs"] is None
        assert "usage" not in chunk  # only with stream_options.include_usage
    request = upstream.requests[0]
    assert (request.method, request.path, request.json["model"]) == ("POST", OPENAI, "my-model")
    assert request.completed
    assert request.tokens_sent == 4
    assert not request.disconnected.is_set()


async def test_openai_usage_chunk_only_when_asked(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b"), usage=(9, 0)))
    body = request_body(stream_options={"include_usage": True})
    payloads = openai_payloads((await client.post(upstream.url + OPENAI, json=body)).content)

    assert payloads[-1] == b"[DONE]"
    *chunks, usage_chunk = payloads[:-1]
    assert all(chunk["usage"] is None for chunk in chunks)  # present and null on every other chunk
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    body = request_body(stream_options={"include_usage": False})
    payloads = openai_payloads((await client.post(upstream.url + OPENAI, json=body)).content)
    assert all("usage" not in p for p in payloads[:-1])
    assert all(p["choices"] for p in payloads[:-1])


async def test_openai_tool_call_fragments(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    calls = (
        ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "c"}'),
        ToolCall("call_2", "get_time", '{"tz": "CET"}'),
    )
    upstream = await open_fake_upstream(nursery, Reply(tokens=("Let me check.",), tool_calls=calls))
    payloads = openai_payloads((await client.post(upstream.url + OPENAI, json=request_body())).content)

    found = deltas(payloads)
    assert found[1] == {"content": "Let me check."}
    tool_deltas = [d["tool_calls"] for d in found if "tool_calls" in d]
    assert all(len(t) == 1 for t in tool_deltas)
    pieces = [t[0] for t in tool_deltas]
    for index, call in enumerate(calls):
        mine = [p for p in pieces if p["index"] == index]
        assert mine[0] == {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        assert len(mine) >= 3  # the opening chunk plus several argument fragments
        assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in mine[1:])
        assert "".join(p["function"]["arguments"] for p in mine) == call.arguments
    assert payloads[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    request = upstream.requests[0]
    assert request.tokens_sent == 1 + sum(1 for p in pieces if p["function"]["arguments"])


async def test_openai_non_stream(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    reply = Reply(tokens=("Hi", " there"), tool_calls=(ToolCall("call_9", "f", '{"x": 1}'),), usage=(5, 3))
    upstream = await open_fake_upstream(nursery, reply)
    for body in (request_body(stream=False), {"model": "m", "messages": []}):  # no stream key: not streamed
        response = await client.post(upstream.url + OPENAI, json=body)
        assert response.headers["content-type"] == "application/json"
        completion = response.json()
        assert completion["object"] == "chat.completion"
        assert completion["model"] == body["model"]
        choice = completion["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == "Hi there"
        assert choice["message"]["tool_calls"] == [
            {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
        ]
        assert choice["finish_reason"] == "tool_calls"
        assert completion["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


async def test_legacy_completions_stream_and_whole(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b"), usage=(4, 0)))
    body = {"model": "coder", "prompt": "x", "suffix": "y", "stream": True, "stream_options": {"include_usage": True}}
    streamed = openai_payloads((await client.post(upstream.url + "/v1/completions", json=body)).content)
    whole = (await client.post(upstream.url + "/completions", json={**body, "stream": False})).json()

    assert [p["choices"] for p in streamed[:3]] == [
        [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "b", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
    ]
    assert all(p["object"] == "text_completion" for p in streamed[:4])
    assert streamed[3]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert streamed[4] == b"[DONE]"
    assert (whole["object"], whole["choices"][0]["text"], whole["usage"]["total_tokens"]) == (
        "text_completion",
        "ab",
        6,
    )


async def test_embeddings_as_floats_or_base64(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery)
    floats = (await client.post(upstream.url + "/v1/embeddings", json={"model": "e", "input": ["ab", "c"]})).json()
    encoded = await client.post(
        upstream.url + "/embeddings", json={"model": "e", "input": "ab", "encoding_format": "base64"}
    )

    assert [item["embedding"] for item in floats["data"]] == [[2.0, 0.0, 0.5], [1.0, 1.0, 0.5]]
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert base64.b64decode(encoded.json()["data"][0]["embedding"]) == struct.pack("<3f", 2.0, 0.0, 0.5)


async def test_the_echo_route_sends_the_request_back(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("t1", "t2")))
    echoed = await client.patch(upstream.url + "/v1/echo/x?q=1", content=b"\x00body", headers={"content-type": "a/b"})
    streamed = await client.get(upstream.url + "/v1/echo", headers={"accept": "text/event-stream"})

    assert (echoed.status_code, echoed.content, echoed.headers["content-type"]) == (200, b"\x00body", "a/b")
    assert (echoed.headers["x-echo-method"], echoed.headers["x-echo-target"]) == ("PATCH", "/v1/echo/x?q=1")
    assert streamed.content == b"data: t1\n\ndata: t2\n\n"


# --------------------------------------------------------------------------------------------
# Anthropic format


async def test_anthropic_stream_event_sequence(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("Hello", " there", "!"), usage=(11, 0)))
    response = await client.post(upstream.url + ANTHROPIC, json=request_body(model="claude-x"))

    assert response.headers["content-type"] == "text/event-stream"
    events = anthropic_events(response.content)
    assert [name for name, _ in events] == [name for name, _ in anthropic_events(RECORDED_ANTHROPIC_STREAM)]
    message = events[0][1]["message"]
    assert message["model"] == "claude-x"
    assert (message["role"], message["content"], message["stop_reason"]) == ("assistant", [], None)
    assert message["usage"]["input_tokens"] == 11
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [d["delta"] for _, d in events[3:6]] == [{"type": "text_delta", "text": t} for t in ("Hello", " there", "!")]
    assert all(d["index"] == 0 for _, d in events[3:7])
    assert events[7][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }


async def test_anthropic_tool_use_without_text(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    call = ToolCall("toolu_01", "get_weather", '{"location": "San Francisco, CA"}')
    upstream = await open_fake_upstream(nursery, Reply(tokens=(), tool_calls=(call,)))
    events = anthropic_events((await client.post(upstream.url + ANTHROPIC, json=request_body())).content)

    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]  # no text block at all
    assert names.count("ping") == 1
    assert events[1][1]["content_block"] == {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
    fragments = [d["delta"] for name, d in events if name == "content_block_delta"]
    assert all(f["type"] == "input_json_delta" for f in fragments)
    assert fragments[0]["partial_json"] == ""
    assert len(fragments) >= 3
    assert "".join(f["partial_json"] for f in fragments) == call.arguments
    assert all(d["index"] == 0 for name, d in events if name.startswith("content_block"))
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert names[-1] == "message_stop"


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("tool_calls", "tool_use"), ("length", "max_tokens"), ("refusal", "refusal")],
)
async def test_anthropic_stop_reason_mapping(
    nursery: trio.Nursery, client: httpx.AsyncClient, finish_reason: str, stop_reason: str
) -> None:
    upstream = await open_fake_upstream(nursery, Reply(finish_reason=finish_reason))
    events = anthropic_events((await client.post(upstream.url + ANTHROPIC, json=request_body())).content)
    assert events[-2][1]["delta"]["stop_reason"] == stop_reason
    message = (await client.post(upstream.url + ANTHROPIC, json=request_body(stream=False))).json()
    assert message["stop_reason"] == stop_reason


async def test_anthropic_non_stream(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    reply = Reply(tokens=("Hi", "!"), tool_calls=(ToolCall("toolu_2", "f", '{"a": [1, 2]}'),))
    upstream = await open_fake_upstream(nursery, reply)
    message = (await client.post(upstream.url + ANTHROPIC, json=request_body(stream=False, model="c"))).json()
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "c",
        "content": [
            {"type": "text", "text": "Hi!"},
            {"type": "tool_use", "id": "toolu_2", "name": "f", "input": {"a": [1, 2]}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 2},
    }


# --------------------------------------------------------------------------------------------
# errors and faults


@pytest.mark.parametrize(
    ("status", "anthropic_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
    ],
)
async def test_error_status_bodies_and_headers(
    nursery: trio.Nursery, client: httpx.AsyncClient, status: int, anthropic_type: str
) -> None:
    reply = Reply(status=status, error_message="nope", headers={"retry-after": "2"})
    upstream = await open_fake_upstream(nursery, reply)

    response = await client.post(upstream.url + OPENAI, json=request_body())
    assert response.status_code == status
    assert response.headers["retry-after"] == "2"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["message"] == "nope"
    assert isinstance(error["type"], str)
    assert (error["param"], error["code"]) == (None, None)

    response = await client.post(upstream.url + ANTHROPIC, json=request_body())
    assert response.status_code == status
    assert response.headers["retry-after"] == "2"
    assert response.json() == {"type": "error", "error": {"type": anthropic_type, "message": "nope"}}


async def test_error_after_sends_in_stream_error(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(error_after=2, error_message="boom"))

    payloads = openai_payloads((await client.post(upstream.url + OPENAI, json=request_body())).content)
    assert [d.get("content") for d in deltas(payloads)] == ["", "Hello", ","]
    assert payloads[-1] == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}

    events = anthropic_events((await client.post(upstream.url + ANTHROPIC, json=request_body())).content)
    assert [name for name, _ in events][-3:] == ["content_block_delta", "content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "boom"}}
    assert all(r.completed and r.tokens_sent == 2 for r in upstream.requests)


async def test_omit_done(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(omit_done=True))
    payloads = openai_payloads((await client.post(upstream.url + OPENAI, json=request_body())).content)
    assert b"[DONE]" not in payloads
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
    events = anthropic_events((await client.post(upstream.url + ANTHROPIC, json=request_body())).content)
    assert events[-1][0] == "message_delta"


async def test_reset_after_gives_transport_error(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b", "c", "d"), reset_after=2))
    received = bytearray()
    with pytest.raises(httpx.TransportError):
        await read_all(client, upstream.url + OPENAI, received)
    assert [d.get("content") for d in deltas(openai_payloads(bytes(received)))] == ["", "a", "b"]
    request = upstream.requests[0]
    assert request.tokens_sent == 2
    assert not request.completed
    assert not request.disconnected.is_set()  # the server cut it; the client did not go away

    # the server is unharmed (the default reply would reset a non-streamed request too)
    upstream.push(Reply())
    assert (await client.post(upstream.url + OPENAI, json=request_body(stream=False))).status_code == 200


async def test_stall_after_sends_nothing_more(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b", "c"), stall_after=2))
    async with client.stream("POST", upstream.url + OPENAI, json=request_body()) as response:
        # the role chunk and two tokens, then 150 ms in which nothing more may come
        received = await read_until(response, lambda body: body.count(b"\n\n") >= 3, then_wait=0.15)
    assert [d.get("content") for d in deltas(openai_payloads(received))] == ["", "a", "b"]
    request = upstream.requests[0]
    assert request.tokens_sent == 2
    assert not request.completed
    with trio.fail_after(5):  # leaving the stream closed the connection
        await request.disconnected.wait()


@pytest.mark.parametrize(
    "reply",
    [
        Reply(tokens=("a", "b", "c"), stall_after=1),
        Reply(tokens=("a", "b", "c"), interval=30),
        Reply(ttft=30),
    ],
    ids=["stall", "interval", "ttft"],
)
async def test_client_disconnect_mid_stream(nursery: trio.Nursery, client: httpx.AsyncClient, reply: Reply) -> None:
    upstream = await open_fake_upstream(nursery, reply)
    async with client.stream("POST", upstream.url + ANTHROPIC, json=request_body()) as response:
        assert response.status_code == 200
        request = await first_request(upstream)
        assert not request.disconnected.is_set()
        closed = Instant.now()
        if reply.ttft == 0:
            # httpx drops the connection as soon as this read is cancelled, so the close is
            # the end of this read (a few ms), or else the end of the block
            await read_until(response, lambda body: b"text_delta" in body)

    with trio.fail_after(5):
        await request.disconnected.wait()
    assert request.disconnected_at is not None
    assert request.disconnected_at >= closed.time
    assert closed.until(request.disconnected_at) < 0.1  # less the time this thread waited for a CPU
    assert not request.completed
    assert request.tokens_sent == (0 if reply.ttft else 1)


async def test_client_disconnect_during_headers_delay(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(headers_delay=30))
    async with trio.open_nursery() as requests:
        requests.start_soon(partial(client.post, upstream.url + OPENAI, json=request_body()))
        request = await first_request(upstream)
        requests.cancel_scope.cancel()
    closed = Instant.now()
    await client.aclose()  # make the close explicit, however httpx treats a cancelled request
    with trio.fail_after(5):
        await request.disconnected.wait()
    assert request.disconnected_at is not None
    assert closed.until(request.disconnected_at) < 0.1
    assert not request.completed
    assert request.tokens_sent == 0


async def test_raw_body(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    raw = b'data: {"id": "x", "choices": [{"delta": {"content": "tru\n\n'
    upstream = await open_fake_upstream(nursery, Reply(raw_body=raw))
    response = await client.post(upstream.url + OPENAI, json=request_body())
    assert (response.status_code, response.headers["content-type"]) == (200, "text/event-stream")
    assert response.content == raw

    upstream.push(Reply(raw_body=raw, reset_after=0))  # a truncated stream: no terminating chunk
    received = bytearray()
    with pytest.raises(httpx.TransportError):
        await read_all(client, upstream.url + ANTHROPIC, received)
    assert received == raw


async def test_timing_ttft_and_interval(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("a", "b", "c"), ttft=0.05, interval=0.02))
    arrivals: list[float] = []
    async with client.stream("POST", upstream.url + OPENAI, json=request_body()) as response:
        received = bytearray()
        async for chunk in response.aiter_raw():
            received += chunk
            arrivals += [trio.current_time()] * (received.count(b'"content":"') - len(arrivals))
    # The role chunk counts too: it goes out with the first token, after ttft. Each is timed
    # from the request (the upstream's own clock), never from an arrival that may come late.
    assert len(arrivals) == 4
    since_request = [arrival - upstream.requests[0].started for arrival in arrivals]
    due = (0.05, 0.05, 0.07, 0.09)
    assert all(since >= at - 1e-6 for since, at in zip(since_request, due, strict=True)), since_request  # rounding


# --------------------------------------------------------------------------------------------
# connections, queueing and routing


async def test_keep_alive_reuses_the_connection(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery)
    for path in (OPENAI, ANTHROPIC, OPENAI):
        response = await client.post(upstream.url + path, json=request_body())
        assert response.status_code == 200
    response = await client.post(upstream.url + OPENAI, json=request_body(stream=False))
    assert response.status_code == 200
    assert len({r.connection for r in upstream.requests}) == 1
    assert all(r.completed for r in upstream.requests)

    # a new client opens a new connection
    async with httpx.AsyncClient(trust_env=False) as other:
        await other.post(upstream.url + OPENAI, json=request_body())
    assert upstream.requests[-1].connection != upstream.requests[0].connection


async def test_push_queue_takes_precedence_in_order(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("default",)))
    upstream.push(Reply(tokens=("first",)), Reply(status=503))
    upstream.push(Reply(tokens=("third",)))
    results = []
    for _ in range(5):
        response = await client.post(upstream.url + OPENAI, json=request_body(stream=False))
        results.append(
            response.status_code if response.status_code != 200 else response.json()["choices"][0]["message"]["content"]
        )
    assert results == ["first", 503, "third", "default", "default"]


async def test_callable_replies_see_the_request(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    def choose(request: RecordedRequest) -> Reply:
        return Reply(tokens=(request.json["model"], request.headers["x-tag"]))

    upstream = await open_fake_upstream(nursery, choose)
    response = await client.post(
        upstream.url + OPENAI, json=request_body(stream=False, model="m1"), headers={"X-Tag": "t1"}
    )
    assert response.json()["choices"][0]["message"]["content"] == "m1t1"


async def test_failing_replies_callable_is_a_500_not_a_crash(
    nursery: trio.Nursery, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: RecordedRequest) -> Reply:
        raise ValueError("script bug")

    upstream = await open_fake_upstream(nursery, broken)
    with caplog.at_level(logging.ERROR, logger="trioproxy.testing"):
        response = await client.post(upstream.url + ANTHROPIC, json=request_body())
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "api_error"
    assert "script bug" in caplog.text
    upstream.push(Reply())
    assert (await client.post(upstream.url + ANTHROPIC, json=request_body())).status_code == 200


async def test_routes_models_404_and_bad_json(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery)
    models = await client.get(upstream.url + "/v1/models")
    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert models.json()["data"][0]["object"] == "model"

    assert (await client.post(upstream.url + "/chat/completions", json=request_body())).status_code == 200
    missing = await client.post(upstream.url + "/v1/nowhere", json={})
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert (await client.get(upstream.url + OPENAI)).status_code == 404

    headers = {"content-type": "application/json"}
    bad = await client.post(upstream.url + ANTHROPIC, content=b"{not json", headers=headers)
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert (upstream.requests[-1].body, upstream.requests[-1].json) == (b"{not json", None)
    assert len(upstream.requests) == 5


async def test_wait_for_requests(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery, Reply(ttft=0.01))
    done = trio.Event()

    async def waiter() -> None:
        await upstream.wait_for_requests(2)
        done.set()

    nursery.start_soon(waiter)
    await client.post(upstream.url + OPENAI, json=request_body())
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()
    await client.post(upstream.url + OPENAI, json=request_body())
    with trio.fail_after(1):
        await done.wait()
    with trio.fail_after(1):
        await upstream.wait_for_requests(1)  # already satisfied: returns at once


async def test_malformed_request_gets_400_and_server_survives(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    upstream = await open_fake_upstream(nursery)
    with trio.fail_after(1):
        stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
        async with stream:
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            answer = bytearray()
            while chunk := await stream.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert list(upstream.requests) == []
    assert (await client.post(upstream.url + OPENAI, json=request_body())).status_code == 200


def raw_request(body: bytes, *extra_headers: bytes) -> bytes:
    head = [b"POST /v1/chat/completions HTTP/1.1", b"host: fake", b"content-length: %d" % len(body), *extra_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def test_pipelined_requests_then_connection_close(nursery: trio.Nursery) -> None:
    # the second request is already buffered while the first response waits out its ttft
    upstream = await open_fake_upstream(nursery, Reply(ttft=0.02))
    body = orjson.dumps(request_body(stream=False))
    with trio.fail_after(1):
        stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
        async with stream:
            await stream.send_all(raw_request(body) + raw_request(body, b"connection: close"))
            answer = bytearray()
            while chunk := await stream.receive_some(65536):  # the server closes after the second
                answer += chunk
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert [(r.connection, r.completed) for r in upstream.requests] == [(1, True), (1, True)]


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    upstream = await open_fake_upstream(nursery)
    body = orjson.dumps(request_body(stream=False))
    with trio.fail_after(1):
        stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
        async with stream:
            head = raw_request(body, b"expect: 100-continue", b"connection: close")[: -len(body)]
            await stream.send_all(head)
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            answer = bytearray()
            while chunk := await stream.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert upstream.requests[0].json == request_body(stream=False)


async def test_shutdown_with_a_stalled_stream(client: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await open_fake_upstream(nursery, Reply(stall_after=0))
        async with client.stream("POST", upstream.url + OPENAI, json=request_body()) as response:
            assert response.status_code == 200
            nursery.cancel_scope.cancel()  # the server stops; no connection task may linger
            with pytest.raises(httpx.TransportError), trio.fail_after(1):
                await response.aread()
    assert not upstream.requests[0].completed


def test_reply_validation() -> None:
    with pytest.raises(ValueError, match="ttft"):
        Reply(ttft=-1)
    with pytest.raises(ValueError, match="status"):
        Reply(status=101)
    with pytest.raises(RuntimeError):
        _ = FakeUpstream().url


async def test_a_reply_that_continues_streams_only_what_follows_the_assistant_prefix(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    upstream = await open_fake_upstream(nursery, Reply(tokens=("Hello", ",", " wor", "ld", "!"), continues=True))
    prefilled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, wo"}]
    response = await client.post(upstream.url + OPENAI, json=request_body(messages=prefilled))
    texts = [p["choices"][0]["delta"].get("content") for p in openai_payloads(response.content)[:-1] if p["choices"]]
    assert "".join(t or "" for t in texts) == "r" + "ld!"

    # Without an assistant turn at the end, the whole reply; one that does not begin it, a 400.
    response = await client.post(upstream.url + OPENAI, json=request_body())
    assert b"Hello" in response.content
    wrong = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Bye"}]
    response = await client.post(upstream.url + OPENAI, json=request_body(messages=wrong))
    assert response.status_code == 400


async def test_a_reply_that_refuses_continuations_answers_a_prefill_with_400(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    upstream = await open_fake_upstream(nursery, Reply(refuse_continuation=True))
    prefilled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "He"}]}]
    response = await client.post(upstream.url + ANTHROPIC, json=request_body(messages=prefilled))
    assert response.status_code == 400
    assert "prefill" in response.json()["error"]["message"]
    response = await client.post(upstream.url + ANTHROPIC, json=request_body())
    assert response.status_code == 200
