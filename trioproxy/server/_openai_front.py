"""
The OpenAI front adapter: deltas rendered as Chat Completions, exactly as `sse_protocol.md`
§4 prescribes — `data: <chunk>` events only (no `id:`, `event:` or `retry:` lines, which
break the official SDKs), a usage chunk with `choices: []` only when the client asked for
it, `data: [DONE]` only after a stream that really ended, and failures as OpenAI's error
object.

A delta that still carries the upstream's own chunk event (`Delta.raw`) is forwarded as is.
Legacy text completions are the same protocol with other chunks (`text_completion`, each
choice's `text`): `TextCompletionRenderer`, and `text_completion_body` for a whole answer.

Sans-IO.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, ClassVar, Final

import orjson

from .._accumulator import Accumulator
from .._events import Delta, ToolCallDelta
from .._exceptions import TrioproxyError

__all__ = ["OpenAIChunkRenderer", "TextCompletionRenderer", "completion_body", "error_body", "text_completion_body"]

DONE: Final = b"data: [DONE]\n\n"
KEEP_ALIVE: Final = b": keep-alive\n\n"


def new_completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + secrets.token_hex(12)


def error_body(error: TrioproxyError) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


class OpenAIChunkRenderer:
    """Renders one stream's deltas as `chat.completion.chunk` SSE events."""

    shows_notices: Final = False
    """The OpenAI protocol has no word for a retry: the stream stays clean."""
    chunk_object: ClassVar = "chat.completion.chunk"
    id_prefix: ClassVar = "chatcmpl-"

    def __init__(self, *, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = new_completion_id(self.id_prefix)
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
        choice = self._choice(delta)
        if choice is None:
            return b""
        out = self._event([choice], usage=None)
        if delta.usage is not None and self.include_usage:
            # Usage travels in its own `choices: []` chunk (§4.3), also when it came with content.
            out += self._event([], usage=delta.usage.to_openai())
        return out

    def _choice(self, delta: Delta) -> dict[str, Any] | None:
        """The delta's choice in the protocol's chunk; `None` when it has nothing to show."""
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
            return None  # nothing Chat Completions has a field for (an Anthropic thinking signature)
        return {"index": 0, "delta": body, "logprobs": None, "finish_reason": delta.finish_reason}

    def error(self, error: TrioproxyError) -> bytes:
        return b"data: " + orjson.dumps(error_body(error)) + b"\n\n"

    def _event(self, choices: list[dict[str, Any]], *, usage: dict[str, int] | None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


class TextCompletionRenderer(OpenAIChunkRenderer):
    """Renders one legacy completion's deltas as `text_completion` SSE events."""

    chunk_object: ClassVar = "text_completion"
    id_prefix: ClassVar = "cmpl-"

    def _choice(self, delta: Delta) -> dict[str, Any] | None:
        if not delta.text and delta.finish_reason is None:
            return None
        return {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}


def _tool_call(tc: ToolCallDelta) -> dict[str, Any]:
    call: dict[str, Any] = {"index": tc.index}
    if tc.id is not None:
        call["id"] = tc.id
        call["type"] = "function"
    function: dict[str, str] = {}
    if tc.name is not None:
        function["name"] = tc.name
    if tc.arguments or tc.name is not None or tc.id is not None:  # a call with an id has a `function`: SDKs read it
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


def text_completion_body(acc: Accumulator, *, model: str, prompt_chars: int) -> dict[str, Any]:
    """A whole legacy `text_completion` object from an accumulated stream (non-streaming requests)."""
    choice = {"index": 0, "text": acc.text, "logprobs": None, "finish_reason": acc.finish_reason or "stop"}
    return {
        "id": new_completion_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": acc.usage_or_estimate(prompt_chars).to_openai(),
    }
