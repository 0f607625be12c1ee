"""
An OpenAI Responses request (`POST /v1/responses`), read into the common model.

As on the Anthropic front, the request keeps two forms: its own body (`NativeRequest`), for
an upstream that speaks Responses, and its translation into a Chat Completions body for any
other upstream. Only what every upstream needs is checked up front (`model`, `input`,
`stream`); what the common model cannot carry refuses the request, with a 400 naming the
field, only on its way to an upstream of another protocol (`ChatRequest.common_body`).

The translation (Responses → Chat Completions, `responses_protocol.md` §6):

- `instructions` → a first `system` message; `input` as a string → one user message;
- `message` items (roles user, assistant, system, developer; `type` may be left out):
  `input_text`/`output_text`/`refusal` parts → text (one text part → a string),
  `input_image` with an `image_url` → an `image_url` part (with its `detail`);
- consecutive `function_call` items → one assistant message's `tool_calls` (joined to the
  assistant message just before them); `function_call_output` → a `tool` message (a list of
  parts: its texts joined; its images follow in a user message after the tool messages);
- function `tools` (flat) → nested under `function`, the function tools of a `namespace`
  (Codex groups its sub-agent tools so) likewise, flattened; `tool_choice` none/auto/required
  or a named function; `parallel_tool_calls`, `temperature`, `top_p`, `user`,
  `prompt_cache_key`, `safety_identifier`, `service_tier` as they are;
  `max_output_tokens` → `max_tokens`; `reasoning.effort` → `reasoning_effort`;
  `text.format` json_schema/json_object → `response_format`; `text.verbosity` → `verbosity`;
- dropped, because they do not change what the answer says (the README lists them):
  `reasoning` input items and `reasoning.summary` (reasoning another model cannot read back;
  the upstream's own reasoning streams back as reasoning summary events), `include` (extra
  output fields such as encrypted reasoning, which a Chat Completions upstream has none of),
  `store`, `background` and `metadata` (what the proxy itself does with the response: stores
  it, runs it apart from its request, echoes them in the Response object),
  `truncation` (the upstream's own context limit applies), `stream_options` (obfuscation
  padding), Codex's `client_metadata`, and the tools OpenAI runs on its own servers
  (`web_search`, `file_search`, `code_interpreter`, `image_generation`, `mcp`,
  `computer_use_preview`: another upstream cannot run them, so its model answers without
  them; Codex offers `web_search` on every turn);
- refused, naming the field: tools the client runs in shapes other than a function
  (`local_shell`, `shell`, `apply_patch`, `custom`) and every call item but a function's
  (a hosted tool's among them), a `tool_choice` of another type, `input_file`, an image
  given as a `file_id`, `item_reference`, `previous_response_id`, `conversation` and
  `prompt` (they name objects stored elsewhere; the front resolves `previous_response_id`
  from its own store before translating), `max_tool_calls`,
  `top_logprobs`, and any field this module does not know. A top-level field among them is
  left out of the common body with its refusal kept (`NativeRequest.uncarried`), so that a
  provider whose `drop_params` names it drops it instead.

Sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .._exceptions import RequestError
from .._request import (
    ChatRequest,
    carried_fields,
    parse_max_tokens,
    parse_model,
    parse_stream,
    translated_request,
    unportable_refusal,
)

__all__ = ["Turn", "continued", "input_items", "listed_input_items", "parse_responses_request", "to_chat_completions"]

_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})

_SAME_NAME: Final = frozenset(
    {"parallel_tool_calls", "temperature", "top_p", "user", "prompt_cache_key", "safety_identifier", "service_tier"}
)
"""Fields Chat Completions has under the same name and meaning."""

_DROPPED: Final = frozenset(
    {"include", "store", "background", "metadata", "truncation", "stream_options", "client_metadata"}
)
"""Top-level fields that do not change what the answer says; see the module's docstring."""

_NOT_FIELDS: Final = frozenset({"model", "stream", "instructions", "input"}) | _DROPPED
"""Top-level fields `to_chat_completions` carries itself, or drops: not for `carried_fields`."""
_unportable: Final = unportable_refusal("OpenAI Responses")

