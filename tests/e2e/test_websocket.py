"""
The WebSocket endpoints (`/v1/chat/ws`, `/v1/stream/ws/{client_id}`) end to end, on real
hypercorn and a real scripted upstream on 127.0.0.1:0, driven by `WebSocketClient` and by a
raw trio-websocket connection (for messages the client would never send).
"""

from __future__ import annotations

from contextlib import aclosing

import orjson
import pytest
import trio
import trio_websocket

from tests.conftest import free_port, proxy_config
from trioproxy import StreamEvent, serve
from trioproxy._exceptions import UpstreamConnectError
from trioproxy.client import WebSocketClient
from trioproxy.server._websocket import MAX_STREAMS
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply, open_fake_upstream

TOKENS = ("The", " quick", " brown", " fox", " jumps")


def reply_for(request: RecordedRequest) -> Reply:
    """`slow`: a long stream; `stall`: one token, then silence; anything else: TOKENS."""
    prompt = request.json["messages"][-1]["content"]
    if prompt == "slow":
        return Reply(tokens=("tick",) * 2000, interval=0.01)
    if prompt == "stall":
        return Reply(tokens=("tick", "tock"), stall_after=1)
    return Reply(tokens=TOKENS, interval=0.02)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery, reply_for)


def ws(url: str, path: str = "/v1/chat/ws") -> str:
    return url.replace("http://", "ws://", 1) + path


def request(prompt: str, request_id: str | None = None, **extra: object) -> dict:
    body = {"provider": "up", "model": "m", "messages": [{"role": "user", "content": prompt}], **extra}
    if request_id is not None:
        body["id"] = request_id
    return body


def upstream_request(upstream: FakeUpstream, prompt: str) -> RecordedRequest:
    (found,) = [r for r in upstream.requests if r.json["messages"][-1]["content"] == prompt]
    return found


async def wait_for_prompt(upstream: FakeUpstream, prompt: str, count: int = 1) -> list[RecordedRequest]:
    """The upstream requests for `prompt`, once `count` of them have arrived."""
    with trio.fail_after(2):
        while len(found := [r for r in upstream.requests if r.json["messages"][-1]["content"] == prompt]) < count:
            await upstream.wait_for_requests(upstream.request_count + 1)
    return found


def text(events: list[StreamEvent]) -> str:
    return "".join(e.data for e in events if e.type in ("token", "chunk"))


async def receive_json(connection: trio_websocket.WebSocketConnection) -> dict:
    with trio.fail_after(2):
        return orjson.loads(await connection.get_message())


async def test_two_streams_on_one_connection_cancel_one(proxy_url: str, upstream: FakeUpstream) -> None:
    slow_events: list[StreamEvent] = []
    fast_events: list[StreamEvent] = []

    async with WebSocketClient.connect(ws(proxy_url)) as client:
        slow = client.stream(request("slow", "a"))
        fast = client.stream(request("fast", "b"))
        first_token = trio.Event()

        async def consume(stream, events: list[StreamEvent]) -> None:
            async for event in stream:
                events.append(event)
                if event.type == "token":
                    first_token.set()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, slow, slow_events)
                nursery.start_soon(consume, fast, fast_events)
                await first_token.wait()
                await wait_for_prompt(upstream, "slow")
                await client.cancel(slow.id)
                with trio.fail_after(1):
                    await upstream_request(upstream, "slow").disconnected.wait()

    assert slow_events[0].type == "metadata"
    assert slow_events[0].data == "stream_start"
    assert slow_events[-1].type == "error"
    assert slow_events[-1].data["type"] == "cancelled"
    assert 0 < len(text(slow_events)) < 2000 * len("tick")
    assert slow_events[-1].data["characters_delivered"] == len(text(slow_events))
    assert [e.type for e in fast_events] == ["metadata"] + ["token"] * len(TOKENS) + ["done"]
    assert text(fast_events) == "".join(TOKENS)
    assert fast_events[-1].metadata["characters"] == len("".join(TOKENS))
    assert not upstream_request(upstream, "fast").disconnected.is_set()


async def test_leaving_a_stream_early_cancels_it(proxy_url: str, upstream: FakeUpstream) -> None:
    async with WebSocketClient.connect(ws(proxy_url)) as client:
        async with aclosing(aiter(client.stream(request("slow")))) as events:
            async for event in events:
                if event.type == "token":
                    break
        with trio.fail_after(1):
            await (await wait_for_prompt(upstream, "slow"))[0].disconnected.wait()
        # The connection still serves.
        assert text([e async for e in client.stream(request("fast"))]) == "".join(TOKENS)


async def test_events_carry_their_id_and_the_generic_metadata(proxy_url: str) -> None:
    async with trio_websocket.open_websocket_url(ws(proxy_url)) as connection:
        await connection.send_message(orjson.dumps(request("fast", "r1")).decode())
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(await receive_json(connection))
        handshake = dict(connection.handshake_headers)

    assert {m["id"] for m in messages} == {"r1"}
    start = messages[0]
    assert start["type"] == "metadata"
    assert start["data"] == "stream_start"
    assert start["metadata"]["provider"] == "up"
    assert start["metadata"]["model"] == "m"
    assert start["metadata"]["request_id"].startswith("req_")
    # the connection's id, as the handshake and the access log give it
    assert start["metadata"]["request_id"] == handshake[b"x-request-id"].decode()
    assert "client_id" not in start["metadata"]
    assert messages[-1]["type"] == "done"
    assert messages[-1]["metadata"]["finish_reason"] == "stop"


