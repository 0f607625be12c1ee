"""
An Anthropic Messages request (`POST /v1/messages`), read into the common model.

The request keeps two forms. Its own body goes to an Anthropic upstream whole
(`NativeRequest`): a proxy in front of Anthropic must not lose `thinking`, `cache_control`,
betas or fields that do not exist yet. Its translation into a Chat Completions body goes to
any other upstream (OpenAI-compatible, simulated). Only what Anthropic itself requires is
checked for every upstream (`model`, `messages`, `max_tokens`, `stream`); what the common
model cannot carry refuses the request only on its way to an upstream of another protocol,
with a 400 naming the field (`ChatRequest.common_body`).

The translation (Anthropic → Chat Completions):

- `system` (a string or text blocks), and a message of role `system` (Claude Code sends
  one), → a `system` message, texts joined with a blank line;
- text blocks → text parts (one text block → a string); `image` blocks with a `base64`
  source → an `image_url` data URL, with a `url` source → that URL;
- assistant `tool_use` blocks → `tool_calls` (`input` as JSON arguments), after the text;
- `tool_result` blocks → `tool` messages ahead of the rest of their user message; an
  `is_error` result's text starts with `Error: `; images in a result follow in a user
  message (tool messages carry text only);
- `tools` (`input_schema`) → function tools; `tool_choice` auto/any/tool/none →
  auto/required/function/none, `disable_parallel_tool_use` → `parallel_tool_calls: false`;
- `max_tokens`, `stop_sequences` → `stop`, `temperature`, `top_p`, `top_k` (a vendor field
  vLLM and llama.cpp read), `metadata.user_id` → `user`;
- `output_config.format` (a JSON schema) → `response_format` `json_schema`;
- dropped, because they do not change what the answer says: `cache_control` (a caching hint,
  top-level or on a block), `citations` of earlier answers (their text is kept), `thinking`
  and `redacted_thinking` blocks of earlier answers (reasoning that another model cannot
  read back), `thinking` and `output_config.effort` (how long to think: the upstream's model
  reasons by its own settings, and its reasoning comes back as thinking blocks),
  `context_management` (the conversation goes up whole instead of edited), `service_tier` and
  `speed` (Anthropic's capacity), `diagnostics` (Anthropic's cache diagnostics),
  `user_profile_id` and `workspace_id` (Anthropic's accounts), a tool's
  `eager_input_streaming` (a streaming hint) and `defer_loading` (the tool is sent up front:
  another upstream has no tool search to load it later; Claude Code marks one of its tools);
- refused, naming the field: any other field, block type or block field (documents, server
  tools, `container`, `mcp_servers`, `inference_geo` — a data-residency promise another
  upstream cannot keep —, and whatever this module does not know). A top-level field among
  them is left out of the common body with its refusal kept (`NativeRequest.uncarried`), so
  that a provider whose `drop_params` names it drops it instead.

Sans-IO.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import orjson

from .._exceptions import RequestError
from .._request import ChatRequest, carried_fields, parse_model, parse_stream, translated_request, unportable_refusal
from ..providers.anthropic import FORWARDED_HEADERS, TOOL_CHOICES

__all__ = ["parse_messages_request", "to_chat_completions"]

_ROLES: Final = ("user", "assistant", "system")

_DROPPED: Final = frozenset(
    {
        "cache_control",
        "thinking",
        "context_management",
        "service_tier",
        "speed",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
    }
)
"""Top-level fields that cannot change what the answer says; see the module's docstring."""

