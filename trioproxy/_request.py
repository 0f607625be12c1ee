"""
The client's chat request, parsed just enough to route and stream it.

A reverse proxy must not drop what it does not understand: `body` keeps the client's JSON
object whole (`tools`, `response_format`, vendor parameters), and providers that speak the
same protocol forward it with only `model` replaced. The typed fields are the few the proxy
itself acts on; each is checked here so a bad request gets a 400 naming the field.

`body` is the common model: an OpenAI Chat Completions body, which every translation takes.
A client that speaks another protocol (Anthropic Messages) is translated into it by its front,
which also keeps the client's own request (`native`): a provider of the client's protocol
forwards that instead, whole, and a field the common model cannot carry refuses the request
only when it goes to an upstream of another protocol (`common_body`).

Sans-IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from ._exceptions import RequestError

__all__ = ["ChatRequest", "NativeRequest", "WireProtocol", "parse_chat_request", "parse_json_object"]

WireProtocol = Literal["openai", "anthropic", "responses"]
"""A protocol a client or an upstream speaks: Chat Completions, Anthropic Messages, or OpenAI Responses."""

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class NativeRequest:
    """
    A client's request in its own protocol, other than the common model's.

    `headers` are the protocol's request headers an upstream of that protocol must see
    (`anthropic-version`, `anthropic-beta`). `unportable`, when set, names what the common
    model cannot carry (a field only that protocol knows): the request can go to an upstream
    of that protocol only.
    """

    protocol: WireProtocol
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    unportable: RequestError | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """
    A chat request in the common model (an OpenAI Chat Completions body).

    `model` is the name the client asked for (`provider/model`); `upstream_model` is the name
    the upstream sees, filled in by the router. `native` is the client's own request when it
    speaks another protocol than the common model's.
    """

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    upstream_model: str = ""
    native: NativeRequest | None = None

    def routed(self, upstream_model: str) -> ChatRequest:
        return replace(self, upstream_model=upstream_model)

    @property
    def protocol(self) -> WireProtocol:
        """The protocol the client speaks: an upstream's own bytes reach it only if they are in it."""
        return "openai" if self.native is None else self.native.protocol

    @property
    def client_body(self) -> dict[str, Any]:
        """The body as the client sent it (what limits measure)."""
        return self.body if self.native is None else self.native.body

    def common_body(self) -> dict[str, Any]:
        """
        `body`, for an upstream that does not speak the client's protocol; raises the
        `RequestError` naming a field of the client's request it cannot carry.
        """
        if self.native is not None and self.native.unportable is not None:
            unportable = self.native.unportable
            raise RequestError(unportable.message, param=unportable.param)
        return self.body

    @property
    def last_user_text(self) -> str:
        """The text of the last user message (content parts of type `text` joined)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""


def content_text(content: Any) -> str:
    """The text of a message's `content`, whether a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def parse_chat_request(body: dict[str, Any], *, model: str | None = None) -> ChatRequest:
    """
    Check the fields the proxy acts on and build a `ChatRequest`.

    `model` overrides `body["model"]` (the generic endpoints build it from `provider` and
    `model`).
    """
    model = body.get("model") if model is None else model
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a non-empty string", param="model")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        _check_message(message, i)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")

    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise RequestError("'stream_options' must be an object", param="stream_options")
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")

    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(f"'{name}' must be a positive integer", param=name)
        max_tokens = value
        break

    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
    )


def _check_message(message: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise RequestError(
            f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}, not {role!r}", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        raise RequestError(f"'{where}.content' is required", param=f"{where}.content")
    if not isinstance(content, (str, list)):
        raise RequestError(f"'{where}.content' must be a string or an array of content parts", param=f"{where}.content")
