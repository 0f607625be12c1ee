"""
Client keys end to end: with keys configured, every /v1 route wants one (Bearer or
x-api-key), and a refusal is a 401 in the protocol's own shape; /health stays open.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import trio
import trio_websocket

from tests.conftest import openai_sdk, serve_proxy, streamed_chat_text
from trioproxy import SSEDecoder, StreamEvent, parse_config

MESSAGES = [{"role": "user", "content": "hello keys"}]
KEYS = "key-one, key-two"


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> str:
    config = parse_config(
        {
            "auth": {"keys": ["key-in-file"], "keys_env": "PROXY_KEYS"},
            "providers": {"sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0}},
        },
        environ={"PROXY_KEYS": KEYS},
    )
    return await serve_proxy(nursery, config)


async def test_the_sdk_with_a_key_streams(proxy: str) -> None:
    for key in ("key-one", "key-two", "key-in-file"):
        async with openai_sdk(proxy, key) as sdk:
            stream = await sdk.chat.completions.create(model="sim/echo", messages=MESSAGES, stream=True)
            text = await streamed_chat_text(stream)
        assert text == "hello keys"


async def test_the_sdk_without_a_valid_key_gets_authentication_error(proxy: str) -> None:
    async with openai_sdk(proxy, "key-on") as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.chat.completions.create(model="sim/echo", messages=MESSAGES, stream=True)
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    assert info.value.response.headers["www-authenticate"] == "Bearer"


async def test_x_api_key_and_bearer_both_work_and_health_stays_open(proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(proxy + "/health")).status_code == 200
        assert (await http.get(proxy + "/v1/models")).status_code == 401
        assert (await http.get(proxy + "/v1/models", headers={"x-api-key": "key-two"})).status_code == 200
        ok = await http.get(proxy + "/v1/models", headers={"authorization": "Bearer key-one"})
        assert ok.status_code == 200
        assert (await http.get(proxy + "/v1/models", headers={"authorization": "Basic key-one"})).status_code == 401


@pytest.mark.parametrize("path", ["/v1/chat/stream", "/v1/chat/stream/json"])
async def test_generic_endpoints_refuse_with_an_error_event(proxy: str, path: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(proxy + path, json={"model": "sim/echo", "messages": MESSAGES})
    assert response.status_code == 401
    if path.endswith("/json"):
        event = StreamEvent.from_json(response.text.strip())
    else:
        event = StreamEvent.from_json(SSEDecoder().feed(response.content)[0].data)
    assert event.type == "error"
    assert event.data["status"] == 401


async def test_websocket_handshake_needs_a_key(proxy: str) -> None:
    ws_url = proxy.replace("http://", "ws://") + "/v1/chat/ws"
    with pytest.raises(trio_websocket.HandshakeError):
        async with trio_websocket.open_websocket_url(ws_url):
            pass
    async with trio_websocket.open_websocket_url(ws_url, extra_headers=[(b"x-api-key", b"key-one")]) as ws:
        await ws.send_message('{"id": "a", "model": "sim/echo", "messages": [{"role": "user", "content": "hi"}]}')
        with trio.fail_after(5):
            while '"type":"done"' not in (message := await ws.get_message()):
                pass
    assert '"id":"a"' in message


async def test_metrics_want_a_key_unless_told_otherwise(nursery: trio.Nursery, proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(proxy + "/metrics")).status_code == 401
        scraped = await http.get(proxy + "/metrics", headers={"authorization": "Bearer key-one"})
        assert scraped.status_code == 200
        assert "trioproxy_active_streams" in scraped.text

        config = parse_config({"auth": {"keys": ["k"], "protect_metrics": False}})
        open_metrics = await serve_proxy(nursery, config)
        assert (await http.get(open_metrics + "/metrics")).status_code == 200
        assert (await http.get(open_metrics + "/v1/models")).status_code == 401
