"""
Resumable streams and stored Responses shared on Redis Streams, as an operator runs them:
real `trioproxy serve` processes sharing one real `redis-server`. A generation started on one
process is replayed and followed live on another (`Last-Event-ID`, `starting_after`), which
starts no generation of its own; then Redis killed mid-stream: no hang, no 500, the stream
goes on where it runs, its watchers told once, and sharing resumes when Redis is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.conftest import RedisServer, openai_sdk
from tests.e2e.test_observability import scrape_until
from tests.e2e.test_shared_limits import MESSAGES, Proxy, config_text, proxies
from trioproxy import SSEDecoder, StreamEvent
from trioproxy.testing import FakeUpstream, Reply

#: 30 tokens 50 ms apart: a stream still running while the test looks.
SLOW_STREAM = {"model": "slow/lorem", "messages": MESSAGES, "max_tokens": 30}
WARNING = b"shared_state_unavailable"


def events_of(body: bytes) -> list[StreamEvent]:
    return [StreamEvent.from_json(e.data, id=e.id or None) for e in SSEDecoder().feed(body)]


async def read_until(chunks: AsyncIterator[bytes], count: int) -> tuple[bytes, list[StreamEvent]]:
    """The bytes of a response's `chunks` until `count` events have come (the rest stays to read)."""
    body = b""
    async for data in chunks:
        body += data
        if len(events_of(body)) >= count:
            break
    return body, events_of(body)


async def streams_started(proxy: Proxy) -> float:
    samples = await scrape_until(proxy.url, lambda s: True)
    return sum(count for (name, _), count in samples.items() if name == "trioproxy_streams_total")


async def test_a_stream_started_on_one_process_is_resumed_on_another_replayed_then_live(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with proxies(tmp_path, config_text(redis_server.url, ""), count=2) as (first, second):
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", first.url + "/v1/chat/stream", json=SLOW_STREAM) as started:
                stream_id = started.headers["x-stream-id"]
                _, seen = await read_until(started.aiter_bytes(), 6)  # stream_start, the first tokens; it leaves
            last = int(seen[-1].id or 0)
            headers = {"last-event-id": str(last)}
            with trio.fail_after(20):
                resumed = await http.get(second.url + f"/v1/streams/{stream_id}", headers=headers)
            assert resumed.status_code == 200
            assert resumed.headers["x-stream-id"] == stream_id
            rest = events_of(resumed.content)
            # None lost or repeated:
            assert [int(e.id or 0) for e in rest] == list(range(last + 1, last + 1 + len(rest)))
            assert rest[-1].type == "done"
            tokens = [e for e in seen + rest if e.type == "token"]
            assert len(tokens) == 30
            # The whole stream again, from the process that did not run it, once it is over.
            again = await http.get(second.url + f"/v1/streams/{stream_id}")
            assert [e.id for e in events_of(again.content)] == [e.id for e in seen + rest]
            ahead = await http.get(second.url + f"/v1/streams/{stream_id}", headers={"last-event-id": "999"})
            assert ahead.status_code == 400
            missing = await http.get(second.url + "/v1/streams/st_nothing")
            assert missing.status_code == 404
        assert (await streams_started(first), await streams_started(second)) == (1, 0)  # the upstream asked once


async def test_a_stored_response_is_retrieved_and_followed_on_another_process(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with proxies(tmp_path, config_text(redis_server.url, ""), count=2) as (first, second):
        async with openai_sdk(first.url) as creator:
            stream = await creator.responses.create(model="slow/lorem", input="go", max_output_tokens=30, stream=True)
            seen = []
            async for event in stream:
                seen.append(event)
                if len(seen) == 6:
                    break
            response_id = seen[0].response.id  # type: ignore[union-attr]
            after = seen[-1].sequence_number
            async with openai_sdk(second.url) as other:
                with trio.fail_after(20):
                    followed = [
                        event
                        async for event in await other.responses.retrieve(
                            response_id, stream=True, starting_after=after
                        )
                    ]
                assert [e.sequence_number for e in followed] == list(range(after + 1, after + 1 + len(followed)))
                assert followed[-1].type == "response.completed"
                retrieved = await other.responses.retrieve(response_id)
                assert retrieved.status == "completed"
                assert retrieved.output_text == followed[-1].response.output_text  # type: ignore[union-attr]
                assert len(retrieved.output_text.split()) == 30
            await stream.close()
            assert (await creator.responses.delete(response_id)) is None  # where it ran: from Redis too
            async with openai_sdk(second.url) as other:
                with pytest.raises(openai.NotFoundError):
                    await other.responses.retrieve(response_id)
        assert (await streams_started(first), await streams_started(second)) == (1, 0)


async def test_a_stored_response_is_continued_and_its_input_items_listed_on_another_process(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("Paris.",)), Reply(tokens=("About 2 million.",)))
    provider = f"""
[providers.up]
type = "openai"
base_url = "{upstream.url}/v1"
"""
    async with (
        proxies(tmp_path, config_text(redis_server.url, "") + provider, count=2) as (first, second),
        openai_sdk(first.url) as on_first,
        openai_sdk(second.url) as on_second,
    ):
        created = await on_first.responses.create(model="up/m", input="Capital of France?")
        continued = await on_second.responses.create(
            model="up/m", previous_response_id=created.id, input="Its population?"
        )
        assert continued.output_text == "About 2 million."
        assert upstream.requests[-1].json["messages"] == [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Its population?"},
        ]
        listed = [item async for item in on_second.responses.input_items.list(created.id, order="asc")]
        assert [(item.type, item.role) for item in listed] == [("message", "user")]  # type: ignore[union-attr]
        chained = [item async for item in on_first.responses.input_items.list(continued.id, order="asc")]
        assert len(chained) == 3  # the whole conversation it answered, read back on the process that ran the first

        running = await on_first.responses.create(model="slow/lorem", input="go", max_output_tokens=30, stream=True)
        async for event in running:
            if event.type == "response.created":
                running_id = event.response.id
            if event.type == "response.output_text.delta":
                break
        with pytest.raises(openai.BadRequestError) as early:  # as on the process that runs it
            await on_second.responses.create(model="up/m", previous_response_id=running_id, input="x")
        assert "is in_progress" in early.value.message
        await running.close()

        await on_first.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await on_second.responses.create(model="up/m", previous_response_id=created.id, input="x")
        assert gone.value.code == "previous_response_not_found"

        await redis_server.stop()  # a response not held here cannot be read: a 503 in OpenAI's shape
        with trio.fail_after(5), pytest.raises(openai.APIStatusError) as down:
            await on_first.responses.create(model="up/m", previous_response_id=continued.id, input="x")
        assert (down.value.status_code, down.value.code) == (503, "shared_state_unavailable")
        with trio.fail_after(5), pytest.raises(openai.APIStatusError) as down:
            await on_first.responses.input_items.list(continued.id)
        assert down.value.status_code == 503
    assert len(upstream.requests) == 2
    assert "Traceback" not in "".join(proxy.log.read_text() for proxy in (first, second))


async def test_a_conversation_over_max_replay_bytes_is_not_shared_and_the_refusal_says_so(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("Long.",)), Reply(tokens=("Still here.",)))
    text = (
        config_text(redis_server.url, "")
        + f"""
[streams]
max_replay_bytes = 10000

[providers.up]
type = "openai"
base_url = "{upstream.url}/v1"
"""
    )
    async with (
        proxies(tmp_path, text, count=2) as (first, second),
        openai_sdk(first.url) as on_first,
        openai_sdk(second.url) as on_second,
    ):
        created = await on_first.responses.create(model="up/m", input="word " * 4000)
        with pytest.raises(openai.NotFoundError) as elsewhere:
            await on_second.responses.create(model="up/m", previous_response_id=created.id, input="more")
        assert "could not share its conversation" in elsewhere.value.message
        here = await on_first.responses.create(model="up/m", previous_response_id=created.id, input="more")
        assert here.output_text == "Still here."
    assert "over [streams] max_replay_bytes (10000): not kept in Redis" in first.log.read_text()


