"""
Translation for Anthropic Messages API upstreams (`POST /v1/messages`).

An Anthropic client (the Messages front) is passed through: its body goes up whole, every
field intact (`thinking`, `cache_control`, fields that do not exist yet), with only `model`
replaced and `stream` set, together with its `anthropic-version` and `anthropic-beta`
headers; and each upstream event keeps its exact bytes (`Delta.raw`), `ping`,
`content_block_stop`, signatures and citations included, so that the client can be sent the
upstream's stream untouched.

Why a translation otherwise: an OpenAI client talks to trioproxy in the Chat
Completions dialect, and Anthropic speaks a different one, both for the request (a top-level
`system`, content blocks, strictly alternating roles, `tool_use`/`tool_result` blocks, no
unknown fields allowed) and for the stream (named events, per-block deltas, usage split over
`message_start` and `message_delta`). This module maps the request over and parses the stream
back into the proxy's internal `Delta`s, so every front adapter and stage works unchanged
whatever the upstream. What cannot be expressed in Anthropic's dialect is refused with a
`RequestError` naming the field, instead of being silently dropped or left to a vaguer
upstream 400.

Request mapping (OpenAI → Anthropic):

- `system` / `developer` messages → top-level `system` (texts joined with a blank line);
- `user` / `assistant` content: string → string; parts `text` → text block, `image_url`
  (`data:` URL) → image block with a `base64` source, (`http(s)` URL) → a `url` source;
  an assistant `refusal` part → text block;
- assistant `tool_calls` → `tool_use` blocks (`input` = the parsed `function.arguments`),
  after the message's text;
- `tool` messages → `tool_result` blocks in a user message;
- consecutive messages of one role are merged into one (Anthropic requires alternating
  roles); in a merged user message the `tool_result` blocks are put first, as Anthropic
  requires;
- `tools[].function` → `tools[]` with `input_schema`;
- `tool_choice`: `auto` → auto, `required` → any, `none` → none, a named function → tool;
  `parallel_tool_calls: false` → `disable_parallel_tool_use: true`;
- `max_tokens`/`max_completion_tokens` (or the default), `temperature`, `top_p`, `top_k`;
  `stop` → `stop_sequences`; `user` → `metadata.user_id`;
- `response_format` `json_schema` → `output_config.format` (its `schema`: Anthropic holds
  every answer to it, so `strict` is moot and `name`/`description` have nowhere to go);
  `json_object` is refused: Anthropic has no JSON mode without a schema, and a permissive
  schema is not one it takes (its objects must close `additionalProperties`);
- `reasoning_effort` → `thinking` `enabled` with a `budget_tokens` that is a share of
  `max_tokens` (`THINKING_SHARES`; Anthropic counts thinking within `max_tokens`, and wants
  at least 1024 tokens of it), refused when `max_tokens` cannot hold that; `none` → no
  thinking. Left off for a request that answers tool calls or ends with an assistant prefill
  (a continuation): Anthropic then wants the earlier turn's signed thinking block, which the
  common model does not carry, or refuses a prefill;
- dropped, because they do not change the answer (`_HINTS`): `stream_options`, `store`,
  `metadata`, `prompt_cache_key`, `safety_identifier`, `service_tier`; and a field at the
  value that asks for nothing (`n` 1, penalties 0, ...: `NEUTRAL_VALUES`);
- refused, naming the field as the client sent it: any other (penalties, `seed`,
  `logit_bias`, `logprobs`, `n` > 1, `verbosity`, unknown fields): the answer would not be the
  one asked for. The provider's `drop_params` drops the fields it names instead.

Stream mapping (Anthropic event → `Delta`):

- `message_start` → `Delta(role="assistant")`; input (and cache) tokens are remembered;
- text `content_block_start` (non-empty text) and `text_delta` → `Delta(text=...)`;
- tool_use `content_block_start` → a `ToolCallDelta` with id and name, `input_json_delta` →
  a `ToolCallDelta` with an arguments fragment; tool-call indexes count tool_use blocks
  from 0, as OpenAI numbers tool calls, not Anthropic's block indexes;
- `thinking_delta` → `Delta(reasoning=...)`, `signature_delta` → `Delta(reasoning_signature=...)`;
- citation deltas, other blocks (redacted thinking, server tools),
  `content_block_stop`, `ping`, unknown events → nothing (a delta with only `raw`, when kept);
- `message_delta` → `Delta(finish_reason=...)` (mapped to OpenAI's reasons, with the
  `stop_sequence` that matched); output tokens are remembered (they are cumulative: the
  latest wins);
- `message_stop` → `Delta(usage=...)` (with the cache counts, when reported) and the stream
  is finished; so does the end of the body after a `message_delta` with a `stop_reason`;
- `error` → `UpstreamStatusError` with the status matching the error type (e.g. 529).

Sans-IO: no trio, no httpx.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final, TypedDict

import orjson

from .._events import Delta, ToolCallDelta, Usage
from .._exceptions import RequestError, UpstreamProtocolError, UpstreamStatusError
from .._request import ChatRequest, WireProtocol, content_text
from .._sse import ServerSentEvent
from ._base import (
    CUT_SHORT,
    DropParams,
    UpstreamRequest,
    drop_or_refuse,
    retry_after_seconds,
    safe_message,
    status_error,
)

__all__ = [
    "ANTHROPIC_VERSION",
    "ERROR_STATUS",
    "FINISH_REASONS",
    "FORWARDED_HEADERS",
    "MIN_THINKING_BUDGET",
    "STOP_REASONS",
    "THINKING_SHARES",
    "TOOL_CHOICES",
    "AnthropicStreamParser",
    "AnthropicTranslation",
    "messages_request_body",
]

ANTHROPIC_VERSION: Final = "2023-06-01"

FORWARDED_HEADERS: Final = ("anthropic-version", "anthropic-beta")
"""An Anthropic client's request headers that an Anthropic upstream must see as they were sent."""

