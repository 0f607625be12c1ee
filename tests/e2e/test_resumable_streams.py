"""
Resumable, shareable streams end to end (issue 4 §3): a real hypercorn on 127.0.0.1:0, the
scripted upstream, and clients that disconnect, resume with `Last-Event-ID`, and watch one
generation together. Grace periods and retention are short and real (fractions of a second):
the server and the upstream run on sockets, outside any mock clock. So these tests assert only
bounds a busy machine cannot break (a grace period is never cut short, a stream never expires
early); the exact instants are checked on MockClock in tests/server/test_streams.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from tests.conftest import proxy_config, serve_proxy, wait_until
from trioproxy import SSEDecoder, StreamEvent
from trioproxy._policy import StreamsConfig
from trioproxy.client import SSEClient
from trioproxy.testing import FakeUpstream, Reply

TOKENS = tuple(f" w{i}" for i in range(20))
TEXT = "".join(TOKENS)
MESSAGES = [{"role": "user", "content": "go"}]
BODY = {"model": "up/m", "messages": MESSAGES}


async def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream, **streams: float) -> str:
    config = dataclasses.replace(proxy_config(upstream), streams=StreamsConfig(**streams))
    return await serve_proxy(nursery, config)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def read_events(response: httpx.Response, limit: int | None = None) -> list[StreamEvent]:
    """Events of `response` (each with its id), stopping after `limit` of them."""
    decoder = SSEDecoder()
    events: list[StreamEvent] = []
    async for data in response.aiter_bytes():
        for sse in decoder.feed(data):
            events.append(StreamEvent.from_json(sse.data, id=sse.id or None))
            if limit is not None and len(events) >= limit:
                return events
    return events


async def sse_client_events(client: SSEClient, into: list[StreamEvent] | None = None) -> None:
    """Open `client` and read its events to the end (or its error), keeping them in `into`."""
    async with client as events:
        async for event in events:
            if into is not None:
                into.append(event)


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.data for e in events if e.type == "token")


async def test_disconnect_then_resume_with_last_event_id_gives_the_text_exactly_once(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS, interval=0.01))
    with trio.fail_after(10):
        async with http.stream("POST", proxy + "/v1/chat/stream", json=BODY) as response:
            stream_id = response.headers["x-stream-id"]
            first = await read_events(response, limit=5)
        assert first[0].metadata["stream_id"] == stream_id
        assert first[-1].type == "token"
        headers = {"last-event-id": first[-1].id}
        async with http.stream("GET", f"{proxy}/v1/streams/{stream_id}", headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["x-stream-id"] == stream_id
            rest = await read_events(response)

    assert int(rest[0].id) == int(first[-1].id) + 1
    ids = [int(e.id) for e in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # no gap, no duplicate
    assert text_of(first) + text_of(rest) == TEXT
    assert rest[-1].type == "done"
    assert len(upstream.requests) == 1
    assert not upstream.requests[0].disconnected.is_set()


async def test_a_stream_replays_from_the_start_without_last_event_id(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS))
    response = await http.post(proxy + "/v1/stream/sse", json=BODY)
    stream_id = response.headers["x-stream-id"]
    again = await http.get(f"{proxy}/v1/streams/{stream_id}")
    assert again.content == response.content  # byte for byte: rendered once, logged, replayed
    assert len(upstream.requests) == 1


async def test_sse_client_resumes_by_itself_when_the_connection_is_cut(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS, interval=0.01))
    cutter = CutFirstResponse(after_events=6)
    async with httpx.AsyncClient(transport=cutter) as http:
        with trio.fail_after(10):
            async with SSEClient(proxy + "/v1/chat/stream", json=BODY, http=http, backoff=0.01) as events:
                received = [event async for event in events]

    assert cutter.cut
    assert events.reconnects == 1
    assert events.stream_id is not None
    ids = [int(e.id) for e in received]
    assert ids == list(range(1, len(ids) + 1))
    assert text_of(received) == TEXT
    assert received[-1].type == "done"
    assert len(upstream.requests) == 1


async def test_sse_client_gives_up_after_max_reconnects(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    from trioproxy import UpstreamConnectError

    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS, interval=0.01))
    received: list[StreamEvent] = []
    async with httpx.AsyncClient(transport=CutFirstResponse(after_events=3, cut_resumes=True)) as http:
        client = SSEClient(proxy + "/v1/chat/stream", json=BODY, http=http, max_reconnects=2, backoff=0.01)
        with trio.fail_after(10), pytest.raises(UpstreamConnectError) as info:
            await sse_client_events(client, received)
    assert "cut by the test" in info.value.message
    assert client.reconnects == 2
    assert received
    assert received[0].type == "metadata"
    assert len(upstream.requests) == 1


async def test_sse_client_reads_a_whole_stream_and_a_stream_url(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=("a", "b")))
    async with SSEClient(proxy + "/v1/stream/sse", json=BODY) as events:
        posted = [event async for event in events]
    assert [e.type for e in posted] == ["metadata", "token", "token", "done"]
    async with SSEClient(f"{proxy}/v1/streams/{events.stream_id}") as again:
        assert [event async for event in again] == posted


async def test_sse_client_raises_the_servers_error_status(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    from trioproxy import UpstreamStatusError

    proxy = await start_proxy(nursery, upstream)
    with pytest.raises(UpstreamStatusError) as info:
        await sse_client_events(
            SSEClient(proxy + "/v1/chat/stream", json={"model": "atlantis/m", "messages": MESSAGES})
        )
    assert info.value.status == 404
    assert "atlantis" in info.value.message
    with pytest.raises(UpstreamStatusError) as info:
        await sse_client_events(SSEClient(proxy + "/v1/streams/st_nothing"))
    assert info.value.status == 404


async def test_three_watchers_receive_identical_events(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS, interval=0.02))
    results: dict[str, list[StreamEvent]] = {}

    async def watch(name: str, stream_id: str) -> None:
        async with http.stream("GET", f"{proxy}/v1/streams/{stream_id}") as response:
            results[name] = await read_events(response)

    with trio.fail_after(10):
        async with http.stream("POST", proxy + "/v1/chat/stream", json=BODY) as response:
            stream_id = response.headers["x-stream-id"]
            async with trio.open_nursery() as watchers:
                watchers.start_soon(watch, "second", stream_id)
                watchers.start_soon(watch, "third", stream_id)
                results["first"] = await read_events(response)

    assert results["first"] == results["second"] == results["third"]
    assert text_of(results["first"]) == TEXT
    assert results["first"][-1].type == "done"
    assert len(upstream.requests) == 1


async def test_no_watcher_past_the_grace_period_cancels_the_upstream(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream, resume_grace_period=0.3)
    upstream.push(Reply(tokens=TOKENS, interval=0.1))
    async with http.stream("POST", proxy + "/v1/chat/stream", json=BODY) as response:
        stream_id = response.headers["x-stream-id"]
        await read_events(response, limit=2)
        left_at = trio.current_time()  # before the close, so the grace period starts after it
    (recorded,) = upstream.requests
    with trio.fail_after(5):
        await recorded.disconnected.wait()
    assert recorded.disconnected_at is not None
    assert recorded.disconnected_at - left_at >= 0.3  # not before the grace period is over

    # A late watcher learns what happened rather than waiting for ever.
    late = await http.get(f"{proxy}/v1/streams/{stream_id}")
    events = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(late.content)]
    assert events[-1].type == "error"
    assert "no client watched" in events[-1].data["message"]
    # It says how much text the stream had delivered, as any error that ends a stream does.
    assert events[-1].data["characters_delivered"] == len(text_of(events)) > 0


async def test_a_reconnect_within_the_grace_period_keeps_the_upstream(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)  # a 30 s grace period: no window to miss
    upstream.push(Reply(tokens=TOKENS, interval=0.05))
    with trio.fail_after(10):
        async with http.stream("POST", proxy + "/v1/chat/stream", json=BODY) as response:
            stream_id = response.headers["x-stream-id"]
            first = await read_events(response, limit=3)
        # Back once the stream ran on without a watcher: the upstream sent more meanwhile.
        seen = sum(event.type == "token" for event in first)
        await wait_until(lambda: upstream.requests[0].tokens_sent >= seen + 2)
        headers = {"last-event-id": first[-1].id}
        async with http.stream("GET", f"{proxy}/v1/streams/{stream_id}", headers=headers) as response:
            rest = await read_events(response)
    assert text_of(first + rest) == TEXT
    assert rest[-1].type == "done"
    assert not upstream.requests[0].disconnected.is_set()


async def test_ndjson_and_openai_streams_still_cancel_the_upstream_at_once(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)  # a 30 s grace period applies to SSE only
    for path, body in (
        ("/v1/chat/stream/json", BODY),
        ("/v1/chat/completions", {**BODY, "stream": True}),
    ):
        upstream.push(Reply(tokens=TOKENS, interval=0.05))
        async with http.stream("POST", proxy + path, json=body) as response:
            assert "x-stream-id" not in response.headers
            async for line in response.aiter_lines():
                if "w1" in line:
                    break
        recorded = upstream.requests[-1]
        # Cancelled at once rather than after the 30 s grace (test_chat_completions measures "at once").
        with trio.fail_after(5):
            await recorded.disconnected.wait()


async def test_openai_endpoint_never_gets_event_ids(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS))
    response = await http.post(proxy + "/v1/chat/completions", json={**BODY, "stream": True})
    assert b"\nid:" not in b"\n" + response.content
    assert "x-stream-id" not in response.headers


async def test_a_finished_stream_expires_after_its_retention(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream, retention=0.3)
    upstream.push(Reply(tokens=TOKENS))
    posted_at = trio.current_time()  # the stream finishes after this, and is kept 0.3 s from then
    response = await http.post(proxy + "/v1/chat/stream", json=BODY)
    url = f"{proxy}/v1/streams/{response.headers['x-stream-id']}"
    statuses: list[int] = []

    async def expired() -> bool:
        statuses.append((await http.get(url)).status_code)
        return statuses[-1] == 404

    await wait_until(expired)
    gone_at = trio.current_time()
    assert gone_at - posted_at >= 0.3
    assert all(status == 200 for status in statuses[:-1])
    gone = await http.get(url)
    assert gone.status_code == 404
    assert gone.headers["content-type"].startswith("text/event-stream")
    (event,) = [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(gone.content)]
    assert event.type == "error"
    assert event.data["status"] == 404


async def test_bad_and_future_last_event_ids_are_400(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream)
    upstream.push(Reply(tokens=TOKENS))
    response = await http.post(proxy + "/v1/chat/stream", json=BODY)
    url = f"{proxy}/v1/streams/{response.headers['x-stream-id']}"
    for value in ("abc", "-1", "999"):
        bad = await http.get(url, headers={"last-event-id": value})
        assert bad.status_code == 400, value
        assert b'"type":"error"' in bad.content


async def test_a_resume_from_before_the_replay_log_is_410(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream, max_replay_bytes=300)
    upstream.push(Reply(tokens=TOKENS))
    response = await http.post(proxy + "/v1/chat/stream", json=BODY)
    url = f"{proxy}/v1/streams/{response.headers['x-stream-id']}"
    assert (await http.get(url, headers={"last-event-id": "1"})).status_code == 410
    last = await http.get(url, headers={"last-event-id": "21"})  # the tail is kept
    assert last.status_code == 200
    assert [StreamEvent.from_json(e.data).type for e in SSEDecoder().feed(last.content)] == ["done"]


async def test_max_streams_drops_the_oldest_finished_stream(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    proxy = await start_proxy(nursery, upstream, max_streams=2)
    ids = []
    for _ in range(3):
        upstream.push(Reply(tokens=("a",)))
        ids.append((await http.post(proxy + "/v1/chat/stream", json=BODY)).headers["x-stream-id"])
    statuses = [(await http.get(f"{proxy}/v1/streams/{i}")).status_code for i in ids]
    assert statuses == [404, 200, 200]


# -- a transport that cuts the first streamed response, as a dropped connection would --------


class CutFirstResponse(httpx.AsyncBaseTransport):
    """
    Real HTTP, except that the first POST's body breaks off after `after_events` events (and,
    with `cut_resumes`, every later response before its first byte).
    """

    def __init__(self, after_events: int, *, cut_resumes: bool = False) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.after_events = after_events
        self.cut_resumes = cut_resumes
        self.cut = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.cut and self.cut_resumes:
            after = 0
        elif self.cut or request.method != "POST":
            return response
        else:
            after = self.after_events
        self.cut = True
        assert isinstance(response.stream, httpx.AsyncByteStream)
        stream = _CutStream(response.stream, after)
        return httpx.Response(response.status_code, headers=response.headers, stream=stream)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _CutStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, after_events: int) -> None:
        self.inner = inner
        self.after_events = after_events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.inner:
            if not self.after_events:
                break
            yield chunk
            seen += chunk.count(b"\n\n")
            if seen >= self.after_events:
                break
        await self.inner.aclose()
        raise httpx.ReadError("connection cut by the test")

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_stalled_watcher_on_a_socket_is_dropped_while_the_others_finish(
    nursery: trio.Nursery, upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """
    The stalled watcher never reads its socket: once the kernel's buffers are full, its
    response cannot be written, its queue (8 writes) fills, and it is disconnected. The other
    two read all 12 MiB as fast as the upstream sends them.
    """
    proxy = await start_proxy(nursery, upstream, watcher_queue=8)
    big = tuple("x" * 65536 for _ in range(192))
    upstream.push(Reply(tokens=big, interval=0.005))  # a pace the readers keep up with on a busy machine
    host, port = httpx.URL(proxy).host, httpx.URL(proxy).port
    with trio.fail_after(20):
        async with http.stream("POST", proxy + "/v1/chat/stream", json=BODY) as response:
            stream_id = response.headers["x-stream-id"]
            stalled = await trio.open_tcp_stream(host, port)
            await stalled.send_all(f"GET /v1/streams/{stream_id} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            results: dict[str, list[StreamEvent]] = {}

            async def watch() -> None:
                async with http.stream("GET", f"{proxy}/v1/streams/{stream_id}") as other:
                    results["second"] = await read_events(other)

            async with trio.open_nursery() as watchers:
                watchers.start_soon(watch)
                results["first"] = await read_events(response)
        for events in results.values():
            assert events[-1].type == "done"
            assert text_of(events) == "".join(big)

        # Now read what the stalled watcher got: a response that ended without `done`.
        raw = b""
        while not raw.endswith(b"0\r\n\r\n"):
            chunk = await stalled.receive_some(1 << 20)
            assert chunk, "the proxy closed the connection instead of ending the response"
            raw += chunk
        await stalled.aclose()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b'"type":"token"' in raw  # it got the beginning, like any watcher
    assert b'"type":"done"' not in raw
    assert len(raw) < len("".join(big))  # it was cut off well before the end
    assert len(upstream.requests) == 1
