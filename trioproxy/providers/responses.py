"""
Translation for OpenAI Responses upstreams (`POST {base_url}/responses`): OpenAI's own API,
where some models exist only, and any gateway that speaks it.

A Responses client (the Responses front) is passed through: its body goes up whole, every
field intact (built-in tools, `include`, reasoning items with their encrypted content, fields
that do not exist yet), with only `model` replaced and `stream` set; and each upstream event
keeps its exact bytes (`Delta.raw`), so that the client can be sent the upstream's stream
untouched. Events are still parsed, for stages and accounting.

A client of another protocol (Chat Completions, Anthropic Messages) is sent the common
model's body translated (`responses_request_body`), and its renderer builds its events from
the parsed deltas.

Request mapping (Chat Completions → Responses, `responses_protocol.md` §6 read backwards):

- messages → `input` message items (system and developer messages stay messages, in place);
  text parts → `input_text` (an assistant's → `output_text`), `image_url` → `input_image`;
- assistant `tool_calls` → `function_call` items after the message's text; `tool` messages →
  `function_call_output` items;
- function tools → flat function tools; `tool_choice` likewise; `response_format` →
  `text.format`; `max_completion_tokens`/`max_tokens` → `max_output_tokens`;
  `reasoning_effort` → `reasoning.effort`; `verbosity` → `text.verbosity`; `temperature`,
  `top_p`, `parallel_tool_calls`, `user`, `metadata`, `prompt_cache_key`, `safety_identifier`,
  `service_tier`, `store` as they are;
- dropped: `stream_options` (usage always comes with `response.completed`), and a field at
  the value that asks for nothing (`n` 1, penalties 0, ...: `NEUTRAL_VALUES`);
- refused, naming the field as the client sent it: anything else (`stop`, `logprobs`,
  `frequency_penalty`, `seed`, `n` > 1, an Anthropic client's `top_k`, ...): the Responses API
  has no such field. The provider's `drop_params` drops the fields it names instead.

Stream mapping (Responses event → `Delta`):

- `response.created` → `Delta(role="assistant")`;
- `response.output_text.delta` → text; `response.reasoning_summary_text.delta` and
  `response.reasoning_text.delta` → reasoning;
- a `function_call` item's `output_item.added` → a `ToolCallDelta` (its `call_id`, name, and
  any arguments it already has), numbered from 0 in the order the calls start; its
  `function_call_arguments.delta`s → argument fragments;
- for a Responses client, an `output_item.done` of any item but a message or a function call
  (a reasoning item, with its `encrypted_content`; a hosted tool's call, `web_search_call`,
  `file_search_call`, ...; a `custom_tool_call`) → a `raw_item`, the item whole, so that a
  stream re-rendered after a stage changed content still has it, in its place;
- `response.completed` → finish reason `tool_calls` (when there were calls) or `stop`, with
  usage; `response.incomplete` → `length` or `content_filter`, with usage; either ends the
  stream;
- `error` and `response.failed` → `UpstreamStatusError` (the status its code stands for; a
  `ContextLengthError` for `context_length_exceeded`);
- anything else → nothing (a delta with only `raw`, when kept).

Sans-IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from .._events import Delta, ToolCallDelta, Usage
from .._exceptions import RequestError, UpstreamProtocolError, UpstreamStatusError
from .._request import ChatRequest, WireProtocol
from .._sse import ServerSentEvent
from ._base import CUT_SHORT, DropParams, UpstreamRequest, drop_or_refuse, is_count, safe_message, status_error
from .openai import OpenAITranslation

__all__ = ["ResponsesStreamParser", "ResponsesTranslation", "responses_request_body"]

_SAME_NAME: Final = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "user",
        "metadata",
        "prompt_cache_key",
        "safety_identifier",
        "service_tier",
        "store",
    }
)
"""Chat Completions fields the Responses API has under the same name and meaning."""

_TRIOPROXY_FIELDS: Final = frozenset({"simulate"})

_MODELLED_ITEMS: Final = frozenset({"message", "function_call"})
"""Output items whose every field the common model carries (text, a tool call); any other is a `raw_item`."""

#: `incomplete_details.reason` → Chat Completions `finish_reason`.
INCOMPLETE_REASONS: Final[Mapping[str, str]] = {"max_output_tokens": "length", "content_filter": "content_filter"}

#: The error codes of a failed response → the HTTP status each stands for.
_CODE_STATUS: Final[Mapping[str, int]] = {
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_is_overloaded": 503,
    "slow_down": 503,
    "context_length_exceeded": 400,
    "invalid_prompt": 400,
}


class ResponsesTranslation(OpenAITranslation):
    """Requests to `{base_url}/responses`; errors read as OpenAI's, as the same API answers them."""

    protocol: WireProtocol = "responses"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        drop_params: DropParams = False,
    ):
        super().__init__(base_url=base_url, api_key=api_key, extra_headers=extra_headers, drop_params=drop_params)
        self.url = base_url.rstrip("/") + "/responses"

    def count_tokens_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        """A Responses client's `POST /responses/input_tokens`, forwarded whole with only `model` replaced."""
        return self._forwarded(chat, "/input_tokens")

    def compact_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        """A Responses client's `POST /responses/compact`, forwarded whole with only `model` replaced."""
        return self._forwarded(chat, "/compact")

    def _forwarded(self, chat: ChatRequest, path: str) -> UpstreamRequest | None:
        native = chat.native
        if native is None or native.protocol != self.protocol:
            return None
        body = {**native.body, "model": chat.upstream_model or chat.model}
        headers = {**self._stream_headers, "accept": "application/json"}
        return UpstreamRequest(self.url + path, headers, orjson.dumps(body))

    def stream_request(self, chat: ChatRequest) -> UpstreamRequest:
        native = chat.native
        if native is not None and native.protocol == self.protocol:
            body = dict(native.body)
        else:
            body = responses_request_body(chat, drop_params=self.drop_params)
        body["model"] = chat.upstream_model
        body["stream"] = True
        return UpstreamRequest(self.url, self._stream_headers, orjson.dumps(body))

    def stream_parser(self, chat: ChatRequest) -> ResponsesStreamParser:
        return ResponsesStreamParser(secret=self.api_key, keep_raw=chat.protocol == self.protocol)


