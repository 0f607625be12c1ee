"""
Graceful shutdown as an operator sees it: a real `trioproxy serve` process in front of a real
scripted upstream, real clients (the openai SDK, httpx, a WebSocket), and SIGTERM.

The deadline's exact timing is checked on the mock clock in `tests/server/test_shutdown.py`;
here each real wait is bounded by `fail_after`, and lasts about a second.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import h11
import httpx
import openai
import orjson
import pytest
import trio
import trio_websocket

from tests.conftest import PROCESS_EXIT_BOUND, openai_sdk
from tests.test_cli import start_server
from trioproxy import SSEDecoder, StreamEvent, parse_config
from trioproxy.server._app import create_app
from trioproxy.server._shutdown import GracefulShutdown
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply, open_fake_upstream

TOKEN_INTERVAL = 0.05
SHORT = 20  # tokens: a one-second stream
LONG = 400  # tokens: twenty seconds, longer than any grace period here


def reply_for(request: RecordedRequest) -> Reply:
    """The prompt says how long the answer is."""
    length = SHORT if request.json["messages"][-1]["content"] == "short" else LONG
    return Reply(tokens=[f" t{i}" for i in range(length)], interval=TOKEN_INTERVAL)


def body(prompt: str, **extra: object) -> dict:
    return {"model": "up/m", "messages": [{"role": "user", "content": prompt}], **extra}


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery, reply_for)


class Proxy:
    """A `trioproxy serve` process and its log."""

    def __init__(self, process: trio.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.log = b""

    def signal(self) -> float:
        self.process.send_signal(signal.SIGTERM)
        return trio.current_time()

    async def wait_for_log(self, text: bytes) -> None:
        with trio.fail_after(5):
            while text not in self.log:
                data = await self.process.stderr.receive_some()
                assert data, f"the log ended before {text!r}: {self.log.decode()}"
                self.log += data

    async def wait_for_exit(self, seconds: float) -> int:
        with trio.fail_after(seconds):
            code = await self.process.wait()
            while data := await self.process.stderr.receive_some():
                self.log += data
        return code


async def start_proxy(nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream, grace: float) -> Proxy:
    config = tmp_path / "trioproxy.toml"
    config.write_text(
        f"[server]\nshutdown_grace_period = {grace}\nwrite_timeout = 5\n\n[retry]\nmax_retries = 0\n\n"
        f'[providers.up]\ntype = "openai"\nbase_url = "{upstream.url}/v1"\n'
    )
    process, url = await start_server(nursery, "--config", str(config), stderr=subprocess.PIPE)
    return Proxy(process, url)


async def test_an_idle_server_exits_at_once_on_sigterm(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    # Idle, but not new: a request went through and its client keeps the connection alive.
    proxy = await start_proxy(nursery, tmp_path, upstream, grace=30)
    async with httpx.AsyncClient() as http:
        assert (await http.post(proxy.url + "/v1/chat/completions", json=body("short"))).status_code == 200
        signalled_at = proxy.signal()
        await proxy.wait_for_log(b"drained")
        # ~0.05 s here; the bound leaves room for a busy machine. (What a long run left behind is
        # no longer collected before the exit: tests/test_cli.py.)
        assert await proxy.wait_for_exit(1.0) == 0
    assert trio.current_time() - signalled_at < 1.0
    assert b"Traceback" not in proxy.log


async def test_sigterm_lets_a_stream_in_flight_finish_and_exits_0(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    # The grace period is far longer than the stream: the process must exit when the stream
    # ends, not when the grace period does (the `fail_after`s below would fire first).
    proxy = await start_proxy(nursery, tmp_path, upstream, grace=30)
    async with openai_sdk(proxy.url) as sdk:
        stream = await sdk.chat.completions.create(**body("short"), stream=True)
        text, finish, signalled_at = "", None, None
        with trio.fail_after(PROCESS_EXIT_BOUND):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    if signalled_at is None:
                        signalled_at = proxy.signal()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        # The SDK keeps its connection open for the next request: the server closes it.
        assert await proxy.wait_for_exit(5) == 0
    assert signalled_at is not None
    assert trio.current_time() - signalled_at < 5

    assert text == "".join(f" t{i}" for i in range(SHORT))
    assert finish == "stop"
    (sent,) = upstream.requests
    assert sent.completed  # the upstream sent its whole answer: nothing was cut
    assert b"draining: 1 stream(s) in flight, 30 s grace period" in proxy.log
    assert b"drained: every stream ended by itself" in proxy.log
    assert b"Traceback" not in proxy.log


async def read_openai_sdk(url: str, first_token: dict[str, trio.Event], outcome: dict[str, object]) -> None:
    """A long stream through the SDK until the shutdown ends it: its text and error into `outcome`."""
    async with openai_sdk(url) as sdk:
        stream = await sdk.chat.completions.create(**body("long"), stream=True)
        text = ""
        with pytest.raises(openai.APIError) as raised:  # noqa: PT012 - read until the shutdown ends it, marking the first token
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    first_token["openai sdk"].set()
        outcome.update(text=text, error=raised.value)


async def read_raw(
    url: str, name: str, first_token: dict[str, trio.Event], received: dict[str, bytes], extra: dict[str, object]
) -> None:
    """A long stream's bytes, as they come, until the shutdown ends it."""
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("POST", url, json=body("long", **extra)) as response,
    ):
        assert response.status_code == 200
        data = b""
        async for piece in response.aiter_bytes():
            data += piece
            if b" t1" in data:
                first_token[name].set()
        received[name] = data