#: Anthropic `stop_reason` → OpenAI `finish_reason`. Unknown reasons become "stop".
FINISH_REASONS: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}

#: OpenAI `finish_reason` → Anthropic `stop_reason`, for an Anthropic client of another upstream.
STOP_REASONS: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

#: Anthropic `tool_choice.type` → OpenAI `tool_choice`, except `tool`, which names a function.
TOOL_CHOICES: Final[Mapping[str, str]] = {"auto": "auto", "any": "required", "none": "none"}
_ANTHROPIC_TOOL_CHOICES: Final = {choice: kind for kind, choice in TOOL_CHOICES.items()}

#: OpenAI `reasoning_effort` → the share of `max_tokens` Anthropic may think for (at least
#: `MIN_THINKING_BUDGET`). `none` asks for no thinking.
THINKING_SHARES: Final[Mapping[str, float]] = {"minimal": 0.0, "low": 0.25, "medium": 0.5, "high": 0.75, "xhigh": 0.9}

MIN_THINKING_BUDGET: Final = 1024
"""The least `thinking.budget_tokens` Anthropic takes; it must also stay below `max_tokens`."""

#: Anthropic error type → the HTTP status it stands for (an in-stream error arrives in a 200).
ERROR_STATUS: Final[Mapping[str, int]] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# Event names whose data we parse; any other named event is ignored unread (the protocol may
# add event types, and clients must ignore unknown ones). "message" is the SSE default name,
# i.e. a data-only event, whose kind we can only learn from its JSON `type`.
_PARSED_EVENTS: Final = frozenset(
    {
        "message",
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "error",
    }
)

_EMPTY_SCHEMA: Final[Mapping[str, Any]] = {"type": "object", "properties": {}}

_CARRIED: Final = frozenset(
    {
        "model",
        "messages",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
    }
)
"""Chat Completions fields the translation carries (`messages_request_body`)."""

_HINTS: Final = frozenset(
    {"stream_options", "store", "metadata", "prompt_cache_key", "safety_identifier", "service_tier", "simulate"}
)
"""
Chat Completions fields dropped because they do not change the answer: usage comes with every
Anthropic stream; storing the completion, its tags, the cache key, the end user's safety id
and the capacity tier are OpenAI's own; `simulate` is for the simulated upstream.
"""

