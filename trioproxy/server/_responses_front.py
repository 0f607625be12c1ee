"""
The Responses front's renderer: session items as OpenAI Responses events, in the order the
API streams them (`responses_protocol.md` §2): `response.created`, `response.in_progress`,
then each output item's `output_item.added`, its parts and deltas, its `output_item.done`,
and last exactly one of `response.completed`, `response.incomplete` or `response.failed`.
Every event is named (`event:` + `data:`, the same `type` in its data) and carries its
`sequence_number`, 0 first and one more per event.

Output items, from the common model:

- text → a `message` item with one `output_text` part (`output_text.delta`s);
- reasoning → a `reasoning` item with one summary part (`reasoning_summary_text.delta`s);
- each tool call (by its index) → a `function_call` item (`function_call_arguments.delta`s),
  `call_id` the upstream's tool-call id;
- a Responses upstream's item the common model does not carry (`Delta.raw_item`: a hosted
  tool's call, a reasoning item's encrypted content) → that item whole, in its place
  (`output_item.added` and `.done`); a reasoning item's closes the reasoning item its summary
  streamed, which takes the upstream's fields.

An item is closed (its `.done` events) when the next one opens, or at the end. Ids are
stable across events (`resp_`, `msg_`, `rs_`, `fc_`), and the Response object, whole on each
lifecycle event, lists every closed item.

A Responses upstream's own events (`Delta.raw`, kept when no stage changed content) are
forwarded as they came instead: its numbering, built-in tool items and encrypted reasoning reach the client
untouched, and so does its response id, unless the store chose the id (`response_id`): the
store's then stands in the events for the upstream's. An error of ours continues the
upstream's numbering, and so does a continuation's text from an upstream of another
protocol (`trioproxy.pipeline`): it goes on in the upstream's open message item, whose
`.done` events then carry its whole text, and the Response lists the upstream's items.

What the client sees is decided by the stream:

- Nothing is sent before the first token: a failover before it starts another stream, and the
  client must see one `response.created`. A heartbeat is an SSE comment, which the SDKs skip.
- `finish_reason` `length` or `content_filter` ends with `response.incomplete` and its
  `incomplete_details`; only `done` (the session completed) writes `response.completed`.
- A failure after the first byte is an `error` event (as OpenAI nests it: the Python SDK
  raises it as an `APIError`) and then `response.failed`, whose `error` (Codex reads its
  `code`) says why and how much was delivered; its output lists the items delivered so far,
  `incomplete`.

`response_from_events` reads the Response object of the terminal event back, so that a
non-streaming answer is what a stream would have ended with.

Sans-IO.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from .._events import Delta, ToolCallDelta, Usage, estimated_tokens
from .._exceptions import StreamCancelled, TrioproxyError, UpstreamProtocolError
from .._sse import SSEDecoder, encode_typed_event

__all__ = [
    "KEEP_ALIVE",
    "TERMINAL_EVENTS",
    "ResponsesEventRenderer",
    "response_from_events",
    "websocket_frame",
]

KEEP_ALIVE: Final = b": keep-alive\n\n"
MAX_HELD_EVENTS: Final = 64
"""A Responses upstream's events that may wait for the first token; past it they are sent."""
_ITEM_EVENT: Final = b"event: response.output_item."
"""How a Responses upstream's `output_item.added` and `.done` events begin (`Delta.raw`)."""
TERMINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})

INCOMPLETE_REASONS: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Chat Completions `finish_reason` → `incomplete_details.reason`; any other ends as completed."""

_ECHOED: Final[dict[str, Any]] = {
    "background": False,
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": None,
    "safety_identifier": None,
    "service_tier": "default",
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}
"""Request fields the Response object echoes, with the API's defaults when the request left them out."""


def websocket_frame(payload: dict[str, Any]) -> bytes:
    """An event of WebSocket mode: the payload alone, one line (one text frame each)."""
    return orjson.dumps(payload) + b"\n"


def _token() -> str:
    return secrets.token_hex(12)


class _Item:
    """One output item while it streams: its JSON as of now, and how its `.done` events read."""

    def __init__(self, kind: str, item: dict[str, Any], output_index: int) -> None:
        self.kind = kind
        self.item = item
        self.output_index = output_index
        self.text: list[str] = []
        self.upstream: dict[str, Any] | None = None
        """A Responses upstream's own final JSON of this item (a reasoning item's), which closing it takes."""

    @property
    def id(self) -> str:
        id_: str = self.item["id"]
        return id_