async def test_malformed_messages_get_error_events_and_the_connection_keeps_working(proxy_url: str) -> None:
    async with trio_websocket.open_websocket_url(ws(proxy_url)) as connection:

        async def error_for(message: str) -> dict:
            await connection.send_message(message)
            reply = await receive_json(connection)
            assert reply["type"] == "error", reply
            assert reply["data"]["type"] == "invalid_request_error"
            return reply

        assert "id" not in await error_for("not json")
        assert "id" not in await error_for("[1, 2]")
        assert "id" not in await error_for(orjson.dumps({"model": "up/m", "messages": []}).decode())
        missing = await error_for(orjson.dumps({"id": "x", "model": "up/m"}).decode())
        assert missing["id"] == "x"
        assert "messages" in missing["data"]["message"]
        unknown = await error_for(orjson.dumps({"id": "y", "type": "subscribe"}).decode())
        assert unknown["id"] == "y"

        # An unknown model is an in-stream error of that request, not a closed connection.
        await connection.send_message(orjson.dumps({**request("fast", "z"), "provider": "nope"}).decode())
        unroutable = await receive_json(connection)
        assert unroutable["id"] == "z"
        assert unroutable["type"] == "error"

        # A second request with the id of a running stream is refused; the first goes on.
        await connection.send_message(orjson.dumps(request("stall", "dup")).decode())
        assert (await receive_json(connection))["data"] == "stream_start"
        assert (await receive_json(connection))["data"] == "tick"
        duplicate = await error_for(orjson.dumps(request("fast", "dup")).decode())
        assert duplicate["id"] == "dup"
        assert "already running" in duplicate["data"]["message"]
        await connection.send_message(orjson.dumps({"type": "cancel", "id": "dup"}).decode())
        cancelled = await receive_json(connection)
        assert cancelled["id"] == "dup"
        assert cancelled["data"]["type"] == "cancelled"

        # Still serving.
        await connection.send_message(orjson.dumps(request("fast", "ok")).decode())
        messages = [await receive_json(connection) for _ in range(len(TOKENS) + 2)]
        assert [m["type"] for m in messages] == ["metadata"] + ["token"] * len(TOKENS) + ["done"]


async def test_an_error_frame_is_one_json_object_and_nothing_after(proxy_url: str) -> None:
    """Every frame is exactly its event's JSON, as a stream's are: no newline to strip."""
    async with trio_websocket.open_websocket_url(ws(proxy_url)) as connection:
        await connection.send_message(orjson.dumps({"id": "y", "type": "subscribe"}).decode())
        with trio.fail_after(2):
            frame = await connection.get_message()
    assert frame == (
        '{"type":"error","data":{"message":"unknown message type \'subscribe\': \'request\' or \'cancel\'",'
        '"type":"invalid_request_error","code":null,"status":400},"metadata":{},"id":"y"}'
    )


async def test_closing_the_socket_cancels_every_stream(proxy_url: str, upstream: FakeUpstream) -> None:
    async with trio_websocket.open_websocket_url(ws(proxy_url)) as connection:
        for request_id in ("s1", "s2"):
            await connection.send_message(orjson.dumps(request("stall", request_id)).decode())
        stalled = await wait_for_prompt(upstream, "stall", 2)
    # The block closed the socket.
    with trio.fail_after(1):
        for recorded in stalled:
            await recorded.disconnected.wait()


async def test_at_most_max_streams_per_connection(proxy_url: str, upstream: FakeUpstream) -> None:
    async with trio_websocket.open_websocket_url(ws(proxy_url), message_queue_size=4 * MAX_STREAMS) as connection:
        for i in range(MAX_STREAMS):
            await connection.send_message(orjson.dumps(request("stall", f"s{i}")).decode())
        await wait_for_prompt(upstream, "stall", MAX_STREAMS)
        await connection.send_message(orjson.dumps(request("stall", "one-too-many")).decode())
        with trio.fail_after(2):
            while True:
                message = orjson.loads(await connection.get_message())
                if message["id"] == "one-too-many":
                    break
    assert message["type"] == "error"
    assert str(MAX_STREAMS) in message["data"]["message"]
    assert len(upstream.requests) == MAX_STREAMS


async def test_per_client_endpoint(proxy_url: str) -> None:
    async with WebSocketClient.connect(ws(proxy_url, "/v1/stream/ws/alice")) as client:
        events = [event async for event in client.stream(request("fast"))]
    assert events[0].metadata["client_id"] == "alice"
    assert events[0].metadata["provider"] == "up"
    assert text(events) == "".join(TOKENS)
    assert events[-1].type == "done"


async def test_client_yields_the_servers_error_event(proxy_url: str) -> None:
    async with WebSocketClient.connect(ws(proxy_url)) as client:
        events = [
            event async for event in client.stream({"model": "nope/m", "messages": [{"role": "user", "content": "x"}]})
        ]
    assert [e.type for e in events] == ["error"]
    assert events[0].data["type"] == "not_found_error"


async def test_client_raises_when_the_server_goes_away(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    server_scope = trio.CancelScope()

    async def run_proxy(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await serve(proxy_config(upstream), host="127.0.0.1", port=0, task_status=task_status)

    (url,) = await nursery.start(run_proxy)
    events: list[StreamEvent] = []
    with trio.fail_after(3), pytest.raises(UpstreamConnectError, match="closed"):  # noqa: PT012 - read, stopping the server at the first token
        async with WebSocketClient.connect(ws(url)) as client:
            async for event in client.stream(request("slow")):
                events.append(event)
                if event.type == "token":
                    server_scope.cancel()
    assert events
    assert events[-1].type == "token"


async def test_client_cannot_connect_to_nothing() -> None:
    with trio.fail_after(3), pytest.raises(UpstreamConnectError, match="cannot open"):
        async with WebSocketClient.connect(f"ws://127.0.0.1:{free_port()}/v1/chat/ws"):
            pass