async def read_websocket(url: str, first_token: dict[str, trio.Event], received: dict[str, bytes]) -> None:
    """A long stream on a WebSocket until the shutdown closes it: its messages, then its close code and reason."""
    async with trio_websocket.open_websocket_url(url.replace("http://", "ws://", 1) + "/v1/chat/ws") as ws:
        await ws.send_message(orjson.dumps({**body("long"), "id": "a"}).decode())
        lines = []
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:  # noqa: PT012 - read until the shutdown closes it
            while True:
                lines.append(await ws.get_message())
                if '"token"' in lines[-1]:
                    first_token["websocket"].set()
        received["websocket"] = "\n".join(lines).encode()
        received["websocket close"] = f"{closed.value.reason.code} {closed.value.reason.reason}".encode()


def assert_each_stream_was_ended_by_the_shutdown(received: dict[str, bytes], sdk_outcome: dict[str, object]) -> None:
    """Each client got its text, then the error that says the server shut down, in its protocol."""
    message = "the server is shutting down and ended the stream before it completed"
    text, error = sdk_outcome["text"], sdk_outcome["error"]
    assert isinstance(error, openai.APIError)
    assert message in error.message
    assert text
    assert f"after {len(text)} characters were delivered" in error.message

    openai_events = [orjson.loads(e.data) for e in SSEDecoder().feed(received["openai sse"]) if e.data != "[DONE]"]
    assert "data: [DONE]" not in received["openai sse"].decode()
    assert all("choices" in e for e in openai_events[:-1])
    assert openai_events[-1]["error"]["code"] == "server_shutting_down"

    generic = {
        "ndjson": [StreamEvent.from_json(line) for line in received["ndjson"].decode().splitlines()],
        "resumable sse": [StreamEvent.from_json(e.data) for e in SSEDecoder().feed(received["resumable sse"])],
        "websocket": [StreamEvent.from_json(line) for line in received["websocket"].decode().splitlines()],
    }
    for name, events in generic.items():
        assert "token" in [e.type for e in events], name
        assert events[-1].type == "error", name
        assert "done" not in [e.type for e in events], name
        assert events[-1].data["code"] == "server_shutting_down", name
        assert message in events[-1].data["message"], name
        delivered = "".join(e.data for e in events if e.type == "token")
        assert events[-1].data["characters_delivered"] == len(delivered), name
    assert received["websocket close"] == b"1001 the server is shutting down"


