"""
The Anthropic front's renderer: session items as Messages API events, exactly as the API
streams them (`sse_protocol.md` §5): `message_start`, then each content block's
`content_block_start`, deltas and `content_block_stop`, then `message_delta` (stop reason,
usage) and `message_stop`; every event named, with the same `type` in its data.

Two sources, one stream. A delta that still carries an Anthropic upstream's own event
(`Delta.raw`) is forwarded as is: thinking signatures, citations and server-tool blocks reach
the client untouched. Any other delta (another upstream, or a stage that changed content) is
rendered into blocks here: text → `text_delta`, reasoning → a thinking block (with its
signature, when Anthropic signed it), tool-call fragments → a `tool_use` block with
`input_json_delta`s. A stopped block takes no more deltas: an upstream that goes back to a
tool call after starting another (Chat Completions may) is refused (`UpstreamProtocolError`).

What the client sees is decided by the stream, not by each delta:

- Until the first token, the upstream's events wait here (a few, bounded): a failover before
  the first token starts another stream, and the client must see one `message_start` and one
  set of blocks. A retry notice drops what waited, except the `message_start`.
- A heartbeat is an `event: ping` (after the waiting `message_start`, if any).
- A continuation's text (rendered: its upstream events are not the client's) goes on in the
  forwarded text block it continues, so the client sees one block, not two.
- `message_stop` is only ever written by `done`, once the session completed, never after a
  failure; a failure after the first byte is an `event: error`.

`message_from_events` folds the same events into one `Message` object, as the SDK's
`get_final_message()` does, so a non-streaming answer carries what a stream would have.

Sans-IO.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

import orjson

from .._events import Delta, ToolCallDelta, Usage, estimated_tokens
from .._exceptions import TrioproxyError, UpstreamProtocolError
from .._sse import SSEDecoder, encode_typed_event
from ..providers.anthropic import ERROR_STATUS, STOP_REASONS

__all__ = [
    "AnthropicEventRenderer",
    "error_body",
    "error_type",
    "message_from_events",
    "model_list",
    "token_count_estimate",
]

PING: Final = b'event: ping\ndata: {"type": "ping"}\n\n'
MAX_HELD_EVENTS: Final = 64
"""Events that may wait for the first token; past it they are sent (a later failover would then show twice)."""

_TYPE_FOR_STATUS: Final = {
    **{status: type_ for type_, status in ERROR_STATUS.items()},
    503: "overloaded_error",
}


def error_type(error: TrioproxyError) -> str:
    """The Anthropic error type of `error`: its own when it is Anthropic's for its status, else its status's."""
    if ERROR_STATUS.get(error.type) == error.status:
        return error.type
    return _TYPE_FOR_STATUS.get(error.status) or ("invalid_request_error" if error.status < 500 else "api_error")


def error_body(error: TrioproxyError) -> dict[str, Any]:
    """Anthropic's error object: `{"type": "error", "error": {"type", "message"}}`."""
    return {"type": "error", "error": {"type": error_type(error), "message": error.message}}