async def test_redis_killed_mid_stream_the_stream_goes_on_where_it_runs_then_sharing_resumes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with (
        proxies(tmp_path, config_text(redis_server.url, ""), count=2) as (first, second),
        httpx.AsyncClient(timeout=30) as http,
    ):
        async with http.stream("POST", first.url + "/v1/chat/stream", json=SLOW_STREAM) as running:
            stream_id = running.headers["x-stream-id"]
            chunks = running.aiter_bytes()
            head, _ = await read_until(chunks, 4)
            async with http.stream("GET", second.url + f"/v1/streams/{stream_id}") as follower:
                followed = follower.aiter_bytes()
                await read_until(followed, 4)
                await redis_server.stop()
                with trio.fail_after(10):  # no hang: the follower is told, and its response ends
                    tail = b"".join([data async for data in followed])
            assert WARNING in tail
            assert "done" not in [e.type for e in events_of(tail)]
            with trio.fail_after(20):
                rest = b"".join([data async for data in chunks])
        everything = events_of(head + rest)
        assert WARNING in rest  # once, to the watchers where it runs
        assert rest.count(WARNING) == 1
        assert everything[-1].type == "done"
        assert len([e for e in everything if e.type == "token"]) == 30

        with trio.fail_after(5):  # elsewhere: a 503 in its shape, not a 500 nor a hang
            down = await http.get(second.url + f"/v1/streams/{stream_id}")
        assert down.status_code == 503
        assert b"shared_state_unavailable" in down.content
        resumed = await http.get(first.url + f"/v1/streams/{stream_id}", headers={"last-event-id": "2"})
        assert events_of(resumed.content)[-1].type == "done"  # where it ran, from its own log

        await redis_server.start()
        async with http.stream("POST", first.url + "/v1/chat/stream", json=SLOW_STREAM) as again:
            new_id = again.headers["x-stream-id"]
            await read_until(again.aiter_bytes(), 3)
        with trio.fail_after(20):
            shared = await http.get(second.url + f"/v1/streams/{new_id}")
        assert events_of(shared.content)[-1].type == "done"
    logs = [proxy.log.read_text() for proxy in (first, second)]
    assert "resumable on this process only" in logs[0]
    assert "Traceback" not in "".join(logs)