_BLOCK_FIELDS: Final[dict[str, frozenset[str]]] = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "image": frozenset({"type", "source", "cache_control"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
"""The fields of each block type the translation carries or drops; any other refuses the request."""

_NOT_FIELDS: Final = frozenset({"model", "max_tokens", "stream", "system", "messages"}) | _DROPPED
"""Top-level fields `to_chat_completions` carries itself, or drops: not for `carried_fields`."""
_unportable: Final = unportable_refusal("Anthropic")

_TRIOPROXY_FIELDS: Final = frozenset({"simulate"})
"""trioproxy's own request fields (the simulated upstream's faults), carried over as they are."""

_CLIENT_NAMES: Final = {
    "stop": "stop_sequences",
    "user": "metadata.user_id",
    "response_format": "output_config.format",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}
"""The Messages names of the translated fields that Chat Completions names otherwise."""


class Headers(Protocol):
    """A request's headers, looked up by lower-case name (quart's, or a plain dict)."""

    def get(self, key: str, /) -> str | None: ...


def parse_messages_request(body: dict[str, object], headers: Headers, *, counting: bool = False) -> ChatRequest:
    """
    Check what Anthropic requires of every request and build the `ChatRequest`: its native
    form with the headers an Anthropic upstream must see, and its common-model translation.
    `counting`: a `count_tokens` request, which has no `max_tokens`.
    """
    model = parse_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty array", param="messages")
    max_tokens = body.get("max_tokens")
    if counting and max_tokens is None:
        max_tokens = 1
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError("'max_tokens' is required and must be a positive integer", param="max_tokens")
    return translated_request(
        "anthropic",
        body,
        to_chat_completions,
        model=model,
        stream=parse_stream(body),
        max_tokens=max_tokens,
        names=_CLIENT_NAMES,
        headers=_forwarded_headers(headers),
    )


def _forwarded_headers(headers: Headers) -> dict[str, str]:
    """
    The protocol headers an Anthropic upstream sees as they were sent. HTTP hands a header's
    value over as Latin-1, but an upstream's headers are ASCII (as every value Anthropic
    defines is): another character could never be sent, so it refuses the request here.
    """
    forwarded = {}
    for name in FORWARDED_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if not value.isascii():
            raise RequestError(f"the '{name}' header must be ASCII, got {value[:40]!r}")
        forwarded[name] = value
    return forwarded


def to_chat_completions(body: dict[str, Any], uncarried: dict[str, RequestError] | None = None) -> dict[str, Any]:
    """
    The Chat Completions body that asks what the Messages `body` asks; raises a
    `RequestError` naming the first field it cannot carry, except a top-level field with no
    equivalent when `uncarried` is given: that is left out, and its refusal recorded there
    (an upstream's provider may drop it, `ChatRequest.common_body`).
    """
    out: dict[str, Any] = {"model": body["model"], "stream": bool(body.get("stream"))}
    if "max_tokens" in body:
        out["max_tokens"] = body["max_tokens"]
    messages: list[dict[str, object]] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _system_text(system, "system")})
    for i, message in enumerate(body["messages"]):
        messages += _messages(message, f"messages[{i}]")
    out["messages"] = messages
    out.update(carried_fields(body, skipped=_NOT_FIELDS, translate=_fields, refusal=_unportable, uncarried=uncarried))
    return out


def _fields(name: str, value: object) -> dict[str, object] | None:
    """The Chat Completions fields (none, one or more) that carry the Messages field `name`; `None` if none can."""
    if name in ("temperature", "top_p", "top_k") or name in _TRIOPROXY_FIELDS:
        return {name: value}
    if name == "stop_sequences":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise RequestError("'stop_sequences' must be an array of strings", param=name)
        return {"stop": value}
    if name == "metadata":
        user = _metadata_user(value)
        return {} if user is None else {"user": user}
    if name == "tools":
        if not isinstance(value, list):
            raise RequestError("'tools' must be an array", param=name)
        return {"tools": [_tool(tool, f"tools[{j}]") for j, tool in enumerate(value)]} if value else {}
    if name == "tool_choice":
        return _tool_choice(value)
    if name == "output_config":
        return _output_config(value)
    return None


def _system_text(system: object, where: str) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise RequestError(f"'{where}' must be a string or an array of text blocks", param=where)
    texts = []
    for j, block in enumerate(system):
        at = f"{where}[{j}]"
        if _block_type(block, at) != "text":
            raise RequestError(f"'{at}' must be a text block", param=at)
        texts.append(_text(block, at))
    return "\n\n".join(texts)


def _messages(message: object, where: str) -> list[dict[str, object]]:
    """One Messages message as Chat Completions messages (a user message with tool results gives several)."""
    if not isinstance(message, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    role = message.get("role")
    if role not in _ROLES:
        raise RequestError(f"'{where}.role' must be 'user' or 'assistant', not {role!r}", param=f"{where}.role")
    content = message.get("content")
    where = f"{where}.content"
    if role == "system":
        return [{"role": "system", "content": _system_text(content, where)}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string or an array of content blocks", param=where)
    if role == "assistant":
        return [_assistant(content, where)]
    return _user(content, where)


def _assistant(blocks: list[Any], where: str) -> dict[str, object]:
    texts: list[str] = []
    tool_calls: list[dict[str, object]] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = _block_type(block, at)
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block, at))
        elif kind not in ("thinking", "redacted_thinking"):
            raise _unportable(f"a {kind!r} block in an assistant message ('{at}')", f"{at}.type")
    message: dict[str, object] = {"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _user(blocks: list[Any], where: str) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    parts: list[dict[str, object]] = []
    result_images: list[dict[str, object]] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = _block_type(block, at)
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            result, images = _tool_result(block, at)
            results.append(result)
            result_images += images
        else:
            raise _unportable(f"a {kind!r} block ('{at}')", f"{at}.type")
    parts = result_images + parts
    if not parts:
        return results
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*results, {"role": "user", "content": parts[0]["text"]}]
    return [*results, {"role": "user", "content": parts}]