_TRIOPROXY_FIELDS: Final = frozenset({"simulate"})
"""trioproxy's own request fields (the simulated upstream's faults), carried over as they are."""

_CLIENT_NAMES: Final = {
    "max_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "response_format": "text.format",
    "verbosity": "text.verbosity",
}
"""The Responses names of the translated fields that Chat Completions names otherwise."""

_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "refusal"})

_HOSTED_TOOLS: Final = ("web_search", "file_search", "code_interpreter", "image_generation", "mcp", "computer_use")
"""Tools OpenAI runs on its own servers (and their dated variants): dropped for another upstream."""


def parse_responses_request(body: dict[str, Any]) -> ChatRequest:
    """
    Check what every Responses request needs and build the `ChatRequest`: its native form,
    and its common-model translation (or the error naming what that cannot carry).
    """
    model = parse_model(body)
    input_ = body.get("input")
    if not (isinstance(input_, str) and input_) and not (isinstance(input_, list) and input_):
        raise RequestError("'input' is required: a non-empty string or array of input items", param="input")
    stream = parse_stream(body)
    max_tokens = parse_max_tokens(body, names=("max_output_tokens",))
    return translated_request(
        "responses", body, to_chat_completions, model=model, stream=stream, max_tokens=max_tokens, names=_CLIENT_NAMES
    )


@dataclass(frozen=True, slots=True)
class Turn:
    """
    A response, as a later `previous_response_id` continues it: the whole input it answered
    (its own predecessors' included) and its output items.
    """

    id: str
    input: list[Any]
    output: list[Any]


def input_items(body: dict[str, Any]) -> list[Any]:
    """The request's `input` as items (a string is one user message)."""
    input_ = body["input"]
    return [{"type": "message", "role": "user", "content": input_}] if isinstance(input_, str) else list(input_)


_ITEM_ID_PREFIXES: Final = {"message": "msg", "function_call": "fc", "reasoning": "rs"}


def listed_input_items(response_id: str, items: list[Any]) -> list[dict[str, Any]]:
    """
    A stored response's input items as `GET /v1/responses/{id}/input_items` lists them: each
    with an id (an item sent without one, as Codex sends them all, gets one made of the
    response's id and its place, so that a cursor names the same item on every call), a
    message's `type` and `status`, and its content as parts (a string is one text part).
    """
    listed = []
    for index, item in enumerate(items):
        out = dict(item) if isinstance(item, dict) else {"type": "message", "role": "user", "content": str(item)}
        kind = out.setdefault("type", "message")
        if kind == "message":
            out.setdefault("status", "completed")
            if isinstance(out.get("content"), str):
                text_type = "output_text" if out.get("role") == "assistant" else "input_text"
                out["content"] = [{"type": text_type, "text": out["content"]}]
        if not isinstance(out.get("id"), str):
            prefix = _ITEM_ID_PREFIXES.get(kind, "item") if isinstance(kind, str) else "item"
            out["id"] = f"{prefix}_{response_id.removeprefix('resp_')}_{index}"
        listed.append(out)
    return listed


def continued(body: dict[str, Any], previous: Turn) -> dict[str, Any]:
    """
    The request `body` continuing `previous` for an upstream with no notion of earlier
    responses: the conversation rebuilt (the earlier input, its output, then the new input),
    without `previous_response_id`. `instructions` are not inherited, as in the API.
    """
    out = {key: value for key, value in body.items() if key != "previous_response_id"}
    out["input"] = [*previous.input, *previous.output, *input_items(body)]
    return out


