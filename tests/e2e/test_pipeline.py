"""
The supervised pipeline end to end: the official openai SDK → trioproxy (hypercorn on
127.0.0.1:0) → `FakeUpstream`, with routes that buffer, transform, validate, retry and fail
over. Timeouts here are a fraction of a second of real time; their exact instants are
checked on MockClock in tests/pipeline/test_session.py.
"""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest
import trio

from tests.conftest import (
    chat_text,
    collect_into,
    free_port,
    in_process,
    openai_sdk,
    proxy_config,
    serve_proxy,
    wait_until_idle,
)
from trioproxy import SSEDecoder, StreamEvent, parse_config
from trioproxy.testing import FakeUpstream, Reply

MESSAGES = [{"role": "user", "content": "go"}]
TOKENS = ("Call", " me", " at", " 555", "-1234", " today.", " Bye", " now!")


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    base = upstream.url + "/v1"
    config = proxy_config(
        upstream,
        retrying={"type": "openai", "base_url": base, "retry": {"max_retries": 2, "base_delay_ms": 1}},
        primary={"type": "openai", "base_url": base, "fallbacks": ["claude/backup-model"]},
        guarded={
            "type": "openai",
            "base_url": base,
            "transforms": [{"type": "regex_redact", "pattern": r"\d{3}-\d{4}", "replacement": "[phone]"}],
            "validators": [{"type": "banned_phrases", "phrases": ["forbidden"]}],
            # Sentences, not the timer, cut the chunks: a busy machine's pauses (70 ms seen) stay far below 0.5 s.
            "buffer": {"buffer_by_sentence": True, "flush_interval_ms": 500},
        },
        buffered={"type": "openai", "base_url": base, "buffer": {"buffer_by_word": True, "min_chunk_size": 8}},
        patient={"type": "openai", "base_url": base, "heartbeat_interval": 0.05, "first_token_timeout": 5},
        # Long enough that a busy machine's pauses (70 ms seen) never pass for a stall.
        hasty={"type": "openai", "base_url": base, "silence_timeout": 1, "first_token_timeout": 1},
        gone={"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
    )
    return await serve_proxy(nursery, config)


@pytest.fixture
async def sdk(proxy: str):
    async with openai_sdk(proxy) as client:
        yield client


async def stream_text(sdk: openai.AsyncOpenAI, model: str) -> tuple[str, list]:
    stream = await sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    return chat_text(chunks), chunks


async def test_silent_upstream_gets_heartbeats_and_the_stream_completes(
    sdk: openai.AsyncOpenAI, proxy: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS, ttft=0.3))
    text, _ = await stream_text(sdk, "patient/m")
    assert text == "".join(TOKENS)

    upstream.push(Reply(tokens=TOKENS, ttft=0.3))
    async with httpx.AsyncClient() as http:
        body = (
            await http.post(
                proxy + "/v1/chat/completions", json={"model": "patient/m", "messages": MESSAGES, "stream": True}
            )
        ).text
    # At least one: the beat's timer is due long before the token's, however late both fire.
    # How many come, and when, is counted on MockClock below.
    assert body.split("data: ", 1)[0].startswith(": keep-alive\n\n")
    assert "id:" not in body
    assert "event:" not in body


async def test_heartbeats_come_every_interval_until_the_first_token(autojump_clock: trio.abc.Clock) -> None:
    """In-process (no sockets), so that they are counted on trio's MockClock: a real clock skips beats when busy."""
    slow = {"type": "simulated", "ttft_ms": 275, "token_interval_ms": 0, "heartbeat_interval": 0.05}
    config = parse_config({"providers": {"slow": slow}}, environ={})
    async with in_process(config) as (http, _):
        response = await http.post(
            "/v1/chat/completions", json={"model": "slow/echo", "messages": MESSAGES, "stream": True}
        )
    blocks = response.text.split("\n\n")
    first_text = next(index for index, block in enumerate(blocks) if '"content":"go"' in block)
    assert '"role":"assistant"' in blocks[0]  # the simulated upstream opens the stream at once
    assert blocks[1:first_text] == [": keep-alive"] * 5  # at 50, 100, ..., 250 ms; the text at 275 ms
    assert "id:" not in response.text
    assert "event:" not in response.text


async def test_a_retried_stream_delivers_the_text_once(
    sdk: openai.AsyncOpenAI, proxy: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(status=500), Reply(status=429, headers={"retry-after": "0"}), Reply(tokens=TOKENS))
    text, _ = await stream_text(sdk, "retrying/m")
    assert text == "".join(TOKENS)
    assert len(upstream.requests) == 3

    # the generic endpoints report each retry as a metadata event
    upstream.push(Reply(status=503), Reply(tokens=TOKENS))
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + "/v1/chat/stream", json={"model": "retrying/m", "messages": MESSAGES})
    events = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(response.content)]
    assert [(e.type, e.data) for e in events[:2]] == [("metadata", "retry"), ("metadata", "stream_start")]
    assert events[0].metadata["attempt"] == 1
    assert "".join(e.data for e in events if e.type == "token") == "".join(TOKENS)