def responses_request_body(chat: ChatRequest, *, drop_params: DropParams = False) -> dict[str, Any]:
    """
    The Responses body that asks what `chat`'s common body asks; raises naming what it cannot
    carry, unless `drop_params` drops it.
    """
    common = chat.common_body(drop_params)
    body: dict[str, Any] = {"input": _input(common["messages"])}
    for name, value in common.items():
        if name in ("messages", "stream", "stream_options") or value is None:
            continue
        if name in _SAME_NAME or name in _TRIOPROXY_FIELDS:
            body[name] = value
        elif name in ("max_tokens", "max_completion_tokens"):
            body["max_output_tokens"] = value
        elif name == "reasoning_effort":
            body["reasoning"] = {"effort": value}
        elif name == "tools":
            body["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(_array(value, "tools"))]
        elif name == "tool_choice":
            body["tool_choice"] = _tool_choice(value)
        elif name == "response_format":
            body.setdefault("text", {})["format"] = _format(value)
        elif name == "verbosity":
            body.setdefault("text", {})["verbosity"] = value
        else:
            drop_or_refuse(chat, name, value, drop_params, upstream="the OpenAI Responses API")
    return body


def _input(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        content = message.get("content")
        if role == "tool":
            output = content if isinstance(content, str) else _text_of(content, f"{where}.content")
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"), "output": output})
            continue
        if content:
            items.append({"type": "message", "role": role, "content": _content(content, role, where)})
        for j, call in enumerate(_array(message.get("tool_calls") or [], f"{where}.tool_calls")):
            items.append(_function_call(call, f"{where}.tool_calls[{j}]"))
    return items


def _array(value: object, where: str) -> list[Any]:
    """`value`, which must be an array (what the client sent at `where`)."""
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be an array", param=where)
    return value


def _function_call(call: object, where: str) -> dict[str, Any]:
    """An assistant message's tool call as a `function_call` item; one that is not an object is refused."""
    if not isinstance(call, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    function = call.get("function") or {}
    if not isinstance(function, dict):
        raise RequestError(f"'{where}.function' must be an object", param=f"{where}.function")
    return {
        "type": "function_call",
        "call_id": call.get("id"),
        "name": function.get("name"),
        "arguments": function.get("arguments") or "",
    }


def _text_of(content: object, where: str) -> str:
    """The text parts of a tool message's `content` (at `where`), joined."""
    if not isinstance(content, list):
        return ""
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                raise RequestError(f"'{where}[{j}].text' must be a string", param=f"{where}[{j}].text")
            texts.append(text)
    return "".join(texts)


def _content(content: str | list[object], role: object, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    text_type = "output_text" if role == "assistant" else "input_text"
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        fields: dict[str, object] = part if isinstance(part, dict) else {}
        kind = fields.get("type")
        if kind == "text":
            parts.append({"type": text_type, "text": fields.get("text", "")})
        elif kind == "refusal" and role == "assistant":
            parts.append({"type": "refusal", "refusal": fields.get("refusal", "")})
        elif kind == "image_url":
            image = fields.get("image_url") or {}
            url = image.get("url") if isinstance(image, dict) else image
            converted = {"type": "input_image", "image_url": url}
            if isinstance(image, dict) and image.get("detail"):
                converted["detail"] = image["detail"]
            parts.append(converted)
        else:
            at = f"{where}.content[{j}]"
            raise RequestError(f"a {kind!r} part ('{at}') has no equivalent in the OpenAI Responses API", param=at)
    return parts


def _tool(tool: object, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict):
        raise RequestError(f"'{where}' must be a function tool", param=where)
    return {"type": "function", **function}


def _tool_choice(choice: object) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function") or {}
        if not isinstance(function, dict):
            raise RequestError("'tool_choice.function' must be an object", param="tool_choice.function")
        return {"type": "function", "name": function.get("name")}
    return choice


def _format(response_format: object) -> dict[str, Any]:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        assert isinstance(response_format, dict)
        json_schema = response_format.get("json_schema") or {}
        if not isinstance(json_schema, dict):
            raise RequestError("'response_format.json_schema' must be an object", param="response_format.json_schema")
        return {"type": "json_schema", **json_schema}
    if kind in ("json_object", "text"):
        return {"type": kind}
    raise RequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'", param="response_format")


class ResponsesStreamParser:
    """
    Parses a Responses event stream; `response.completed` or `response.incomplete` ends it.

    `secret` (the provider's API key) is masked in the messages of in-stream errors;
    `keep_raw` keeps each event's bytes in its delta.
    """

    def __init__(self, *, secret: str | None = None, keep_raw: bool) -> None:
        self._secret = secret
        self._keep_raw = keep_raw
        self._finished = False
        self._calls: dict[str, int] = {}
        """Function-call item id → its tool-call index."""

    @property
    def finished(self) -> bool:
        return self._finished

    def end(self) -> list[Delta]:
        """`response.completed` or `response.incomplete` ends a Responses stream: a body ending first was cut short."""
        if not self._finished:
            raise UpstreamProtocolError(CUT_SHORT)
        return []

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        if self._finished:
            return []
        try:
            payload = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(f"upstream sent an event that is not JSON: {event.data[:200]!r}") from None
        if not isinstance(payload, dict):
            raise UpstreamProtocolError(f"upstream sent an event that is not a JSON object: {event.data[:200]!r}")
        kind = payload.get("type")
        if not isinstance(kind, str) or "\n" in kind or "\r" in kind:  # it names the event a client is sent
            raise UpstreamProtocolError(f"upstream sent an event without a one-line string 'type': {event.data[:99]!r}")
        delta = self._parse(payload)
        if self._keep_raw:
            delta.raw = b"event: " + kind.encode() + b"\ndata: " + event.data.encode() + b"\n\n"
        return [delta] if delta.says_anything or delta.raw is not None else []

    def _parse(self, payload: dict[str, Any]) -> Delta:  # noqa: C901 - one branch per Responses event type, in the protocol's order
        kind = payload.get("type")
        if kind == "response.created":
            _object(payload, "response")  # a Responses client's renderer reads its id
            return Delta(role="assistant")
        if kind == "response.output_text.delta":
            return Delta(text=_string(payload, "delta"))
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return Delta(reasoning=_string(payload, "delta"))
        if kind == "response.output_item.added":
            item = _item(payload)
            if item["type"] == "function_call":
                call = ToolCallDelta(
                    index=len(self._calls),
                    id=_optional_string(item, "call_id"),
                    name=_optional_string(item, "name"),
                    arguments=_optional_string(item, "arguments") or "",
                )
                self._calls[str(item.get("id"))] = call.index
                return Delta(tool_calls=(call,))
            return Delta()
        if kind == "response.output_item.done":
            item = _item(payload)
            if self._keep_raw and item["type"] not in _MODELLED_ITEMS:
                return Delta(raw_item=item)
            return Delta()
        if kind == "response.function_call_arguments.delta":
            started = self._calls.get(str(payload.get("item_id")))
            if started is None:
                raise UpstreamProtocolError("upstream sent arguments for a function call it never started")
            return Delta(tool_calls=(ToolCallDelta(index=started, arguments=_string(payload, "delta")),))
        if kind in ("response.completed", "response.incomplete"):
            response = _object(payload, "response")
            reason = "tool_calls" if self._calls else "stop"
            if kind == "response.incomplete":
                details = _object(response, "incomplete_details")
                reason = INCOMPLETE_REASONS.get(str(details.get("reason")), "length")
            delta = Delta(finish_reason=reason, usage=_usage(response.get("usage")))
            self._finished = True  # once it is read: one refused (and passed over) leaves the stream going
            return delta
        if kind == "error":
            error = payload.get("error")
            raise self._error(error if isinstance(error, dict) else payload)
        if kind == "response.failed":
            raise self._error(_object(_object(payload, "response"), "error"))
        return Delta()

    def _error(self, error: dict[str, Any]) -> UpstreamStatusError:
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = error.get("message") or "the upstream reported an error during streaming"
        return status_error(
            safe_message(str(message), secret=self._secret),
            status=_CODE_STATUS.get(code or "", 502),
            type=error.get("type") if isinstance(error.get("type"), str) else "upstream_error",
            code=code,
        )


def _object(payload: dict[str, Any], key: str) -> dict[str, Any]:
    """`payload[key]`, an object the protocol may leave out (then empty)."""
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"upstream sent an event whose {key!r} is not an object")
    return value


def _item(payload: dict[str, Any]) -> dict[str, Any]:
    """The output item of an `output_item.added` or `.done` event: an object with a string `type`."""
    item = payload.get("item")
    if not isinstance(item, dict) or not isinstance(item.get("type"), str):
        raise UpstreamProtocolError(f"upstream sent a {payload.get('type')} event without an item of a string 'type'")
    return item


def _optional_string(item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise UpstreamProtocolError(f"upstream sent a {item.get('type')} item with a non-string {key!r}")
    return value


def _string(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"upstream sent a {payload.get('type')} event without a string {key!r}")
    return value


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not (is_count(prompt) and is_count(completion) and (cached is None or is_count(cached))):
        raise UpstreamProtocolError(
            f"upstream usage has token counts that are not whole and non-negative: {usage!r:.200}"
        )
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cache_read_tokens=cached)
