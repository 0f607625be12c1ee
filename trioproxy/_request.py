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

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import orjson

from ._exceptions import RequestError

if TYPE_CHECKING:
    from ._tracing import AttemptTrace

__all__ = [
    "MAX_JSON_DEPTH",
    "ChatRequest",
    "DropParams",
    "NativeRequest",
    "WireProtocol",
    "carried_fields",
    "drops",
    "parse_chat_request",
    "parse_completion_request",
    "parse_embedding_request",
    "parse_json_object",
    "parse_max_tokens",
    "parse_model",
    "parse_stream",
    "translated_request",
    "unportable_refusal",
]

WireProtocol = Literal["openai", "anthropic", "responses", "completions", "embeddings"]
"""
A protocol a client or an upstream speaks: Chat Completions, Anthropic Messages, OpenAI Responses,
or one of OpenAI's other endpoints, legacy text completions and embeddings (which only an
OpenAI-compatible upstream serves).
"""

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

DropParams: TypeAlias = bool | frozenset[str]
"""
A provider's `drop_params`: which fields of a client's request the translation to its
protocol drops instead of refusing, where it has no equivalent for them: all (`True`), those
named (as the client sent them, or as Chat Completions names them), or none (`False`, the
default).
"""


def drops(drop_params: DropParams, *names: str) -> bool:
    """Whether `drop_params` drops a field known by any of `names`."""
    if isinstance(drop_params, bool):
        return drop_params
    return any(name in drop_params for name in names)


MAX_JSON_DEPTH: Final = 128
"""
How deeply a body's arrays and objects may nest, the body itself being level 1. Far beyond a
real request (a `tools` JSON schema nests a few dozen levels at most), and well within what
the body must survive after it was read: orjson serialises it again for the upstream, and
refuses beyond 254 levels; the checks that walk the body must not recurse past Python's stack.
"""


@dataclass(frozen=True, slots=True)
class NativeRequest:
    """
    A client's request in its own protocol, other than the common model's.

    `headers` are the protocol's request headers an upstream of that protocol must see
    (`anthropic-version`, `anthropic-beta`). `unportable`, when set, names what the common
    model cannot carry (a block or item only that protocol knows): the request can go to an
    upstream of that protocol only. `uncarried` are the top-level fields it has no equivalent
    for, each with its refusal, left out of the common body: an upstream of another protocol
    refuses the request for them too, unless its provider drops them (`drop_params`). `names`
    are the client's names of the common body's fields where its protocol names them otherwise
    (`text.format` for `response_format`), so that a translation that refuses one names what
    the client sent.
    """

    protocol: WireProtocol
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    unportable: RequestError | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    uncarried: Mapping[str, RequestError] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """
    A chat request in the common model (an OpenAI Chat Completions body).

    `model` is the name the client asked for (`provider/model`); `upstream_model` is the name
    the upstream sees, filled in by the router. `native` is the client's own request when it
    speaks another protocol than the common model's. `trace`, when tracing is on, is the
    upstream attempt this request is sent as: the upstream layer tells it the target it chose
    and sends its trace context along.
    """

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    upstream_model: str = ""
    native: NativeRequest | None = None
    trace: AttemptTrace | None = None

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

    def common_body(self, drop_params: DropParams = False) -> dict[str, Any]:
        """
        `body`, for an upstream that does not speak the client's protocol; raises the
        `RequestError` naming a field of the client's request it cannot carry, unless the
        upstream's provider drops it (`drop_params`, for a top-level field).
        """
        if self.native is None:
            return self.body
        uncarried = (error for name, error in self.native.uncarried.items() if not drops(drop_params, name))
        refusal = self.native.unportable or next(uncarried, None)
        if refusal is not None:
            raise RequestError(refusal.message, param=refusal.param)
        return self.body

    def client_name(self, name: str) -> str:
        """What the client called the common body's field `name`."""
        return name if self.native is None else self.native.names.get(name, name)

    @property
    def last_user_text(self) -> str:
        """The text of the last user message (content parts of type `text` joined)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""


def content_text(content: object) -> str:
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


def parse_json_object(raw: bytes | str, *, what: str = "request body") -> dict[str, Any]:
    """
    Parse `what` (a request body, a WebSocket message), which must be one JSON object nested
    at most `MAX_JSON_DEPTH` levels.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(_not_json(raw, exc, what)) from None
    if not isinstance(body, dict):
        raise RequestError(f"{what} must be a JSON object, not {type(body).__name__}")
    openings = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if openings > MAX_JSON_DEPTH and _nested_deeper(body, MAX_JSON_DEPTH):
        raise RequestError(_too_deep(what))
    return body