def _block_type(block: object, where: str) -> str:
    """The type of a content block whose fields the translation knows."""
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(block, dict) or not isinstance(kind, str):
        raise RequestError(f"'{where}' must be a content block: an object with a 'type'", param=where)
    known = _BLOCK_FIELDS.get(kind)
    if known is not None:
        for key in block:
            if key not in known:
                raise _unportable(f"'{where}.{key}'", f"{where}.{key}")
    return kind


def _text(block: dict[str, object], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise RequestError(f"'{where}.text' must be a string", param=f"{where}.text")
    return text


def _image(block: dict[str, object], where: str) -> dict[str, object]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        assert isinstance(source, dict)
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise RequestError(f"'{where}.source' must have a string 'media_type' and 'data'", param=f"{where}.source")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        assert isinstance(source, dict)
        url = source.get("url")
        if not isinstance(url, str):
            raise RequestError(f"'{where}.source.url' must be a string", param=f"{where}.source.url")
        return {"type": "image_url", "image_url": {"url": url}}
    raise _unportable(f"an image source of type {kind!r} ('{where}.source')", f"{where}.source.type")


def _tool_call(block: dict[str, object], where: str) -> dict[str, object]:
    id_, name, tool_input = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(id_, str) or not isinstance(name, str):
        raise RequestError(f"'{where}' must have a string 'id' and 'name'", param=where)
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": orjson.dumps(tool_input).decode()}}


def _tool_result(block: dict[str, object], where: str) -> tuple[dict[str, object], list[dict[str, object]]]:
    """The `tool` message of a `tool_result`, and the images it returned (they go in a user message)."""
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str):
        raise RequestError(f"'{where}.tool_use_id' must be a string", param=f"{where}.tool_use_id")
    content = block.get("content", "")
    images: list[dict[str, object]] = []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = _block_type(part, at)
            if kind == "text":
                texts.append(_text(part, at))
            elif kind == "image":
                images.append(_image(part, at))
            else:
                raise _unportable(f"a {kind!r} block in a tool result ('{at}')", f"{at}.type")
        text = "\n".join(texts)
    else:
        raise RequestError(f"'{where}.content' must be a string or an array of blocks", param=f"{where}.content")
    if block.get("is_error") is True:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images


def _tool(tool: object, where: str) -> dict[str, object]:
    if not isinstance(tool, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    kind = tool.get("type", "custom")
    if kind != "custom":
        raise _unportable(f"a server tool of type {kind!r} ('{where}')", f"{where}.type")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"'{where}.name' must be a non-empty string", param=f"{where}.name")
    function: dict[str, object] = {"name": name}
    for key, value in tool.items():
        if key in ("type", "name", "cache_control", "eager_input_streaming", "defer_loading"):
            continue
        if key == "description":
            function["description"] = value
        elif key == "input_schema":
            function["parameters"] = value
        elif key == "strict":
            function["strict"] = value
        else:
            raise _unportable(f"'{where}.{key}'", f"{where}.{key}")
    return {"type": "function", "function": function}


def _tool_choice(choice: object) -> dict[str, object]:
    """The Chat Completions fields that say what `tool_choice` says."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(kind, str) or (kind not in TOOL_CHOICES and kind != "tool"):
        raise RequestError("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", param="tool_choice.type")
    out: dict[str, object] = {}
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("'tool_choice.name' must be a non-empty string", param="tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        out["tool_choice"] = TOOL_CHOICES[kind]
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


def _metadata_user(metadata: object) -> str | None:
    if not isinstance(metadata, dict):
        raise RequestError("'metadata' must be an object", param="metadata")
    for key in metadata:
        if key != "user_id":
            raise _unportable(f"'metadata.{key}'", f"metadata.{key}")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise RequestError("'metadata.user_id' must be a string", param="metadata.user_id")
    return user


def _output_config(config: object) -> dict[str, object]:
    """`response_format` for a JSON schema `format`; `effort` is dropped."""
    if not isinstance(config, dict):
        raise RequestError("'output_config' must be an object", param="output_config")
    out: dict[str, object] = {}
    for key, value in config.items():
        if key == "format" and value is not None:
            schema = value.get("schema") if isinstance(value, dict) else None
            if not isinstance(value, dict) or value.get("type") != "json_schema" or not isinstance(schema, dict):
                raise RequestError(
                    '\'output_config.format\' must be {"type": "json_schema", "schema": {...}}',
                    param="output_config.format",
                )
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        elif key not in ("effort", "format"):
            raise _unportable(f"'output_config.{key}'", f"output_config.{key}")
    return out