def to_chat_completions(body: dict[str, Any], uncarried: dict[str, RequestError] | None = None) -> dict[str, Any]:
    """
    The Chat Completions body that asks what the Responses `body` asks; raises a
    `RequestError` naming the first field it cannot carry, except a top-level field with no
    equivalent when `uncarried` is given: that is left out, and its refusal recorded there
    (an upstream's provider may drop it, `ChatRequest.common_body`).
    """
    out: dict[str, object] = {"model": body["model"], "stream": bool(body.get("stream"))}
    messages: list[dict[str, object]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    input_ = body["input"]
    if isinstance(input_, str):
        messages.append({"role": "user", "content": input_})
    else:
        messages += _messages(input_)
    out["messages"] = messages
    out.update(carried_fields(body, skipped=_NOT_FIELDS, translate=_fields, refusal=_unportable, uncarried=uncarried))
    return out


def _fields(name: str, value: object) -> dict[str, object] | None:
    """The Chat Completions fields (none, one or more) that carry the Responses field `name`; `None` if none can."""
    if name in _SAME_NAME or name in _TRIOPROXY_FIELDS:
        return {name: value}
    if name == "max_output_tokens":
        return {} if value is None else {"max_tokens": value}
    if name == "tools":
        if not isinstance(value, list):
            raise RequestError("'tools' must be an array", param=name)
        tools = [function for j, tool in enumerate(value) for function in _tools(tool, f"tools[{j}]")]
        return {"tools": tools} if tools else {}
    if name == "tool_choice":
        return {"tool_choice": _tool_choice(value)}
    if name == "reasoning":
        return _reasoning(value)
    if name == "text":
        return _text_config(value)
    unset = value is None or value is False
    if name in ("previous_response_id", "conversation", "prompt", "max_tool_calls") and unset:
        return {}  # nothing to carry
    return None


class _Conversation:
    """Chat messages built item by item: tool calls join their assistant message, tool images wait."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._result_images: list[dict[str, Any]] = []
        """Images returned by tool calls: a user message after the run of tool messages."""

    def add(self, message: dict[str, Any]) -> None:
        if message["role"] != "tool":
            self._flush_images()
        self.messages.append(message)

    def add_tool_call(self, call: dict[str, Any]) -> None:
        self._flush_images()
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None}
            self.messages.append(last)
        last.setdefault("tool_calls", []).append(call)

    def add_result_images(self, images: list[dict[str, Any]]) -> None:
        self._result_images += images

    def finish(self) -> list[dict[str, Any]]:
        self._flush_images()
        return self.messages

    def _flush_images(self) -> None:
        if self._result_images:
            self.messages.append({"role": "user", "content": self._result_images})
            self._result_images = []


def _messages(items: list[Any]) -> list[dict[str, object]]:
    conversation = _Conversation()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"'{where}' must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            conversation.add(_message(item, where))
        elif kind == "function_call":
            conversation.add_tool_call(_function_call(item, where))
        elif kind == "function_call_output":
            result, images = _function_call_output(item, where)
            conversation.add(result)
            conversation.add_result_images(images)
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _unportable(f"an 'item_reference' item ('{where}')", f"{where}.type")
        else:
            raise _unportable(f"an item of type {kind!r} ('{where}')", f"{where}.type")
    return conversation.finish()


def _message(item: dict[str, object], where: str) -> dict[str, object]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise RequestError(
            f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}, not {role!r}", param=f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise RequestError(f"'{where}.content' must be a string or an array of parts", param=f"{where}.content")
    parts = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    texts = [part["text"] for part in parts if part["type"] == "text"]
    if role == "assistant":
        if len(texts) < len(parts):
            raise RequestError(f"'{where}.content' of an assistant message must be text", param=f"{where}.content")
        return {"role": role, "content": "".join(texts)}
    if len(parts) == 1 and texts:
        return {"role": role, "content": texts[0]}
    return {"role": role, "content": parts}


def _part(part: object, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str):
        raise RequestError(f"'{where}' must be a content part: an object with a 'type'", param=where)
    assert isinstance(part, dict)
    if kind in _TEXT_PARTS:
        key = "refusal" if kind == "refusal" else "text"
        text = part.get(key)
        if not isinstance(text, str):
            raise RequestError(f"'{where}.{key}' must be a string", param=f"{where}.{key}")
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise _unportable(f"an image without an 'image_url' ('{where}')", f"{where}.image_url")
        image: dict[str, object] = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise _unportable(f"a {kind!r} part ('{where}')", f"{where}.type")


def _function_call(item: dict[str, object], where: str) -> dict[str, object]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, str):
        raise RequestError(f"'{where}' must have a string 'call_id', 'name' and 'arguments'", param=where)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_call_output(item: dict[str, object], where: str) -> tuple[dict[str, object], list[dict[str, object]]]:
    """The `tool` message of a function call's output, and the images it returned."""
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise RequestError(f"'{where}.call_id' must be a string", param=f"{where}.call_id")
    images: list[dict[str, object]] = []
    if isinstance(output, str):
        text = output
    elif isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            converted = _part(part, f"{where}.output[{j}]")
            if converted["type"] == "text":
                texts.append(converted["text"])
            else:
                images.append(converted)
        text = "\n".join(texts)
    else:
        raise RequestError(f"'{where}.output' must be a string or an array of parts", param=f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": text}, images


def _tools(tool: object, where: str) -> list[dict[str, object]]:
    """The function tools `tool` stands for: itself, a namespace's functions, or none for a hosted tool."""
    if not isinstance(tool, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    kind = tool.get("type")
    if isinstance(kind, str) and kind.startswith(_HOSTED_TOOLS):
        return []
    if kind == "namespace":
        functions = tool.get("tools")
        if not isinstance(functions, list):
            raise RequestError(f"'{where}.tools' must be an array", param=f"{where}.tools")
        return [_tool(function, f"{where}.tools[{j}]") for j, function in enumerate(functions)]
    return [_tool(tool, where)]


def _tool(tool: object, where: str) -> dict[str, object]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise _unportable(f"a tool of type {kind!r} ('{where}')", f"{where}.type")
    assert isinstance(tool, dict)
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"'{where}.name' must be a non-empty string", param=f"{where}.name")
    function: dict[str, object] = {"name": name}
    for key, value in tool.items():
        if key in ("type", "name"):
            continue
        if key in ("description", "parameters", "strict"):
            if value is not None:
                function[key] = value
        else:
            raise _unportable(f"'{where}.{key}'", f"{where}.{key}")
    return {"type": "function", "function": function}


def _tool_choice(choice: object) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":
        assert isinstance(choice, dict)
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("'tool_choice.name' must be a non-empty string", param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    if isinstance(kind, str):
        raise _unportable(f"a tool_choice of type {kind!r}", "tool_choice.type")
    raise RequestError(
        "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
        param="tool_choice",
    )


def _reasoning(reasoning: object) -> dict[str, object]:
    """`reasoning_effort` for `effort`; `summary` is dropped."""
    if reasoning is None:
        return {}
    if not isinstance(reasoning, dict):
        raise RequestError("'reasoning' must be an object", param="reasoning")
    out: dict[str, object] = {}
    for key, value in reasoning.items():
        if key == "effort":
            if value is not None:
                out["reasoning_effort"] = value
        elif key not in ("summary", "generate_summary"):
            raise _unportable(f"'reasoning.{key}'", f"reasoning.{key}")
    return out


def _text_config(text: object) -> dict[str, object]:
    """`response_format` for a JSON `format`, `verbosity` as it is."""
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise RequestError("'text' must be an object", param="text")
    out: dict[str, object] = {}
    for key, value in text.items():
        if key == "verbosity":
            if value is not None:
                out["verbosity"] = value
        elif key == "format":
            out.update(_format(value))
        else:
            raise _unportable(f"'text.{key}'", f"text.{key}")
    return out


def _format(format_: object) -> dict[str, object]:
    if format_ is None:
        return {}
    if not isinstance(format_, dict):
        raise RequestError("'text.format' must be an object with a 'type'", param="text.format")
    kind = format_.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        name, schema = format_.get("name"), format_.get("schema")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise RequestError(
                "'text.format' of type json_schema needs a string 'name' and an object 'schema'", param="text.format"
            )
        json_schema = {key: value for key, value in format_.items() if key != "type"}
        return {"response_format": {"type": "json_schema", "json_schema": json_schema}}
    raise RequestError("'text.format.type' must be 'text', 'json_object' or 'json_schema'", param="text.format.type")
