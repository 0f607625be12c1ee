"""
Translation for OpenAI-compatible upstreams: OpenAI itself, vLLM, llama.cpp, Ollama, and any
gateway that speaks Chat Completions.

For an OpenAI client the translation is almost the identity: the client's body is forwarded
whole with only `model` replaced (and usage asked for, so that the proxy can count tokens),
and each upstream chunk keeps its exact bytes in `Delta.raw` so the client receives them
untouched. Chunks are still parsed, because stages, first-token detection and token
accounting need to see the text. A client of another protocol is sent the common model's body
(`ChatRequest.common_body`), and its renderer builds its events from the parsed deltas.

The same upstreams serve OpenAI's other endpoints, which the common model does not carry:
a legacy text completion (`ChatRequest.native` of protocol "completions") goes whole to
`{base_url}/completions`, streamed, and its `text_completion` chunks are parsed like chat
chunks (their `text` is the delta's) and kept byte for byte; an embeddings request goes whole
to `{base_url}/embeddings`, and its JSON answer is one delta carrying it unchanged.

Besides the standard fields, the parser reads the reasoning that OpenAI-compatible servers
stream (`reasoning_content` from vLLM and DeepSeek, `reasoning` from newer vLLM), vLLM's
`stop_reason` (the stop string that matched) and the prompt's cached tokens.

Sans-IO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from .._events import Delta, ToolCallDelta, Usage
from .._exceptions import UpstreamProtocolError, UpstreamStatusError
from .._request import ChatRequest, DropParams, WireProtocol
from .._sse import ServerSentEvent
from ._base import CUT_SHORT, StreamParser, UpstreamRequest, is_count, retry_after_seconds, safe_message, status_error

__all__ = ["OpenAIStreamParser", "OpenAITranslation", "delta_from_chunk", "delta_from_text_completion"]


class OpenAITranslation:
    """
    Requests to `{base_url}/chat/completions`.

    `request_usage` asks the upstream for `stream_options.include_usage` whatever the client
    asked, so every stream is counted from the upstream's own figures; the OpenAI front
    adapter drops the usage chunk again for a client that did not ask for it. `drop_params`
    drops the fields of another protocol's client that Chat Completions has no equivalent for
    (`ChatRequest.common_body`), instead of refusing them.
    """

    protocol: WireProtocol = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        request_usage: bool = True,
        drop_params: DropParams = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.api_key = api_key
        self.request_usage = request_usage
        self.drop_params = drop_params
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        headers.update({k.lower(): v for k, v in (extra_headers or {}).items()})
        self._credentials = {k: v for k, v in headers.items() if k != "content-type"}
        self._stream_headers = {**headers, "accept": "text/event-stream"}
        self._answer_headers = {**headers, "accept": "application/json"}

    def stream_request(self, chat: ChatRequest) -> UpstreamRequest:
        native = chat.native
        if native is not None and native.protocol == "embeddings":
            body = {**native.body, "model": chat.upstream_model}
            url = self.base_url + "/embeddings"
            return UpstreamRequest(url, self._answer_headers, orjson.dumps(body), answer=_embeddings_delta)
        if native is not None and native.protocol == "completions":
            return UpstreamRequest(
                self.base_url + "/completions", self._stream_headers, self._streamed(chat, native.body)
            )
        return UpstreamRequest(self.url, self._stream_headers, self._streamed(chat, chat.common_body(self.drop_params)))

    def _streamed(self, chat: ChatRequest, client_body: dict[str, Any]) -> bytes:
        """The client's body, asking for `chat.upstream_model`, streamed (with usage, if `request_usage`)."""
        body = {**client_body, "model": chat.upstream_model, "stream": True}
        if self.request_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(body)

    def count_tokens_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        return None  # Chat Completions has no endpoint that counts tokens

    def forward_url(self, target: str) -> str:
        """`base_url` stands for `/v1`, as in the SDKs (`/v1/files` → `{base_url}/files`)."""
        return self.base_url + target.removeprefix("/v1")

    def forward_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {**headers, **self._credentials}

    def compact_request(self, chat: ChatRequest) -> UpstreamRequest | None:
        return None  # nor one that compacts a conversation

    def stream_parser(self, chat: ChatRequest) -> StreamParser:
        if chat.protocol == "completions":
            return OpenAIStreamParser(secret=self.api_key, keep_raw=True, read=delta_from_text_completion)
        return OpenAIStreamParser(secret=self.api_key, keep_raw=chat.protocol == self.protocol)

    def error_from_response(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamStatusError:
        message, type_, code = _error_fields(body)
        if not message:
            message = f"upstream answered HTTP {status}"
        return status_error(
            safe_message(message, secret=self.api_key),
            status=status,
            type=type_,
            code=code,
            retry_after=retry_after_seconds(headers),
        )


class OpenAIStreamParser:
    """
    Parses `chat.completion.chunk` events (or, with `read`, another kind of chunk of the same
    framing: `text_completion`); `[DONE]` ends the stream, and so does the end of the body after
    a finish reason (some OpenAI-compatible servers never send `[DONE]`).

    `secret` (the provider's API key) is masked in the messages of in-stream errors;
    `keep_raw` keeps each chunk's event bytes in its delta.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        keep_raw: bool,
        read: Callable[..., Delta] | None = None,
    ) -> None:
        self._finished = False
        self._finish_seen = False
        self._secret = secret
        self._keep_raw = keep_raw
        self._read = read or delta_from_chunk

    @property
    def finished(self) -> bool:
        return self._finished

    def end(self) -> list[Delta]:
        if not self._finish_seen:
            raise UpstreamProtocolError(CUT_SHORT)
        self._finished = True
        return []

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        data = event.data
        if self._finished:
            return []
        if data.startswith("[DONE]"):
            self._finished = True
            return []
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(f"upstream sent a chunk that is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(f"upstream sent a chunk that is not a JSON object: {data[:200]!r}")
        error = chunk.get("error")
        if error:
            raise _in_stream_error(error, secret=self._secret)
        delta = self._read(chunk, raw=b"data: " + data.encode() + b"\n\n" if self._keep_raw else None)
        if delta.finish_reason is not None:
            self._finish_seen = True
        return [delta]


def delta_from_chunk(chunk: dict[str, Any], *, raw: bytes | None = None) -> Delta:
    """The delta of choice 0 of one `chat.completion.chunk` (other choices stay in `raw`)."""
    delta = Delta(raw=raw)
    choices = _choices(chunk, delta)
    if not choices:
        return delta
    choice = choices[0]
    delta.finish_reason = _string(choice, "finish_reason")
    body = choice.get("delta") or {}
    if not isinstance(body, dict):
        raise UpstreamProtocolError("upstream chunk has a malformed 'delta'")
    delta.role = _string(body, "role")
    delta.text = _string(body, "content") or ""
    reasoning = body.get("reasoning_content", body.get("reasoning"))
    if isinstance(reasoning, str):
        delta.reasoning = reasoning
    stop_reason = choice.get("stop_reason")
    if isinstance(stop_reason, str) and delta.finish_reason == "stop":
        delta.stop_sequence = stop_reason
    tool_calls = body.get("tool_calls")
    if tool_calls:
        if not isinstance(tool_calls, list):
            raise UpstreamProtocolError("upstream chunk has a malformed 'tool_calls' array")
        delta.tool_calls = tuple(_tool_call(tc) for tc in tool_calls)
    return delta


def delta_from_text_completion(chunk: dict[str, Any], *, raw: bytes | None = None) -> Delta:
    """
    The delta of choice 0 of one legacy `text_completion` chunk. With `n` above 1 each chunk
    carries one choice, of any index: another choice's chunk is a delta with only its `raw`.
    """
    delta = Delta(raw=raw)
    choice = next((choice for choice in _choices(chunk, delta) if choice.get("index", 0) == 0), None)
    if choice is None:
        return delta
    delta.finish_reason = _string(choice, "finish_reason")
    delta.text = _string(choice, "text") or ""
    return delta


def _choices(chunk: dict[str, Any], delta: Delta) -> list[dict[str, Any]]:
    """A chunk's choices (none if it has none), once its usage is counted in `delta`."""
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        delta.usage = _usage(usage)
    choices = chunk.get("choices")
    if not choices:
        return []
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise UpstreamProtocolError("upstream chunk has a malformed 'choices' array")
    return choices


def _embeddings_delta(body: bytes) -> Delta:
    """An embeddings answer: its bytes, unchanged, and its usage (its input tokens) counted."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"upstream sent an answer that is not JSON: {body[:200]!r}") from None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    return Delta(raw=body, usage=_usage(usage) if isinstance(usage, dict) else None)


def _tool_call(tc: object) -> ToolCallDelta:
    if not isinstance(tc, dict) or not is_count(tc.get("index", 0)):
        raise UpstreamProtocolError("upstream chunk has a malformed tool call")
    function = tc.get("function") or {}
    if not isinstance(function, dict):
        raise UpstreamProtocolError("upstream chunk has a malformed tool call")
    return ToolCallDelta(
        index=tc.get("index", 0),
        id=_string(tc, "id"),
        name=_string(function, "name"),
        arguments=_string(function, "arguments") or "",
    )


def _string(obj: dict[str, Any], key: str) -> str | None:
    """
    `obj[key]`, a string the protocol may leave out or null (`None`). Another type is refused:
    passed on, it would crash a renderer, or its text would be lost without a word.
    """
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise UpstreamProtocolError(f"upstream chunk has a non-string {key!r} ({type(value).__name__})")


def _usage(usage: dict[str, Any]) -> Usage:
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not (is_count(prompt) and is_count(completion) and (cached is None or is_count(cached))):
        raise UpstreamProtocolError(
            f"upstream usage has token counts that are not whole and non-negative: {usage!r:.200}"
        )
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cache_read_tokens=cached)


def _in_stream_error(error: object, *, secret: str | None) -> UpstreamStatusError:
    if isinstance(error, dict):
        message = error.get("message") or "the upstream reported an error during streaming"
        type_ = error.get("type") if isinstance(error.get("type"), str) else None
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else 502
        return status_error(
            safe_message(str(message), secret=secret),
            status=status,
            type=type_ or "upstream_error",
            code=code if isinstance(code, str) else None,
        )
    return status_error(safe_message(str(error), secret=secret), status=502, type="upstream_error")


def _error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """Message, type and code of an error body, whatever shape an OpenAI-compatible server uses."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip(), None, None
    if isinstance(obj, dict):
        error = obj.get("error", obj)
        if isinstance(error, str):  # {"error": "..."} (llama.cpp, Ollama)
            return error, None, None
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or obj.get("detail") or ""
            if not isinstance(message, str):
                message = orjson.dumps(message).decode()
            type_ = error.get("type")
            code = error.get("code")
            return message, type_ if isinstance(type_, str) else None, code if isinstance(code, str) else None
    return "", None, None