class ResponsesEventRenderer:
    """
    Renders one stream's items as Responses events. `request` is the client's Responses body
    (the Response object echoes its settings); `model` is the name the client asked for;
    `prompt_chars` sizes the usage estimate when the upstream reports none; `frame` writes
    each event (SSE, or WebSocket mode's lines).

    `response_id` is the Response's id when the store chose it. `response` is the Response
    object as the last lifecycle event carried it; `failure` the error that ended it, if any.
    """

    shows_notices: Final = False
    """The Responses protocol has no word for a retry: the stream stays clean."""

    def __init__(
        self,
        *,
        request: dict[str, Any],
        model: str,
        prompt_chars: int = 0,
        frame: Callable[[dict[str, Any]], bytes] = encode_typed_event,
        response_id: str | None = None,
    ) -> None:
        self.id = response_id or "resp_" + _token()
        self._keeps_id = response_id is not None
        self._upstream_id: str | None = None
        self.model = model
        self.created_at = int(time.time())
        self.request = request
        self._prompt_chars = prompt_chars
        self._sequence = 0
        self._started = False
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._tool_items: dict[int, _Item] = {}
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._output_chars = 0
        self._frame = frame
        self.response: dict[str, Any] | None = None
        self.failure: TrioproxyError | None = None
        self._held: list[bytes] = []
        """A Responses upstream's events that wait for the first token."""
        self._streaming = False
        self._terminal: bytes | None = None
        """A Responses upstream's own `response.completed`/`.incomplete`, which only `done` sends."""

    @property
    def started(self) -> bool:
        """Whether `response.created` was rendered: the client has seen the response begin."""
        return self._started

    # ----------------------------------------------------------------------------------------
    # the renderer protocol

    def opened(self) -> bytes:
        return b""

    def heartbeat(self) -> bytes:
        return KEEP_ALIVE

    def notice(self, notice: object) -> bytes:
        if self._held and not self._streaming:  # the next attempt sends its own opening events
            self._sequence -= len(self._held)
            self._held.clear()
            self._items.clear()
            self._open = None
            self._started = False
            self._upstream_id = None
        return b""

    def delta(self, delta: Delta) -> bytes:
        if delta.raw is not None:
            return self._forward(delta)
        if delta.finish_reason:
            self._finish_reason = delta.finish_reason
        if delta.usage is not None:
            self._usage = delta.usage
        if not delta.has_content:
            return b""
        out = self._start()
        if delta.reasoning:
            out += self._in_item("reasoning")
            out += self._item_delta("response.reasoning_summary_text.delta", delta.reasoning, summary_index=0)
        if delta.text:
            out += self._in_item("message")
            out += self._item_delta("response.output_text.delta", delta.text, content_index=0, logprobs=[])
        for call in delta.tool_calls:
            out += self._tool_call(call)
        if delta.raw_item is not None:
            out += self._upstream_item(delta.raw_item)
        return out

    def done(self, session: object = None) -> bytes:
        if self._terminal is not None:
            return self._flush() + self._terminal
        out = self._start() + self._close_item()
        reason = INCOMPLETE_REASONS.get(self._finish_reason or "")
        if reason is None:
            response = self._response("completed", completed_at=int(time.time()))
            return out + self._event("response.completed", response=response)
        response = self._response("incomplete", incomplete_details={"reason": reason})
        return out + self._event("response.incomplete", response=response)

    def error(self, error: TrioproxyError) -> bytes:
        """
        The `error` event, then `response.failed`: nothing after it, never `response.completed`.
        A cancel (`POST /v1/responses/{id}/cancel`) is only `response.failed`, with the status
        `cancelled`.
        """
        self.failure = error
        out = self._flush() + self._start()
        if self._open is not None:
            self._open.item["status"] = "incomplete"
            self._fill(self._open)
            self._open = None
        code = error.code or error.type
        if isinstance(error, StreamCancelled):
            response = self._response("cancelled", error={"code": code, "message": error.message})
            return out + self._event("response.failed", response=response)
        body = {"type": error.type, "code": code, "message": error.message, "param": error.param}
        out += self._event("error", error=body)
        response = self._response("failed", error={"code": code, "message": error.message})
        return out + self._event("response.failed", response=response)

    # ----------------------------------------------------------------------------------------
    # a Responses upstream's own events

    def _forward(self, delta: Delta) -> bytes:
        """
        The upstream's event as it came (through `frame` unless it writes SSE); ours (an
        error) continue its numbering. The response's id is the upstream's, or, when the store
        chose one (`response_id`), the store's in place of the upstream's. Its opening events
        wait for the first token (a failover drops them), and its terminal event for `done`.
        """
        raw = delta.raw
        assert raw is not None
        if self._upstream_id is None and delta.role:  # response.created: the upstream's id
            self._adopt_upstream_id(raw)
        if self._keeps_id and self._upstream_id is not None:
            raw = raw.replace(self._upstream_id.encode(), self.id.encode())
        item_event = raw.startswith(_ITEM_EVENT)
        if self._frame is not encode_typed_event or delta.role or delta.finish_reason is not None or item_event:
            raw = self._read_forwarded(raw, item_event=item_event)
        self._started = True
        if delta.finish_reason is not None:
            self._terminal = raw  # numbered once sent: an error of ours, sent instead, takes its number
            return b""
        self._sequence += 1
        if delta.has_content:
            if self._open is not None:
                arguments = "".join(call.arguments for call in delta.tool_calls)
                self._open.text.append(delta.text or delta.reasoning or arguments)
            return self._flush() + raw
        if self._streaming:
            return raw
        self._held.append(raw)
        if len(self._held) > MAX_HELD_EVENTS:
            return self._flush()
        return b""

    def _adopt_upstream_id(self, created_event: bytes) -> None:
        """Note the upstream's response id from its `response.created`; it is ours unless the store chose one."""
        created = orjson.loads(SSEDecoder().feed(created_event)[0].data).get("response") or {}
        self._upstream_id = created.get("id") if isinstance(created.get("id"), str) else None
        if self._upstream_id is not None and not self._keeps_id:
            self.id = self._upstream_id

    def _read_forwarded(self, raw: bytes, *, item_event: bool) -> bytes:
        """
        An event the renderer must read (it carries the Response, or an output item) or
        reframe (`frame` is not SSE): the event as it goes out. Not every delta's: a text
        delta forwarded as SSE is never parsed.
        """
        payload = orjson.loads(SSEDecoder().feed(raw)[0].data)
        if self._frame is not encode_typed_event:
            raw = self._frame(payload)
        if isinstance(payload.get("response"), dict):  # created, completed, incomplete
            self.response = payload["response"]
        if item_event:
            self._follow_item(payload)
        return raw

    def _follow_item(self, payload: dict[str, Any]) -> None:
        """
        Keep up with the upstream's output items (`output_item.added`/`.done`), so that a
        continuation rendered here goes on in its open message, and the Response lists them.
        """
        item = payload.get("item")
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return
        if payload["type"] == "response.output_item.added":
            index = payload.get("output_index")
            index = index if isinstance(index, int) else len(self._items)
            self._open = _Item(str(item.get("type")), dict(item), index)
            self._items.append(self._open)
        elif self._open is not None and self._open.id == item["id"]:
            self._open.item = item
            self._open = None

    def _flush(self) -> bytes:
        """What waited for the first token, now that it is here."""
        self._streaming = True
        out = b"".join(self._held)
        self._held.clear()
        return out

    def snapshot(self, status: str) -> dict[str, Any]:
        """The Response object before any event carried it (a background response just queued)."""
        return self._response(status)

    # ----------------------------------------------------------------------------------------
    # events

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        if "response" in fields:
            self.response = fields["response"]
        return self._frame(payload)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = self._response("in_progress")
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        """The Response object as of now: settings echoed, the closed items, usage once it is over."""
        response: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": [item.item for item in self._items if item is not self._open],
            "usage": None,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
        }
        for name, default in _ECHOED.items():
            value = self.request.get(name)
            response[name] = default if value is None else value
        if status != "in_progress":
            response["usage"] = self._usage_json()
        response.update(fields)
        return response

    def _usage_json(self) -> dict[str, Any]:
        usage = self._usage or Usage(
            prompt_tokens=estimated_tokens(self._prompt_chars),
            completion_tokens=estimated_tokens(self._output_chars),
            estimated=True,
        )
        return {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": usage.cache_read_tokens or 0,
                "cache_write_tokens": usage.cache_creation_tokens or 0,
            },
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        }

    # ----------------------------------------------------------------------------------------
    # output items

    def _in_item(self, kind: str) -> bytes:
        """Open an item of `kind` (`message`, `reasoning`) unless one is open."""
        if self._open is not None and self._open.kind == kind:
            return b""
        out = self._close_item()
        if kind == "message":
            item = {
                "id": "msg_" + _token(),
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            }
            out += self._open_item(_Item(kind, item, len(self._items)))
            out += self._part_event("response.content_part.added", _output_text(""))
        else:
            item = {"id": "rs_" + _token(), "type": "reasoning", "summary": []}
            out += self._open_item(_Item(kind, item, len(self._items)))
            out += self._part_event("response.reasoning_summary_part.added", _summary_text(""))
        return out

    def _open_item(self, item: _Item) -> bytes:
        self._items.append(item)
        self._open = item
        return self._event("response.output_item.added", output_index=item.output_index, item=dict(item.item))

    def _item_delta(self, kind: str, text: str, **fields: Any) -> bytes:
        item = self._open
        assert item is not None
        item.text.append(text)
        self._output_chars += len(text)
        return self._event(kind, item_id=item.id, output_index=item.output_index, **fields, delta=text)

    def _part_event(self, kind: str, part: dict[str, Any]) -> bytes:
        item = self._open
        assert item is not None
        index = {"content_index": 0} if item.kind == "message" else {"summary_index": 0}
        return self._event(kind, item_id=item.id, output_index=item.output_index, **index, part=part)

    def _tool_call(self, call: ToolCallDelta) -> bytes:
        out = b""
        item = self._tool_items.get(call.index)
        if item is None:
            out += self._close_item()
            fields = {
                "id": "fc_" + _token(),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call.id or f"call_{_token()}",
                "name": call.name or "",
            }
            item = self._tool_items[call.index] = _Item("function_call", fields, len(self._items))
            out += self._open_item(item)
        elif item is not self._open:
            raise UpstreamProtocolError(f"the upstream went back to tool call {call.index} after starting another")
        if call.arguments:
            out += self._item_delta("response.function_call_arguments.delta", call.arguments)
        return out

    def _upstream_item(self, item: dict[str, Any]) -> bytes:
        """
        A Responses upstream's item the common model does not carry, whole: it closes the
        reasoning item its summary opened, which takes the upstream's fields (its encrypted
        content) under the id its events gave it; any other stands alone, `added` and `done`.
        """
        if self._open is not None and self._open.kind == item.get("type") == "reasoning":
            self._open.upstream = item
            return self._close_item()
        out = self._close_item()
        whole = _Item("upstream", dict(item), len(self._items))
        out += self._open_item(whole)
        self._open = None
        return out + self._event("response.output_item.done", output_index=whole.output_index, item=whole.item)

    def _close_item(self) -> bytes:
        """The open item's `.done` events; its final JSON goes into the Response's output."""
        item = self._open
        if item is None:
            return b""
        text = "".join(item.text)
        where = {"item_id": item.id, "output_index": item.output_index}
        if item.kind == "message":
            out = self._event("response.output_text.done", **where, content_index=0, logprobs=[], text=text)
            out += self._part_event("response.content_part.done", _output_text(text))
        elif item.kind == "reasoning":
            out = self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
            out += self._part_event("response.reasoning_summary_part.done", _summary_text(text))
        else:
            out = self._event("response.function_call_arguments.done", **where, arguments=text)
        item.item["status"] = "completed"
        self._fill(item)
        if item.upstream is not None:
            item.item = {**item.upstream, "id": item.id}
        self._open = None
        return out + self._event("response.output_item.done", output_index=item.output_index, item=item.item)

    @staticmethod
    def _fill(item: _Item) -> None:
        """The item's JSON with what it said."""
        text = "".join(item.text)
        if item.kind == "message":
            item.item["content"] = [_output_text(text)]
        elif item.kind == "reasoning":
            item.item["summary"] = [_summary_text(text)]
        elif item.kind == "function_call":
            item.item["arguments"] = text


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _summary_text(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def response_from_events(stream: bytes) -> dict[str, Any]:
    """The Response object of a stream of Responses events: the one its terminal event carries."""
    for event in SSEDecoder().feed(stream):
        if event.event in TERMINAL_EVENTS:
            response: dict[str, Any] = orjson.loads(event.data)["response"]
            return response
    raise UpstreamProtocolError("the stream ended without a terminal response event")