_UPSTREAM: Final = "the Anthropic Messages API"


class AnthropicTranslation:
    """
    Streaming requests to `{base_url}/v1/messages`.

    `base_url` may be given with or without the trailing `/v1`. `extra_headers` (for example
    `anthropic-beta`) are sent last, so they may override the defaults and the headers an
    Anthropic client sent.
    """

    protocol: WireProtocol = "anthropic"

    def __init__(
        self,
        *,
        base_url: str = "https://api.anthropic.com",
        api_key: str | None,
        version: str = ANTHROPIC_VERSION,
        default_max_tokens: int = 4096,
        extra_headers: Mapping[str, str] = {},
        drop_params: DropParams = False,
    ) -> None:
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.url = self.root + "/v1/messages"
        self.count_tokens_url = self.url + "/count_tokens"
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.drop_params = drop_params
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "anthropic-version": version,
        }
        if api_key:
            headers["x-api-key"] = api_key
        self._extra_headers = {k.lower(): v for k, v in extra_headers.items()}
        headers.update(self._extra_headers)
        self._headers = headers

    def stream_request(self, chat: ChatRequest) -> UpstreamRequest:
        native = chat.native
        if native is not None and native.protocol == self.protocol:
            body = dict(native.body)
            body["model"] = chat.upstream_model or chat.model
            body["stream"] = True
            headers = {**self._headers, **native.headers, **self._extra_headers}
            return UpstreamRequest(self.url, headers, orjson.dumps(body))
        body = messages_request_body(chat, default_max_tokens=self.default_max_tokens, drop_params=self.drop_params)
        body["stream"] = True
        return UpstreamRequest(self.url, dict(self._headers), orjson.dumps(body))

    def count_tokens_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        """An Anthropic client's count request, forwarded whole with only `model` replaced."""
        native = chat.native
        if native is None or native.protocol != self.protocol:
            return None
        body = {**native.body, "model": chat.upstream_model or chat.model}
        headers = {**self._headers, **native.headers, **self._extra_headers, "accept": "application/json"}
        return UpstreamRequest(self.count_tokens_url, headers, orjson.dumps(body))

    def forward_url(self, target: str) -> str:
        return self.root + target

    def forward_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The client's `anthropic-version` and betas kept, the provider's key and headers added."""
        forwarded = {"anthropic-version": self._headers["anthropic-version"], **headers}
        if self.api_key:
            forwarded["x-api-key"] = self.api_key
        return {**forwarded, **self._extra_headers}

    def compact_request(self, chat: ChatRequest) -> None:
        return None  # Messages compacts within a request (a beta's `context_management`), not by its own endpoint

    def stream_parser(self, chat: ChatRequest) -> AnthropicStreamParser:
        return AnthropicStreamParser(secret=self.api_key, keep_raw=chat.protocol == self.protocol)

    def error_from_response(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamStatusError:
        """
        Anthropic answers errors as `{"type": "error", "error": {"type", "message"}}`; any other
        body (a gateway's HTML page, say) gives a generic message carrying a short excerpt.
        """
        message, type_ = _error_fields(body)
        if message is None:
            text = body.decode("utf-8", "replace").strip()
            message = f"upstream answered HTTP {status}" + (f": {text}" if text else "")
        return status_error(
            safe_message(message, secret=self.api_key),
            status=status,
            type=type_,
            retry_after=retry_after_seconds(headers),
        )


# --------------------------------------------------------------------------------------------
# Request translation


class _Message(TypedDict):
    """A Messages API message, as the translation builds it."""

    role: str
    content: str | list[dict[str, object]]


def messages_request_body(
    chat: ChatRequest, *, default_max_tokens: int, drop_params: DropParams = False
) -> dict[str, object]:
    """
    The Anthropic Messages request body for `chat`, without `stream`.

    Pure, so the whole mapping can be tested on dicts. `model` is `chat.upstream_model`, or
    the client's own name when the request was not routed. What the common model cannot carry
    of the client's request is refused first: its messages are then not the client's; then
    a field Anthropic has no equivalent for, unless `drop_params` drops it.
    """
    src = chat.common_body(drop_params)
    for name, value in src.items():
        if value is not None and name not in _CARRIED and name not in _HINTS:
            drop_or_refuse(chat, name, value, drop_params, upstream=_UPSTREAM)
    system, messages = _system_and_messages(chat.messages)
    max_tokens = chat.max_tokens or default_max_tokens
    body: dict[str, object] = {
        "model": chat.upstream_model or chat.model,
        "max_tokens": max_tokens,
        "messages": messages,
    }
    if system:
        body["system"] = system
    _sampling(src, body)
    _tools(src, body)
    body.update(_output_and_thinking(src, chat, max_tokens, messages))
    return body


def _system_and_messages(chat_messages: list[dict[str, Any]]) -> tuple[str, list[_Message]]:
    """
    The system prompt (the system and developer messages' texts) and the Messages `messages`:
    consecutive same-role messages merged, tool results first in each user message.
    """
    system: list[str] = []
    messages: list[_Message] = []
    for i, message in enumerate(chat_messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object", param=where)
        if message.get("role") in ("system", "developer"):
            if text := content_text(message.get("content")):
                system.append(text)
        else:
            _append(messages, *_role_and_content(message, where))
    if not messages:
        raise RequestError(
            "'messages' must hold at least one user or assistant message for an Anthropic upstream",
            param="messages",
        )
    for built in messages:
        if built["role"] == "user" and isinstance(built["content"], list):
            built["content"] = _tool_results_first(built["content"])
    return "\n\n".join(system), messages


def _role_and_content(message: dict[str, object], where: str) -> tuple[str, str | list[dict[str, object]]]:
    """The Messages role and content of a user, assistant or tool message."""
    role = message.get("role")
    if role == "user":
        return "user", _user_content(message.get("content"), f"{where}.content")
    if role == "assistant":
        return "assistant", _assistant_content(message, where)
    if role == "tool":
        return "user", [_tool_result(message, where)]
    raise RequestError(
        f"'{where}.role' {role!r} cannot be sent to an Anthropic upstream "
        "(use 'tool' messages instead of the deprecated 'function')",
        param=f"{where}.role",
    )


def _sampling(src: Mapping[str, Any], body: dict[str, object]) -> None:
    """`temperature`, `top_p`, `top_k`, `stop` and `user` into `body`."""
    for name in ("temperature", "top_p", "top_k"):
        value = src.get(name)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise RequestError(f"'{name}' must be a number", param=name)
            body[name] = value
    stop = _stop_sequences(src.get("stop"))
    if stop:
        body["stop_sequences"] = stop
    user = src.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise RequestError("'user' must be a string", param="user")
        body["metadata"] = {"user_id": user}


def _tools(src: Mapping[str, Any], body: dict[str, object]) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls` into `body`."""
    tools = src.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise RequestError("'tools' must be an array", param="tools")
        if tools:
            body["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    tool_choice = _tool_choice(src.get("tool_choice"))
    parallel = src.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if parallel is False and (tool_choice is not None or "tools" in body):
        tool_choice = tool_choice or {"type": "auto"}
        if tool_choice["type"] != "none":  # `none` takes no options
            tool_choice["disable_parallel_tool_use"] = True
    if tool_choice is not None:
        body["tool_choice"] = tool_choice


def _append(messages: list[_Message], role: str, content: str | list[dict[str, object]]) -> None:
    """Add a message, merging it into the previous one when the role repeats."""
    if messages and messages[-1]["role"] == role:
        last = messages[-1]
        last["content"] = _as_blocks(last["content"]) + _as_blocks(content)
    else:
        messages.append({"role": role, "content": content})


def _as_blocks(content: str | list[dict[str, object]]) -> list[dict[str, object]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _tool_results_first(blocks: list[dict[str, object]]) -> list[dict[str, object]]:
    """Anthropic wants a user message's tool_result blocks before any other block."""
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if not results or len(results) == len(blocks):
        return blocks
    return results + [b for b in blocks if b.get("type") != "tool_result"]


def _user_content(content: object, where: str) -> str | list[dict[str, object]]:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _blocks(content, where, assistant=False)
    raise RequestError(f"'{where}' must be a string or an array of content parts", param=where)


def _assistant_content(message: dict[str, object], where: str) -> str | list[dict[str, object]]:
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if message.get("function_call") is not None and not tool_calls:
        raise RequestError(
            f"'{where}.function_call' (deprecated) cannot be sent to an Anthropic upstream; use 'tool_calls'",
            param=f"{where}.function_call",
        )
    if content is None:
        blocks: list[dict[str, object]] = []
        if not tool_calls:
            raise RequestError(f"'{where}.content' is required", param=f"{where}.content")
    elif isinstance(content, str):
        if not tool_calls:
            return content
        blocks = _as_blocks(content)
    elif isinstance(content, list):
        blocks = _blocks(content, f"{where}.content", assistant=True)
    else:
        raise RequestError(f"'{where}.content' must be a string or an array of content parts", param=f"{where}.content")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise RequestError(f"'{where}.tool_calls' must be an array", param=f"{where}.tool_calls")
        blocks += [_tool_use(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(tool_calls)]
    return blocks


def _blocks(parts: list[Any], where: str, *, assistant: bool) -> list[dict[str, object]]:
    """Content parts → content blocks. Empty texts are dropped: Anthropic rejects them."""
    blocks: list[dict[str, object]] = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"'{at}' must be an object", param=at)
        kind = part.get("type")
        if kind == "text" or (assistant and kind == "refusal"):
            key = "text" if kind == "text" else "refusal"
            text = part.get(key)
            if not isinstance(text, str):
                raise RequestError(f"'{at}.{key}' must be a string", param=f"{at}.{key}")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url" and not assistant:
            blocks.append(_image(part.get("image_url"), f"{at}.image_url"))
        else:
            allowed = "'text' or 'refusal'" if assistant else "'text' or 'image_url'"
            raise RequestError(
                f"content part type {kind!r} at '{at}' cannot be sent to an Anthropic upstream; expected {allowed}",
                param=f"{at}.type",
            )
    return blocks


def _image(image_url: object, where: str) -> dict[str, object]:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise RequestError(f"'{where}.url' must be a string", param=f"{where}.url")
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not media_type or not data:
            raise RequestError(
                f"'{where}.url' must be a base64 data URL (data:image/png;base64,...)", param=f"{where}.url"
            )
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise RequestError(f"'{where}.url' must be an http(s) URL or a base64 data URL", param=f"{where}.url")


def _tool_use(call: object, where: str) -> dict[str, object]:
    if not isinstance(call, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    id_ = call.get("id")
    if not isinstance(id_, str) or not id_:
        raise RequestError(f"'{where}.id' must be a non-empty string", param=f"{where}.id")
    function = call.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"'{where}.function' must be an object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"'{where}.function.name' must be a non-empty string", param=f"{where}.function.name")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        tool_input: Any = {}
    elif isinstance(arguments, str):
        try:
            tool_input = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            tool_input = None
        if not isinstance(tool_input, dict):
            raise RequestError(
                f"'{where}.function.arguments' must be a JSON object encoded as a string",
                param=f"{where}.function.arguments",
            )
    else:
        raise RequestError(f"'{where}.function.arguments' must be a string", param=f"{where}.function.arguments")
    return {"type": "tool_use", "id": id_, "name": name, "input": tool_input}


def _tool_result(message: dict[str, object], where: str) -> dict[str, object]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise RequestError(f"'{where}.tool_call_id' must be a non-empty string", param=f"{where}.tool_call_id")
    block: dict[str, object] = {"type": "tool_result", "tool_use_id": tool_call_id}
    content = _user_content(message.get("content"), f"{where}.content")
    if content:  # an empty result is sent without `content`, which Anthropic allows
        block["content"] = content
    return block


def _tool(tool: object, where: str) -> dict[str, object]:
    if not isinstance(tool, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    if tool.get("type", "function") != "function":
        raise RequestError(
            f"tool type {tool.get('type')!r} at '{where}' cannot be sent to an Anthropic upstream; expected 'function'",
            param=f"{where}.type",
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"'{where}.function' must be an object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"'{where}.function.name' must be a non-empty string", param=f"{where}.function.name")
    out: dict[str, object] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise RequestError(
                f"'{where}.function.description' must be a string", param=f"{where}.function.description"
            )
        out["description"] = description
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(_EMPTY_SCHEMA)
    elif not isinstance(parameters, dict):
        raise RequestError(
            f"'{where}.function.parameters' must be a JSON Schema object", param=f"{where}.function.parameters"
        )
    out["input_schema"] = parameters
    return out


def _tool_choice(choice: object) -> dict[str, object] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _ANTHROPIC_TOOL_CHOICES:
        return {"type": _ANTHROPIC_TOOL_CHOICES[choice]}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return {"type": "tool", "name": name}
        raise RequestError("'tool_choice.function.name' must be a non-empty string", param="tool_choice.function.name")
    raise RequestError(
        "'tool_choice' must be 'auto', 'required', 'none' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        param="tool_choice",
    )


def _output_and_thinking(
    src: Mapping[str, Any], chat: ChatRequest, max_tokens: int, messages: list[_Message]
) -> dict[str, object]:
    """`output_config.format` for `response_format`, `thinking` for `reasoning_effort`."""
    out: dict[str, object] = {}
    output_format = _output_format(src.get("response_format"), chat)
    if output_format is not None:
        out["output_config"] = {"format": output_format}
    thinking = _thinking(src.get("reasoning_effort"), max_tokens, chat)
    if thinking is not None and not _answers_tool_calls_or_prefill(messages):
        out["thinking"] = thinking
    return out


def _output_format(response_format: object, chat: ChatRequest) -> dict[str, object] | None:
    """`output_config.format` for a JSON schema `response_format`; none for text."""
    if response_format is None:
        return None
    name = chat.client_name("response_format")
    if not isinstance(response_format, dict):
        raise RequestError(f"'{name}' must be an object", param=name)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        raise RequestError(
            f"'{name}' of type json_object cannot be sent to an Anthropic upstream: it has no JSON mode without "
            "a schema; give a json_schema",
            param=name,
        )
    if kind != "json_schema":
        raise RequestError(
            f"'{name}.type' must be 'text' or 'json_schema' for an Anthropic upstream", param=f"{name}.type"
        )
    json_schema = response_format.get("json_schema")
    schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
    if not isinstance(schema, dict):
        where = chat.client_name("response_format.json_schema")
        raise RequestError(
            f"'{where}.schema' must be a JSON Schema object for an Anthropic upstream", param=f"{where}.schema"
        )
    return {"type": "json_schema", "schema": schema}


def _thinking(effort: object, max_tokens: int, chat: ChatRequest) -> dict[str, object] | None:
    """Extended thinking for a `reasoning_effort`: its share of `max_tokens`, within Anthropic's bounds."""
    if effort is None or effort == "none":
        return None
    name = chat.client_name("reasoning_effort")
    share = THINKING_SHARES.get(effort) if isinstance(effort, str) else None
    if share is None:
        raise RequestError(f"'{name}' must be one of none, {', '.join(THINKING_SHARES)}", param=name)
    if max_tokens <= MIN_THINKING_BUDGET:
        raise RequestError(
            f"'{name}' needs '{chat.client_name('max_tokens')}' above {MIN_THINKING_BUDGET} for an Anthropic "
            f"upstream: it thinks within them, for at least {MIN_THINKING_BUDGET} tokens",
            param=name,
        )
    return {"type": "enabled", "budget_tokens": max(MIN_THINKING_BUDGET, int(max_tokens * share))}


def _answers_tool_calls_or_prefill(messages: list[_Message]) -> bool:
    """
    Whether the request ends with tool results or an assistant turn: Anthropic's thinking then
    wants the previous turn's signed thinking block back, or refuses the prefill.
    """
    last = messages[-1]
    if last["role"] == "assistant":
        return True
    content = last["content"]
    return isinstance(content, list) and any(block.get("type") == "tool_result" for block in content)


def _stop_sequences(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise RequestError("'stop' must be a string or an array of strings", param="stop")


# --------------------------------------------------------------------------------------------
# Errors


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    """Message and type of an Anthropic error body, or `(None, None)` for any other body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        return None, None
    message = error.get("message")
    type_ = error.get("type")
    if not isinstance(message, str) or not message:
        return None, type_ if isinstance(type_, str) else None
    return message, type_ if isinstance(type_, str) else None


# --------------------------------------------------------------------------------------------
# Stream parsing


class AnthropicStreamParser:
    """
    Parses one Anthropic Messages stream. State: the token counts (they arrive split over
    `message_start` and `message_delta` and are reported at `message_stop`), the type of each
    content block, and the map from content-block index to tool-call index.

    With `keep_raw`, every event becomes at least one delta, the first carrying the event's
    bytes (`Delta.raw`), so that an Anthropic client can be sent the whole stream as it came.
    """

    def __init__(self, *, secret: str | None = None, keep_raw: bool) -> None:
        self._secret = secret
        self._keep_raw = keep_raw
        self._finished = False
        self._usage = Usage(prompt_tokens=0, completion_tokens=0)
        self._blocks: dict[int, str] = {}
        self._tool_index: dict[int, int] = {}
        self._finish_sent = False

    @property
    def finished(self) -> bool:
        return self._finished

    def end(self) -> list[Delta]:
        if not self._finish_sent:
            raise UpstreamProtocolError(CUT_SHORT)
        self._finished = True
        return [Delta(usage=self._usage)]

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        if self._finished:
            return []
        deltas = self._parse(event) if event.event in _PARSED_EVENTS else []
        if self._keep_raw:
            if not deltas:
                deltas = [Delta()]
            deltas[0].raw = _event_bytes(event)
        return deltas

    def _parse(self, event: ServerSentEvent) -> list[Delta]:
        payload = _json_object(event.data, event.event)
        kind = payload.get("type", event.event)
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "message_start":
            return self._message_start(payload)
        if kind == "message_delta":
            return self._message_delta(payload)
        if kind == "message_stop":
            self._finished = True
            return [Delta(usage=self._usage)]
        if kind == "error":
            raise self._stream_error(payload)
        return []  # content_block_stop, ping, and any type we do not know

    def _message_start(self, payload: dict[str, object]) -> list[Delta]:
        message = _field(payload, "message", dict, "message_start")
        usage = message.get("usage")
        if usage is not None:
            if not isinstance(usage, dict):
                raise UpstreamProtocolError("upstream 'message_start' has a malformed 'usage'")
            cache_read = _optional_count(usage, "cache_read_input_tokens")
            cache_creation = _optional_count(usage, "cache_creation_input_tokens")
            self._usage = Usage(
                prompt_tokens=_count(usage, "input_tokens") + (cache_read or 0) + (cache_creation or 0),
                completion_tokens=_count(usage, "output_tokens"),
                cache_read_tokens=cache_read,
                cache_creation_tokens=cache_creation,
            )
        return [Delta(role="assistant")]

    def _block_start(self, payload: dict[str, object]) -> list[Delta]:
        index = _field(payload, "index", int, "content_block_start")
        block = _field(payload, "content_block", dict, "content_block_start")
        kind = _field(block, "type", str, "content_block_start.content_block")
        deltas: list[Delta] = []  # none for thinking (its text comes in deltas), redacted_thinking, server tools
        if kind == "text":
            text = block.get("text") or ""
            if not isinstance(text, str):
                raise UpstreamProtocolError("upstream text block has a non-string 'text'")
            deltas = [Delta(text=text)] if text else []
        elif kind == "tool_use":
            id_ = _field(block, "id", str, "tool_use block")
            name = _field(block, "name", str, "tool_use block")
            tool_index = self._tool_index[index] = len(self._tool_index)
            deltas = [Delta(tool_calls=(ToolCallDelta(index=tool_index, id=id_, name=name, arguments=""),))]
        self._blocks[index] = kind  # once the block is read: one refused (and passed over) leaves nothing behind
        return deltas

    def _block_delta(self, payload: dict[str, object]) -> list[Delta]:
        index = _field(payload, "index", int, "content_block_delta")
        delta = _field(payload, "delta", dict, "content_block_delta")
        kind = _field(delta, "type", str, "content_block_delta.delta")
        if kind == "text_delta":
            text = _field(delta, "text", str, "text_delta")
            return [Delta(text=text)] if text else []
        if kind == "thinking_delta":
            thinking = _field(delta, "thinking", str, "thinking_delta")
            return [Delta(reasoning=thinking)] if thinking else []
        if kind == "signature_delta":
            return [Delta(reasoning_signature=_field(delta, "signature", str, "signature_delta"))]
        if kind == "input_json_delta":
            fragment = _field(delta, "partial_json", str, "input_json_delta")
            tool_index = self._tool_index.get(index)
            if tool_index is None:
                if index in self._blocks:
                    return []  # a server tool's input (web search, MCP): the upstream runs it
                raise UpstreamProtocolError(
                    f"upstream sent 'input_json_delta' for content block {index}, which was never started"
                )
            if not fragment:
                return []
            return [Delta(tool_calls=(ToolCallDelta(index=tool_index, arguments=fragment),))]
        return []  # citations_delta, ...

    def _message_delta(self, payload: dict[str, object]) -> list[Delta]:
        delta = _field(payload, "delta", dict, "message_delta")
        usage = payload.get("usage")
        if usage is not None and not isinstance(usage, dict):
            raise UpstreamProtocolError("upstream 'message_delta' has a malformed 'usage'")
        output_tokens = _optional_count(usage, "output_tokens") if usage is not None else None
        stop_reason = delta.get("stop_reason")
        if stop_reason is not None and not isinstance(stop_reason, str):
            raise UpstreamProtocolError("upstream 'message_delta' has a non-string 'stop_reason'")
        # Read whole before any of it is kept: one refused is passed over whole.
        if output_tokens is not None:  # cumulative: latest wins
            self._usage = replace(self._usage, completion_tokens=output_tokens)
        if stop_reason is None or self._finish_sent:
            return []
        self._finish_sent = True
        stop_sequence = delta.get("stop_sequence")
        return [
            Delta(
                finish_reason=FINISH_REASONS.get(stop_reason, "stop"),
                stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
            )
        ]

    def _stream_error(self, payload: dict[str, object]) -> UpstreamStatusError:
        error = _field(payload, "error", dict, "error")
        type_ = error.get("type")
        type_ = type_ if isinstance(type_, str) and type_ else "api_error"
        message = error.get("message")
        if not isinstance(message, str) or not message:
            message = f"the upstream reported {type_} during streaming"
        return status_error(
            safe_message(message, secret=self._secret),
            status=ERROR_STATUS.get(type_, 500),
            type=type_,
        )


def _event_bytes(event: ServerSentEvent) -> bytes:
    """
    The event as the upstream framed it: its name (none for a data-only event, whose name is
    the default), then its data, one `data:` line per line.
    """
    head = b"" if event.event == "message" else b"event: " + event.event.encode() + b"\n"
    data = event.data.encode()
    if b"\n" in data:
        return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"
    return head + b"data: " + data + b"\n\n"


def _json_object(data: str, event_name: str) -> dict[str, object]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(
            f"upstream sent a {event_name!r} event whose data is not JSON: {data[:200]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(
            f"upstream sent a {event_name!r} event whose data is not a JSON object: {data[:200]!r}"
        )
    return obj


def _field(obj: dict[str, object], key: str, kind: type, where: str) -> Any:
    """`obj[key]`, which the protocol requires to be of type `kind`."""
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        if value is None:
            raise UpstreamProtocolError(f"upstream '{where}' lacks the required field {key!r}")
        raise UpstreamProtocolError(
            f"upstream '{where}' field {key!r} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def _count(usage: dict[str, object], key: str) -> int:
    """A token count; absent or null counts as 0."""
    return _optional_count(usage, key) or 0


def _optional_count(usage: dict[str, object], key: str) -> int | None:
    """A token count, or `None` when absent or null (cache counts often are)."""
    value = usage.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UpstreamProtocolError(f"upstream usage field {key!r} must be a non-negative integer, not {value!r}")
    return value
