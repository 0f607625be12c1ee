"""
Python clients for trioproxy (and any OpenAI-compatible server), built on the project's own
spec-conformant SSE decoder rather than the SDKs' lenient ones.

This is the client-side httpx edge: httpx's exceptions are mapped to trioproxy's here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from ._exceptions import TrioproxyError, UpstreamConnectError, UpstreamProtocolError, UpstreamStatusError
from ._sse import SSEDecodeError, SSEDecoder

__all__ = ["ChatResult", "stream_chat_completion"]


@dataclass(frozen=True, slots=True)
class ChatResult:
    text: str
    ttft: float | None
    """Seconds from sending the request to the first content."""
    duration: float
    chunks: int
    finish_reason: str | None
    usage: dict[str, Any] | None


async def stream_chat_completion(
    base_url: str,
    *,
    model: str,
    messages: Sequence[dict[str, Any]],
    on_text: Callable[[str], None],
    api_key: str | None = None,
    max_tokens: int | None = None,
    timeout: float = 300.0,
) -> ChatResult:
    """
    Stream `POST {base_url}/v1/chat/completions`, calling `on_text` with each piece of text
    as it arrives. Raises a `TrioproxyError` for an error status, an in-stream error, a broken
    connection or a stream that ends without `[DONE]`.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/v1/chat/completions"

    started = time.perf_counter()
    ttft = None
    parts: list[str] = []
    chunks = 0
    finish_reason = None
    usage = None
    decoder = SSEDecoder()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0)) as client:
            async with client.stream("POST", url, headers=headers, content=orjson.dumps(body)) as response:
                if response.status_code != 200:
                    raise _status_error(response.status_code, await response.aread())
                async for data in response.aiter_bytes():
                    for event in decoder.feed(data):
                        if event.data.startswith("[DONE]"):
                            return ChatResult(
                                "".join(parts), ttft, time.perf_counter() - started, chunks, finish_reason, usage
                            )
                        chunk = orjson.loads(event.data)
                        if "error" in chunk:
                            raise _status_error(502, event.data.encode())
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or []:
                            finish_reason = choice.get("finish_reason") or finish_reason
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                if ttft is None:
                                    ttft = time.perf_counter() - started
                                chunks += 1
                                parts.append(text)
                                on_text(text)
    except httpx.TimeoutException as exc:
        raise UpstreamConnectError(f"timed out talking to {url}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamConnectError(f"cannot stream from {url}: {exc or type(exc).__name__}") from exc
    except (SSEDecodeError, orjson.JSONDecodeError) as exc:
        raise UpstreamProtocolError(f"malformed stream from {url}: {exc}") from exc
    raise UpstreamProtocolError("the stream ended without [DONE]: the answer may be incomplete")


def _status_error(status: int, body: bytes) -> TrioproxyError:
    try:
        error = orjson.loads(body).get("error") or {}
        message = error.get("message") or body.decode("utf-8", "replace")
    except (orjson.JSONDecodeError, AttributeError):
        message = body.decode("utf-8", "replace")
    return UpstreamStatusError(message[:500], status=status)
