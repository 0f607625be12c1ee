"""
The OpenAI front adapter: deltas rendered as Chat Completions, exactly as `sse_protocol.md`
§4 prescribes — `data: <chunk>` events only (no `id:`, `event:` or `retry:` lines, which
break the official SDKs), a usage chunk with `choices: []` only when the client asked for
it, `data: [DONE]` only after a stream that really ended, and failures as OpenAI's error
object.

A delta that still carries the upstream's own chunk event (`Delta.raw`) is forwarded as is.

Sans-IO.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Final

import orjson

from .._accumulator import Accumulator
from .._events import Delta, ToolCallDelta
from .._exceptions import TrioproxyError

__all__ = ["OpenAIChunkRenderer", "completion_body", "error_body"]

DONE: Final = b"data: [DONE]\n\n"
KEEP_ALIVE: Final = b": keep-alive\n\n"


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def error_body(error: TrioproxyError) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


class OpenAIChunkRenderer:
    """Renders one stream's deltas as `chat.completion.chunk` SSE events."""

    shows_notices: Final = False
    """The OpenAI protocol has no word for a retry: the stream stays clean."""

    def __init__(self, *, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = new_completion_id()
        self.created = int(time.time())

    def opened(self) -> bytes:
        return b""

    def done(self, session: object) -> bytes:
        return DONE

    def heartbeat(self) -> bytes:
        return KEEP_ALIVE

    def notice(self, notice: object) -> bytes:
        return b""

    def delta(self, delta: Delta) -> bytes:
        """The SSE bytes for one delta; `b""` when the client must not see it."""
        usage_only = delta.usage is not None and not (delta.has_content or delta.role or delta.finish_reason)
        if usage_only and not self.include_usage:
            return b""
        if delta.raw is not None:
            return delta.raw
        if usage_only:
            assert delta.usage is not None
            return self._event([], usage=delta.usage.to_openai())
        body: dict[str, Any] = {}
        if delta.role:
            body["role"] = delta.role
            body["content"] = delta.text
        elif delta.text:
            body["content"] = delta.text
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning  # vLLM's and DeepSeek's field
        if delta.tool_calls:
            body["tool_calls"] = [_tool_call(tc) for tc in delta.tool_calls]
        if not body and delta.finish_reason is None:
            return b""  # nothing Chat Completions has a field for (an Anthropic thinking signature)
        choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": delta.finish_reason}
        out = self._event([choice], usage=None)
        if delta.usage is not None and self.include_usage:
            # Usage travels in its own `choices: []` chunk (§4.3), also when it came with content.
            out += self._event([], usage=delta.usage.to_openai())
        return out

    def error(self, error: TrioproxyError) -> bytes:
        return b"data: " + orjson.dumps(error_body(error)) + b"\n\n"

    def _event(self, choices: list[dict[str, Any]], *, usage: dict[str, int] | None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _tool_call(tc: ToolCallDelta) -> dict[str, Any]:
    call: dict[str, Any] = {"index": tc.index}
    if tc.id is not None:
        call["id"] = tc.id
        call["type"] = "function"
    function: dict[str, str] = {}
    if tc.name is not None:
        function["name"] = tc.name
    if tc.arguments or tc.name is not None:
        function["arguments"] = tc.arguments
    if function:
        call["function"] = function
    return call


def completion_body(acc: Accumulator, *, model: str, prompt_chars: int) -> dict[str, Any]:
    """A whole `chat.completion` object from an accumulated stream (non-streaming requests)."""
    tool_calls = acc.tool_calls()
    message: dict[str, Any] = {"role": "assistant", "content": acc.text or None, "refusal": None}
    if acc.reasoning:
        message["reasoning_content"] = acc.reasoning  # vLLM's and DeepSeek's field
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = acc.usage_or_estimate(prompt_chars)
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": acc.finish_reason or "stop"}],
        "usage": usage.to_openai(),
    }