async def test_failover_to_a_fallback_route(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.push(Reply(status=502), Reply(tokens=TOKENS))
    text, _ = await stream_text(sdk, "primary/m")
    assert text == "".join(TOKENS)
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions", "/v1/messages"]
    assert upstream.requests[1].json["model"] == "backup-model"


async def test_transforms_and_buffered_chunks_are_valid_openai_chunks(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=TOKENS))
    text, chunks = await stream_text(sdk, "guarded/m")
    assert text == "Call me at [phone] today. Bye now!"
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["Call me at [phone] today.", " Bye now!"]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_word_buffer_on_a_route(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=("un", "believ", "able", " things", " happen", " here")))
    text, chunks = await stream_text(sdk, "buffered/m")
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert text == "unbelievable things happen here"
    assert contents == ["unbelievable", " things happen", " here"]


async def test_a_failing_validator_stops_the_stream_and_the_upstream(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("Fine.", " This", " is", " forbidden", " text.") + ("x",) * 500, interval=0.005))
    stream = await sdk.chat.completions.create(model="guarded/m", messages=MESSAGES, stream=True)
    chunks: list[openai.types.chat.ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as info:
        await collect_into(stream, chunks)
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == ["Fine."]
    assert "banned phrase" in info.value.message
    with trio.fail_after(1):
        await upstream.requests[-1].disconnected.wait()
    assert not upstream.requests[-1].completed


async def test_buffer_config_per_request_on_the_generic_endpoint(proxy: str, upstream: FakeUpstream) -> None:
    upstream.push(Reply(tokens=TOKENS))
    async with httpx.AsyncClient() as http:
        response = await http.post(
            proxy + "/v1/chat/stream/json",
            json={"model": "up/m", "messages": MESSAGES, "buffer_config": {"buffer_by_sentence": True}},
        )
        bad = await http.post(
            proxy + "/v1/chat/stream/json",
            json={"model": "up/m", "messages": MESSAGES, "buffer_config": {"min_chunk_size": -1}},
        )
    events = [StreamEvent.from_json(line) for line in response.text.splitlines()]
    assert [e.data for e in events if e.type == "chunk"] == ["Call me at 555-1234 today.", " Bye now!"]
    assert not any(e.type == "token" for e in events)
    assert bad.status_code == 400
    assert "buffer_config.min_chunk_size" in bad.text


# --- the fault matrix ----------------------------------------------------------------------

GOOD = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
)

FAULTS = {
    "connect refused": ("gone/m", None, 502, None),
    "500 before the stream": ("up/m", Reply(status=500), 500, None),
    "429 before the stream": ("up/m", Reply(status=429, headers={"retry-after": "3"}), 429, None),
    "reset mid-stream": ("up/m", Reply(tokens=TOKENS, reset_after=2), 200, "connection broke"),
    # nothing had reached the client yet, so the timeout is still an HTTP status
    "stall before the first token": ("hasty/m", Reply(tokens=TOKENS, stall_after=0), 504, None),
    "stall mid-stream": ("hasty/m", Reply(tokens=TOKENS, stall_after=3), 200, "silence_timeout"),
    "malformed SSE": ("up/m", Reply(raw_body=GOOD + b"data: not json at all\n\n"), 200, "not JSON"),
    "truncated JSON chunk": ("up/m", Reply(raw_body=GOOD + b'data: {"id":"c","choi'), 200, "before a finish reason"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_matrix(proxy: str, upstream: FakeUpstream, fault: str) -> None:
    model, reply, status, in_stream = FAULTS[fault]
    if reply is not None:
        upstream.push(reply)
    async with httpx.AsyncClient() as http:
        response = await http.post(
            proxy + "/v1/chat/completions", json={"model": model, "messages": MESSAGES, "stream": True}
        )
        assert response.status_code == status
        if in_stream is None:
            assert response.json()["error"]["message"]
            assert response.json()["error"]["type"]
        else:
            last = response.text.strip().split("\n\n")[-1]
            assert last.startswith("data: {")
            error = orjson.loads(last[6:])["error"]
            assert in_stream in error["message"] or in_stream == error["code"]
            assert "data: [DONE]" not in response.text

        # nothing left behind: no session in the proxy, no upstream connection held open
        await wait_until_idle(proxy)
        for request in upstream.requests:
            closed_by_upstream = reply is not None and reply.reset_after is not None
            assert request.completed or request.disconnected.is_set() or closed_by_upstream, fault

        # and the server keeps serving
        upstream.push(Reply(tokens=TOKENS))
        ok = await http.post(proxy + "/v1/chat/completions", json={"model": "up/m", "messages": MESSAGES})
        assert ok.json()["choices"][0]["message"]["content"] == "".join(TOKENS)
