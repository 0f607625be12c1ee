"""
The script a `FakeUpstream` plays for one request: a `Reply`, with its tokens, timing, tool
calls, error status and faults. Plain data, checked when built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Reply", "ToolCall"]


@dataclass(frozen=True)
class ToolCall:
    """One tool (function) call that the fake model makes after its text."""

    id: str
    name: str
    #: The JSON text of the arguments. It is streamed in several fragments: OpenAI
    #: `function.arguments` pieces, Anthropic `input_json_delta`s.
    arguments: str


@dataclass
class Reply:
    """
    What the upstream does for one request.

    A "token" is one content event: each text token, then each tool-call argument fragment.
    `interval` is slept before every token except the first. The `*_after` faults fire once
    that many tokens have been sent, so 0 means "right after the response headers" (and after
    `ttft`). A count larger than the number of tokens never fires. If several faults share the
    same count, reset wins over stall, and stall wins over error.

    For a non-streaming request, `headers_delay` and then `ttft` pass before the JSON body is
    sent. `reset_after` (any value) aborts the connection instead, `stall_after` (any value)
    never answers, and `error_after` (any value) answers 500 with an error body.

    With `raw_body`, the response uses `status` and the text/event-stream content type, and
    `raw_body` is sent as one write after `ttft`. Then, if `reset_after` is set, the connection
    is reset before the terminating chunk; if `stall_after` is set, the server stalls. This is
    how to produce a truncated stream.
    """

    tokens: Sequence[str] = ("Hello", ",", " world", "!")
    #: Seconds after the response headers before the first token.
    ttft: float = 0.0
    #: Seconds between tokens.
    interval: float = 0.0
    #: Non-2xx: a JSON error body in the route's own error shape, no stream.
    status: int = 200
    error_message: str = "upstream failure"
    #: Extra response headers, e.g. `{"retry-after": "2"}`. They replace defaults of the same name.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds before even the response headers are sent.
    headers_delay: float = 0.0
    #: After N tokens, abort the TCP connection (RST) without finishing the response.
    reset_after: int | None = None
    #: After N tokens, send nothing more and keep the connection open until the client goes away.
    stall_after: int | None = None
    #: After N tokens, send an in-stream error event (OpenAI `data: {"error": ...}`, Anthropic
    #: `event: error` with `overloaded_error`), then end the response cleanly, with no
    #: `[DONE]` and no `message_stop`.
    error_after: int | None = None
    #: Streamed after the text tokens, each one's arguments in several fragments.
    tool_calls: Sequence[ToolCall] = ()
    #: Defaults to "stop", or to "tool_calls" when there are tool calls. The Anthropic route
    #: maps stop, tool_calls and length to end_turn, tool_use and max_tokens, and passes any
    #: other value through unchanged.
    finish_reason: str | None = None
    #: (prompt_tokens, completion_tokens). A completion count of 0 means `len(tokens)`.
    usage: tuple[int, int] = (7, 0)
    #: Of the prompt tokens, how many were read from the upstream's prompt cache: OpenAI's
    #: `prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens` (its
    #: `input_tokens` then counts the rest). 0: not reported at all.
    cached_tokens: int = 0
    #: Send exactly these bytes as the body instead of a generated stream, for malformed
    #: SSE or truncated JSON.
    raw_body: bytes | None = None
    #: OpenAI: leave out `data: [DONE]`. Anthropic: leave out `message_stop`.
    omit_done: bool = False
    #: When the request ends with an assistant message (an Anthropic prefill, or vLLM's
    #: `continue_final_message`), continue it as a model would: stream only what follows its
    #: text in `tokens` (joined), from the token it ends in. A text that `tokens` do not start
    #: with is answered 400.
    continues: bool = False
    #: When the request ends with an assistant message, answer 400 as an upstream that takes
    #: no prefill ("This model does not support assistant message prefill").
    refuse_continuation: bool = False

    def __post_init__(self) -> None:
        for name in ("ttft", "interval", "headers_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"Reply.{name} must be >= 0")
        if not 200 <= self.status <= 599:
            raise ValueError("Reply.status must be a final status code (200-599)")
        for name in ("reset_after", "stall_after", "error_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Reply.{name} must be >= 0 or None")