def model_list(models: list[tuple[str, str]]) -> dict[str, Any]:
    """`GET /v1/models` in Anthropic's shape (one page), from `(model id, provider)` pairs."""
    data = [
        {"type": "model", "id": model, "display_name": model, "created_at": "1970-01-01T00:00:00Z"}
        for model, _ in models
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def token_count_estimate(prompt_chars: int) -> dict[str, Any]:
    """A `count_tokens` answer for an upstream that cannot count: about four characters a token, marked so."""
    return {"input_tokens": estimated_tokens(prompt_chars), "estimated": True}


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


class AnthropicEventRenderer:
    """
    Renders one stream's items as Messages events. `model` is the name the client asked for;
    `prompt_chars` sizes the usage estimate when the upstream reports none.
    """

    shows_notices: Final = False  # the Messages protocol has no word for a retry

    def __init__(self, *, model: str, prompt_chars: int = 0) -> None:
        self.model = model
        self.id = new_message_id()
        self._prompt_chars = prompt_chars
        self._message_start: bytes | None = None
        """The `message_start` to send, until it is sent."""
        self._started = False
        """A `message_start` was sent or is waiting: any other is a failover's, and dropped."""
        self._held: list[bytes] = []
        self._streaming = False
        """A token was sent: events go out as they come."""
        self._open: tuple[str, int] | None = None
        """The rendered block that is open: its kind (`text`, `thinking`, a tool index) and index."""
        self._blocks = 0
        """Blocks started so far, forwarded or rendered: the index of the next."""
        self._forwarded_text: int | None = None
        """The forwarded text block still open, if any: a continuation's rendered text goes on in it."""
        self._tool_blocks: dict[int, int] = {}
        self._stop_reason: str | None = None
        self._stop_sequence: str | None = None
        self._usage: Usage | None = None
        self._output_chars = 0
        self._message_stop: bytes | None = None
        """The upstream's own `message_stop`, which only `done` sends."""

    # ----------------------------------------------------------------------------------------
    # the renderer protocol

    def opened(self) -> bytes:
        return b""

    def heartbeat(self) -> bytes:
        out, self._message_start = (self._message_start or b""), None
        return out + PING

    def notice(self, notice: object) -> bytes:
        # The next attempt sends its own blocks, numbered from the first of the dropped ones.
        self._blocks -= sum(raw.startswith(b"event: content_block_start") for raw in self._held)
        self._held.clear()
        return b""

    def error(self, error: TrioproxyError) -> bytes:
        return encode_typed_event(error_body(error))

    def done(self, session: object = None) -> bytes:
        if self._message_stop is not None:
            return self._flush() + self._message_stop
        if not self._started:  # an answer with no content at all: still a message
            self._start()
        out = self._flush() + self._close_block()
        usage = self._usage or Usage(
            prompt_tokens=estimated_tokens(self._prompt_chars),
            completion_tokens=estimated_tokens(self._output_chars),
            estimated=True,
        )
        stop_reason = self._stop_reason or "end_turn"
        delta = {"stop_reason": stop_reason, "stop_sequence": self._stop_sequence}
        out += encode_typed_event({"type": "message_delta", "delta": delta, "usage": _usage(usage)})
        return out + encode_typed_event({"type": "message_stop"})

    def delta(self, delta: Delta) -> bytes:  # noqa: C901 - the renderer's one pass per delta, on the hot path
        if delta.raw is not None:
            return self._forward(delta)
        if delta.role and not self._started:
            self._start()
        if delta.finish_reason:
            self._stop_reason = STOP_REASONS.get(delta.finish_reason, "end_turn")
            if delta.stop_sequence is not None:
                self._stop_reason, self._stop_sequence = "stop_sequence", delta.stop_sequence
        if delta.usage is not None:
            self._usage = delta.usage
        if not (delta.has_content or delta.reasoning_signature):
            return b""
        if not self._started:
            self._start()
        out = self._flush()
        if delta.reasoning or delta.reasoning_signature:
            out += self._in_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if delta.reasoning:
            out += self._block_delta({"type": "thinking_delta", "thinking": delta.reasoning})
        if delta.reasoning_signature:
            out += self._block_delta({"type": "signature_delta", "signature": delta.reasoning_signature})
        if delta.text:
            out += self._in_block("text", {"type": "text", "text": ""})
            out += self._block_delta({"type": "text_delta", "text": delta.text})
            self._output_chars += len(delta.text)
        for call in delta.tool_calls:
            out += self._tool_call(call)
        return out

    # ----------------------------------------------------------------------------------------
    # the upstream's own events

    def _forward(self, delta: Delta) -> bytes:
        raw = delta.raw
        assert raw is not None
        if delta.role:  # message_start
            if self._started:
                return b""
            self._started = True
            self._message_start = raw
            return b""
        if delta.usage is not None:  # message_stop: usage is reported with it
            self._message_stop = raw
            return b""
        if raw.startswith(b"event: content_block_start"):
            self._blocks += 1
        elif raw.startswith(b"event: content_block_stop"):
            self._forwarded_text = None
        if delta.has_content:
            self._streaming = True
            if delta.text:
                self._forwarded_text = self._blocks - 1
            return self._flush() + raw
        if self._streaming:
            return raw
        self._held.append(raw)
        if len(self._held) > MAX_HELD_EVENTS:
            self._streaming = True
            return self._flush()
        return b""

    def _flush(self) -> bytes:
        """What waited for the first token (and the `message_start`), now that it is here."""
        self._streaming = True
        out = self._message_start or b""
        self._message_start = None
        if self._held:
            out += b"".join(self._held)
            self._held.clear()
        return out

    # ----------------------------------------------------------------------------------------
    # events rendered from the common model

    def _start(self) -> None:
        self._started = True
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        self._message_start = encode_typed_event({"type": "message_start", "message": message})

    def _in_block(self, kind: str, block: dict[str, Any]) -> bytes:
        """Open a block of `kind` unless one is open (text goes on in a forwarded text block still open)."""
        if self._open is not None and self._open[0] == kind:
            return b""
        if kind == "text" and self._open is None and self._forwarded_text is not None:
            self._open, self._forwarded_text = ("text", self._forwarded_text), None
            return b""
        out = self._close_block()
        self._open = (kind, self._blocks)
        self._blocks += 1
        return out + encode_typed_event({"type": "content_block_start", "index": self._open[1], "content_block": block})

    def _close_block(self) -> bytes:
        """Stop the open block: a rendered one, or the forwarded text block a continuation would have gone on in."""
        if self._open is not None:
            index = self._open[1]
        elif self._forwarded_text is not None:
            index = self._forwarded_text
        else:
            return b""
        self._open = self._forwarded_text = None
        return encode_typed_event({"type": "content_block_stop", "index": index})

    def _block_delta(self, body: dict[str, Any], index: int | None = None) -> bytes:
        assert self._open is not None
        at = self._open[1] if index is None else index
        return encode_typed_event({"type": "content_block_delta", "index": at, "delta": body})

    def _tool_call(self, call: ToolCallDelta) -> bytes:
        out = b""
        index = self._tool_blocks.get(call.index)
        if index is None:
            tool_id = call.id or f"toolu_{self.id.removeprefix('msg_')}_{call.index}"
            block = {"type": "tool_use", "id": tool_id, "name": call.name or "", "input": {}}
            out += self._in_block(f"tool {call.index}", block)
            index = self._tool_blocks[call.index] = self._blocks - 1
        elif self._open != (f"tool {call.index}", index):  # its block was stopped: it takes no more deltas
            raise UpstreamProtocolError(f"the upstream went back to tool call {call.index} after starting another")
        if call.arguments:
            self._output_chars += len(call.arguments)
            out += self._block_delta({"type": "input_json_delta", "partial_json": call.arguments}, index)
        return out


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: input tokens exclude what was read from or written to the cache."""
    cached = (usage.cache_read_tokens or 0) + (usage.cache_creation_tokens or 0)
    out = {"input_tokens": max(usage.prompt_tokens - cached, 0), "output_tokens": usage.completion_tokens}
    if usage.cache_creation_tokens is not None:
        out["cache_creation_input_tokens"] = usage.cache_creation_tokens
    if usage.cache_read_tokens is not None:
        out["cache_read_input_tokens"] = usage.cache_read_tokens
    return out


def message_from_events(stream: bytes) -> dict[str, Any]:
    """
    The `Message` a stream of Messages events describes: each block as it started, with its
    deltas applied (text, thinking, signature, citations, tool input parsed at its stop), and
    the stop reason and usage of the `message_delta`s.
    """
    message: dict[str, Any] = {}
    blocks: dict[int, dict[str, Any]] = {}
    inputs: dict[int, list[str]] = {}
    for event in SSEDecoder().feed(stream):
        payload = orjson.loads(event.data)
        kind = payload.get("type")
        if kind == "message_start":
            message = dict(payload["message"])
        elif kind == "content_block_start":
            blocks[payload["index"]] = dict(payload["content_block"])
        elif kind == "content_block_delta":
            _apply(blocks[payload["index"]], payload["delta"], inputs.setdefault(payload["index"], []))
        elif kind == "content_block_stop":
            index = payload["index"]
            if inputs.get(index):
                blocks[index]["input"] = _tool_input("".join(inputs[index]))
        elif kind == "message_delta":
            message.update(payload["delta"])
            message["usage"] = {**message.get("usage", {}), **payload.get("usage", {})}
    message["content"] = [blocks[index] for index in sorted(blocks)]
    return message


def _tool_input(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"the upstream's tool input is not JSON: {text[:200]!r}") from None


def _apply(block: dict[str, Any], delta: dict[str, Any], partial_json: list[str]) -> None:
    kind = delta.get("type")
    if kind == "text_delta":
        block["text"] = block.get("text", "") + delta["text"]
    elif kind == "thinking_delta":
        block["thinking"] = block.get("thinking", "") + delta["thinking"]
    elif kind == "signature_delta":
        block["signature"] = delta["signature"]
    elif kind == "citations_delta":
        block.setdefault("citations", []).append(delta["citation"])
    elif kind == "input_json_delta":
        partial_json.append(delta["partial_json"])