async def test_streams_still_running_at_the_grace_deadline_end_with_an_error_and_exit_0(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Every kind of stream: the OpenAI SDK, raw OpenAI SSE, NDJSON, a resumable SSE stream, WebSocket."""
    grace = 1.0
    proxy = await start_proxy(nursery, tmp_path, upstream, grace=grace)
    names = ("openai sdk", "openai sse", "ndjson", "resumable sse", "websocket")
    first_token = {name: trio.Event() for name in names}
    ended_at: dict[str, float] = {}
    received: dict[str, bytes] = {}
    sdk_outcome: dict[str, object] = {}

    async def timed(name: str, read: Callable[[], Awaitable[None]]) -> None:
        await read()
        ended_at[name] = trio.current_time()

    with trio.fail_after(PROCESS_EXIT_BOUND):
        async with trio.open_nursery() as clients:
            clients.start_soon(timed, "openai sdk", partial(read_openai_sdk, proxy.url, first_token, sdk_outcome))
            for name, path, extra in (
                ("openai sse", "/v1/chat/completions", {"stream": True}),
                ("ndjson", "/v1/chat/stream/json", {}),
                ("resumable sse", "/v1/chat/stream", {}),
            ):
                clients.start_soon(timed, name, partial(read_raw, proxy.url + path, name, first_token, received, extra))
            clients.start_soon(timed, "websocket", partial(read_websocket, proxy.url, first_token, received))
            for started in first_token.values():
                await started.wait()
            signalled_at = proxy.signal()

    assert await proxy.wait_for_exit(8) == 0
    assert trio.current_time() - signalled_at < grace + 2  # not hypercorn's later cut (grace + write_timeout)
    assert set(ended_at) == set(names)
    for name, at in ended_at.items():  # each stream ran on through the grace period, then ended
        assert grace - 0.1 <= at - signalled_at < grace + 1.5, name

    assert_each_stream_was_ended_by_the_shutdown(received, sdk_outcome)

    assert upstream.request_count == 5
    for sent in upstream.requests:  # every upstream saw its client, the proxy, hang up
        assert sent.disconnected.is_set()
        assert not sent.completed
    assert b"draining: 5 stream(s) in flight, 1 s grace period" in proxy.log
    assert b"(the grace period is over): interrupted 5 stream(s)" in proxy.log
    assert b"Traceback" not in proxy.log


async def test_work_arriving_during_the_drain_is_refused_and_a_second_signal_ends_it(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    """
    hypercorn refuses new connections at once; what still reaches the app is refused with a
    503: a request whose body was still arriving, a new stream on an open WebSocket.
    """
    proxy = await start_proxy(nursery, tmp_path, upstream, grace=30)
    port = int(proxy.url.rsplit(":", 1)[1])
    ws_url = proxy.url.replace("http://", "ws://", 1) + "/v1/chat/ws"
    with trio.fail_after(PROCESS_EXIT_BOUND):
        async with trio_websocket.open_websocket_url(ws_url) as ws:
            await ws.send_message(orjson.dumps({**body("long"), "id": "a"}).decode())
            while '"token"' not in await ws.get_message():
                pass
            # a POST that has sent its head and half its body when the signal comes
            payload = orjson.dumps(body("short", stream=True))
            post = await trio.open_tcp_stream("127.0.0.1", port)
            http = h11.Connection(h11.CLIENT)
            head = h11.Request(
                method="POST",
                target="/v1/chat/completions",
                headers=[
                    ("host", "proxy"),
                    ("content-type", "application/json"),
                    ("content-length", str(len(payload))),
                ],
            )
            await post.send_all(http.send(head) + http.send(h11.Data(data=payload[:10])))

            proxy.signal()
            await proxy.wait_for_log(b"draining: 1 stream(s) in flight")

            with pytest.raises(httpx.ConnectError):  # no new connection is accepted
                async with httpx.AsyncClient() as client:
                    await client.get(proxy.url + "/health")

            await post.send_all(http.send(h11.Data(data=payload[10:])) + http.send(h11.EndOfMessage()))
            response, answer = None, b""
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await post.receive_some())
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    answer += event.data
                else:
                    break
            assert response is not None
            assert response.status_code == 503
            assert dict(response.headers)[b"retry-after"] == b"1"
            assert orjson.loads(answer)["error"]["code"] == "server_shutting_down"
            assert "takes no new requests" in orjson.loads(answer)["error"]["message"]
            assert await post.receive_some() == b""  # and the connection is closed

            await ws.send_message(orjson.dumps({**body("short"), "id": "b"}).decode())
            refused, tokens_for_a = None, 0
            while refused is None or tokens_for_a < 3:  # "a" runs on while "b" is refused
                message = orjson.loads(await ws.get_message())
                if message["id"] == "b":
                    refused = message
                elif message["type"] == "token":
                    tokens_for_a += 1
            assert refused["type"] == "error"
            assert refused["data"]["status"] == 503
            assert refused["data"]["code"] == "server_shutting_down"
            assert upstream.request_count == 1  # neither refused request reached the upstream

            proxy.signal()  # a second signal: no more waiting
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:  # noqa: PT012 - read until the shutdown closes it
                while True:
                    last = orjson.loads(await ws.get_message())
            assert last["id"] == "a"
            assert last["type"] == "error"
            assert last["data"]["code"] == "server_shutting_down"
            assert closed.value.reason.code == 1001

    assert await proxy.wait_for_exit(8) == 0
    assert b"(asked again to stop): interrupted 1 stream(s)" in proxy.log
    assert b"Traceback" not in proxy.log


async def never() -> None:
    await trio.sleep_forever()


async def test_while_draining_health_says_so_and_every_route_answers_503_in_its_shape() -> None:
    """
    hypercorn closes idle connections when the drain begins, so these requests hardly ever
    reach a draining server: this is what the app answers when one does.
    """
    shutdown = GracefulShutdown(grace_period=30)
    app = create_app(parse_config({}, environ={}), shutdown=shutdown)
    async with app.test_app() as test_app, trio.open_nursery() as nursery:
        client = test_app.test_client()
        assert (await client.get("/health")).status_code == 200
        await nursery.start(shutdown.drain, never)

        health = await client.get("/health")
        assert health.status_code == 503
        assert (await health.get_json())["status"] == "draining"

        chat = await client.post("/v1/chat/completions", json=body("hi", stream=True))
        assert chat.status_code == 503
        assert chat.headers["retry-after"] == "1"
        assert chat.headers["connection"] == "close"
        assert (await chat.get_json())["error"]["code"] == "server_shutting_down"

        for path, content_type in (
            ("/v1/chat/stream", "text/event-stream"),
            ("/v1/chat/stream/json", "application/x-ndjson"),
        ):
            response = await client.post(path, json=body("hi"))
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "1", path
            assert response.content_type == content_type
            data = (await response.get_data()).decode()
            event = StreamEvent.from_json(data.removeprefix("data: ").strip())
            assert event.type == "error", path
            assert event.data["status"] == 503, path
        nursery.cancel_scope.cancel()


async def test_sigterm_lets_a_responses_websocket_finish_its_response_then_closes_it(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Responses' WebSocket mode: the response running ends whole, then the connection closes with 1001."""
    proxy = await start_proxy(nursery, tmp_path, upstream, grace=30)
    url = proxy.url.replace("http://", "ws://", 1) + "/v1/responses"
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({"type": "response.create", "model": "up/m", "input": "short"}).decode())
        kinds = []
        with trio.fail_after(PROCESS_EXIT_BOUND), pytest.raises(trio_websocket.ConnectionClosed) as closed:  # noqa: PT012 - as above
            while True:
                kinds.append(orjson.loads(await ws.get_message())["type"])
                if kinds[-1] == "response.output_text.delta" and kinds.count(kinds[-1]) == 1:
                    proxy.signal()
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == SHORT
    assert (closed.value.reason.code, closed.value.reason.reason) == (1001, "the server is shutting down")
    assert await proxy.wait_for_exit(10) == 0