def _not_json(raw: bytes | str, exc: orjson.JSONDecodeError, what: str) -> str:
    """Why `raw` is no JSON, in the client's terms: bad UTF-8 by its offset, nesting by our limit."""
    if isinstance(raw, bytes):
        try:
            raw.decode()
        except UnicodeDecodeError as bad:
            return f"{what} is not valid UTF-8 (at byte {bad.start})"
    if exc.msg.startswith("depth limit"):  # orjson's own, far beyond ours
        return _too_deep(what)
    return f"{what} is not valid JSON: {exc}"


def _too_deep(what: str) -> str:
    return f"{what} is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"


def _nested_deeper(body: dict[str, Any], limit: int) -> bool:
    """Whether `body` nests deeper than `limit` levels; one pass without recursion, over at most every value once."""
    stack: list[tuple[dict[str, object] | list[object], int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_chat_request(body: dict[str, Any], *, model: str | None = None) -> ChatRequest:
    """
    Check the fields the proxy acts on and build a `ChatRequest`.

    `model` overrides `body["model"]` (the generic endpoints build it from `provider` and
    `model`).
    """
    model = parse_model(body if model is None else {"model": model})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        _check_message(message, i)

    stream, include_usage = _stream_fields(body)
    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=parse_max_tokens(body),
    )


def parse_completion_request(body: dict[str, Any]) -> ChatRequest:
    """
    A legacy text completion (`POST /v1/completions`): `model` and `prompt` checked, the body
    kept whole as the native request (`suffix`, `echo`, `logprobs`, `best_of` and every other
    field reach the upstream as sent). The common model sees the prompt as one user message,
    for estimates only: a prompt to continue is not a chat turn, so the request goes to an
    OpenAI-compatible upstream only.
    """
    model = parse_model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise RequestError("'prompt' is required: a string, or an array of strings or tokens", param="prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise RequestError("'suffix' must be a string", param="suffix")
    stream, include_usage = _stream_fields(body)
    for name in ("n", "best_of"):
        value = body.get(name)
        if not stream and isinstance(value, int) and value > 1:
            raise RequestError(
                f"'{name}' above 1 needs 'stream': true here: a whole answer is folded from the stream's first choice",
                param=name,
            )
    return _native_request(
        "completions",
        body,
        model,
        prompt,
        stream=stream,
        include_usage=include_usage,
        max_tokens=parse_max_tokens(body, names=("max_tokens",)),
    )


def parse_embedding_request(body: dict[str, Any]) -> ChatRequest:
    """`POST /v1/embeddings`: `model` and `input` checked, the body kept whole for an OpenAI-compatible upstream."""
    model = parse_model(body)
    inputs = body.get("input")
    if not isinstance(inputs, (str, list)) or not inputs:
        raise RequestError("'input' is required: a string, or an array of strings or tokens", param="input")
    return _native_request("embeddings", body, model, inputs)


def _native_request(
    protocol: WireProtocol,
    body: dict[str, Any],
    model: str,
    text: str | list[Any],
    *,
    stream: bool = False,
    include_usage: bool = False,
    max_tokens: int | None = None,
) -> ChatRequest:
    """A request of one of OpenAI's other endpoints, which the common model cannot carry."""
    content = text if isinstance(text, str) else "".join(part for part in text if isinstance(part, str))
    messages = [{"role": "user", "content": content}]
    path = "/v1/completions" if protocol == "completions" else "/v1/embeddings"
    unportable = RequestError(
        f'POST {path} is served by OpenAI-compatible upstreams only (providers of type "openai"); '
        f"model {model!r} routes to another",
        param="model",
    )
    return ChatRequest(
        body={"model": model, "messages": messages, "stream": stream},
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        native=NativeRequest(protocol, body, unportable=unportable),
    )


def translated_request(
    protocol: WireProtocol,
    body: dict[str, Any],
    translate: Callable[[dict[str, Any], dict[str, RequestError]], dict[str, Any]],
    *,
    model: str,
    stream: bool,
    max_tokens: int | None,
    names: Mapping[str, str],
    headers: Mapping[str, str] | None = None,
) -> ChatRequest:
    """
    A request of a protocol with a translation into the common model (Anthropic Messages,
    OpenAI Responses), its fields the proxy acts on already checked: kept whole (`native`),
    with what `translate` makes of it. What the translation cannot carry is not refused here
    but kept with its refusal (`NativeRequest.unportable`, `uncarried`), since an upstream of
    the client's own protocol takes the request as it is (`common_body`).
    """
    unportable: RequestError | None = None
    uncarried: dict[str, RequestError] = {}
    try:
        common = translate(body, uncarried)
    except RequestError as exc:
        unportable = exc
        # Never sent anywhere (`common_body` refuses it): enough to account for the request.
        common = {"model": model, "messages": [], "stream": stream}
        if max_tokens is not None:
            common["max_tokens"] = max_tokens
    return ChatRequest(
        body=common,
        model=model,
        messages=common["messages"],
        stream=stream,
        max_tokens=max_tokens,
        native=NativeRequest(protocol, body, headers or {}, unportable, names, uncarried),
    )


def carried_fields(
    body: Mapping[str, Any],
    *,
    skipped: Collection[str],
    translate: Callable[[str, object], dict[str, object] | None],
    refusal: Callable[[str, str], RequestError],
    uncarried: dict[str, RequestError] | None,
) -> dict[str, object]:
    """
    The common-model fields that carry `body`'s top-level fields but the `skipped` ones (those
    a translation takes apart, or drops), as `translate` makes them of each (`None`: no
    equivalent). A field with no equivalent raises its `refusal` (the field as a message names
    it, and as `param`), unless `uncarried` is given: then it is left out and its refusal
    recorded there, for the provider of an upstream to drop (`ChatRequest.common_body`).
    """
    out: dict[str, object] = {}
    for name, value in body.items():
        if name in skipped:
            continue
        fields = translate(name, value)
        if fields is not None:
            out.update(fields)
        elif uncarried is None:
            raise refusal(f"'{name}'", name)
        else:
            uncarried[name] = refusal(f"'{name}'", name)
    return out


def unportable_refusal(upstreams: str) -> Callable[[str, str], RequestError]:
    """
    How a translation from a protocol only `upstreams` upstreams speak refuses what it has no
    equivalent for: the refusal of `what` (a phrase naming it) at `param`.
    """

    def refusal(what: str, param: str) -> RequestError:
        return RequestError(
            f"{what} is understood by {upstreams} upstreams only; this model's upstream is not one", param=param
        )

    return refusal


def parse_model(body: dict[str, Any]) -> str:
    """`model`, which every protocol requires."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a non-empty string", param="model")
    return model


def parse_stream(body: dict[str, Any]) -> bool:
    """`stream`: a boolean, `null` or left out meaning `false` in every protocol."""
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    return stream


def _stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream`, and whether `stream_options` asks for usage."""
    stream = parse_stream(body)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise RequestError("'stream_options' must be an object", param="stream_options")
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    return stream, include_usage


def parse_max_tokens(
    body: dict[str, Any], *, names: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
) -> int | None:
    """The first of `names` that is set: a positive integer; `None` when none is."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(f"'{name}' must be a positive integer", param=name)
        return value
    return None


def _check_message(message: object, i: int) -> None:
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
