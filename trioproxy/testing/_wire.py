"""
What each API puts on the wire for a `Reply`, rendered sans-IO: OpenAI
`chat.completion.chunk` streams and completions (sse_protocol.md §4.3), Anthropic Messages
events and messages (§5.1-5.2), Responses events and objects, legacy text completions,
embeddings, error bodies in each API's shape, and the routes that pick an API. A stream is a
list of `Frame`s, one write each.

`FakeUpstream` writes these through h11; the benchmark upstream (`trioproxy._bench.upstream`)
renders the same frames once and frames them itself, so both send the same bytes.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any, Final

import orjson

from ._script import Reply

__all__ = [
    "DEFAULT_MODEL",
    "ROUTES",
    "SSE_HEADERS",
    "TOOL_ARGUMENT_FRAGMENTS",
    "Api",
    "Frame",
    "anthropic_frames",
    "anthropic_message",
    "anthropic_stream_error",
    "assistant_prefix",
    "continued",
    "embeddings_body",
    "error_body",
    "merge_headers",
    "models_body",
    "openai_completion",
    "openai_frames",
    "openai_stream_error",
    "reason_phrase",
    "response_object",
    "responses_frames",
    "responses_stream_error",
    "text_completion",
    "text_completion_frames",
]

#: Number of argument fragments a tool call is streamed in (fewer for very short arguments).
TOOL_ARGUMENT_FRAGMENTS: Final = 3
#: The model an answer names when its request names none.
DEFAULT_MODEL: Final = "fake-model"
_SYSTEM_FINGERPRINT: Final = "fp_trioproxy_fake"


class Api(Enum):
    """The API a route speaks: it picks the answer's events or body and the error bodies' shape."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    RESPONSES = "responses"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


ROUTES: Final[Mapping[str, Api]] = {
    "/v1/chat/completions": Api.OPENAI,
    "/chat/completions": Api.OPENAI,
    "/v1/messages": Api.ANTHROPIC,
    "/v1/responses": Api.RESPONSES,
    "/responses": Api.RESPONSES,
    "/v1/completions": Api.COMPLETIONS,
    "/completions": Api.COMPLETIONS,
    "/v1/embeddings": Api.EMBEDDINGS,
    "/embeddings": Api.EMBEDDINGS,
    # Answered with a `Reply`'s `raw_body` (their JSON), or else as `/v1/responses` is.
    "/v1/responses/input_tokens": Api.RESPONSES,
    "/v1/responses/compact": Api.RESPONSES,
}

SSE_HEADERS: Final = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))

_ANTHROPIC_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}

_OPENAI_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

_ANTHROPIC_STOP_REASONS: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
}


@dataclass(frozen=True)
class Frame:
    """One write of a stream. A token frame counts toward `tokens_sent` and the `*_after` faults."""

    data: bytes
    token: bool = False


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Overloaded" if status == 529 else b""


def merge_headers(base: Sequence[tuple[str, str]], extra: Mapping[str, str]) -> list[tuple[str, str]]:
    """`base` headers, with any of the same (case-insensitive) name replaced by `extra`."""
    overridden = {name.lower() for name in extra}
    return [(name, value) for name, value in base if name not in overridden] + list(extra.items())


def _fragments(text: str) -> list[str]:
    """Split a tool call's argument text into up to `TOOL_ARGUMENT_FRAGMENTS` pieces."""
    if not text:
        return []
    size = -(-len(text) // TOOL_ARGUMENT_FRAGMENTS)
    return [text[i : i + size] for i in range(0, len(text), size)]


def assistant_prefix(body: dict[str, object]) -> str | None:
    """The text of the request's final assistant message, if it ends with one (to be continued)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content if isinstance(content, str) else None


def continued(tokens: Sequence[str], prefix: str) -> list[str] | None:
    """
    What follows `prefix` in the joined `tokens`, from the token `prefix` ends in; None if
    they do not start with it.
    """
    if not "".join(tokens).startswith(prefix):
        return None
    rest: list[str] = []
    at = 0
    for token in tokens:
        end = at + len(token)
        if end > len(prefix):
            rest.append(token[max(len(prefix) - at, 0) :])
        at = end
    return rest


def _finish_reason(reply: Reply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _usage(reply: Reply) -> tuple[int, int]:
    prompt, completion = reply.usage
    return prompt, completion or len(reply.tokens)


def _openai_usage(reply: Reply) -> dict[str, object]:
    prompt, completion = _usage(reply)
    usage: dict[str, object] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reply.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
    return usage


def _anthropic_input(reply: Reply) -> dict[str, int]:
    """The input part of an Anthropic usage: uncached input, and what was read from the cache."""
    prompt, _ = _usage(reply)
    if not reply.cached_tokens:
        return {"input_tokens": prompt}
    return {"input_tokens": prompt - reply.cached_tokens, "cache_read_input_tokens": reply.cached_tokens}


def error_body(api: Api, status: int, message: str) -> dict[str, object]:
    if api is Api.ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def models_body() -> dict[str, object]:
    return {
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "trioproxy-testing"}],
    }


def _data_line(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def openai_frames(
    reply: Reply, model: str, number: int, *, include_usage: bool, created: int | None = None
) -> list[Frame]:
    """The `chat.completion.chunk` stream of sse_protocol.md §4.3, one frame per event (`created`: now)."""
    chat_id = f"chatcmpl-fake{number}"
    created = int(time.time()) if created is None else created

    def chunk(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        payload: dict[str, object] = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return _data_line(payload)

    frames = [Frame(chunk({"role": "assistant", "content": ""}))]
    frames += [Frame(chunk({"content": token}), token=True) for token in reply.tokens]
    for index, call in enumerate(reply.tool_calls):
        opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        frames.append(Frame(chunk({"tool_calls": [opening]})))
        frames += [
            Frame(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}), token=True)
            for piece in _fragments(call.arguments)
        ]
    frames.append(Frame(chunk({}, _finish_reason(reply))))
    if include_usage:
        usage_chunk = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
            "choices": [],
            "usage": _openai_usage(reply),
        }
        frames.append(Frame(_data_line(usage_chunk)))
    if not reply.omit_done:
        frames.append(Frame(b"data: [DONE]\n\n"))
    return frames


def openai_stream_error(message: str) -> bytes:
    return _data_line({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def responses_frames(reply: Reply, model: str, number: int, *, created: int | None = None) -> list[Frame]:
    """
    An OpenAI Responses stream (`responses_protocol.md` §2.5, §2.6): a message item with the
    text tokens, then a function_call item per tool call, then `response.completed` (or
    `response.incomplete` for the finish reasons `length` and `content_filter`); `created`:
    its `created_at` (now).
    """
    events: list[tuple[dict[str, object], bool]] = []
    output: list[dict[str, object]] = []

    def add(payload: dict[str, object], *, token: bool = False) -> None:
        events.append((payload, token))

    response = response_object(reply, model, number, status="in_progress", created=created)
    add({"type": "response.created", "response": response})
    add({"type": "response.in_progress", "response": response})
    if reply.tokens:
        item_id, text = f"msg_fake{number}", "".join(reply.tokens)
        where = {"item_id": item_id, "output_index": len(output)}
        message = {"id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
        add({"type": "response.output_item.added", "output_index": len(output), "item": message})
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        add({"type": "response.content_part.added", **where, "content_index": 0, "part": part})
        for token in reply.tokens:
            add(
                {"type": "response.output_text.delta", **where, "content_index": 0, "delta": token, "logprobs": []},
                token=True,
            )
        add({"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []})
        add({"type": "response.content_part.done", **where, "content_index": 0, "part": {**part, "text": text}})
        done = _response_output(reply, number)[0]
        add({"type": "response.output_item.done", "output_index": len(output), "item": done})
        output.append(done)
    for call, done in zip(reply.tool_calls, _response_output(reply, number)[len(output) :], strict=True):
        where = {"item_id": done["id"], "output_index": len(output)}
        add(
            {
                "type": "response.output_item.added",
                "output_index": len(output),
                "item": {**done, "status": "in_progress", "arguments": ""},
            }
        )
        for piece in _fragments(call.arguments):
            add({"type": "response.function_call_arguments.delta", **where, "delta": piece}, token=True)
        add({"type": "response.function_call_arguments.done", **where, "arguments": call.arguments})
        add({"type": "response.output_item.done", "output_index": len(output), "item": done})
        output.append(done)
    final = response_object(reply, model, number, created=created)
    if not reply.omit_done:
        add({"type": f"response.{final['status']}", "response": final})
    return [
        Frame(
            b"event: "
            + str(payload["type"]).encode()
            + b"\ndata: "
            + orjson.dumps({**payload, "sequence_number": i})
            + b"\n\n",
            token=token,
        )
        for i, (payload, token) in enumerate(events)
    ]


def _response_output(reply: Reply, number: int) -> list[dict[str, object]]:
    """The output items of a finished response: the message (if any text), then each function call."""
    output: list[dict[str, object]] = []
    if reply.tokens:
        text = {"type": "output_text", "annotations": [], "logprobs": [], "text": "".join(reply.tokens)}
        output.append(
            {
                "id": f"msg_fake{number}",
                "type": "message",
                "status": "completed",
                "content": [text],
                "role": "assistant",
            }
        )
    output += [
        {
            "id": f"fc_fake{number}_{i}",
            "type": "function_call",
            "status": "completed",
            "arguments": call.arguments,
            "call_id": call.id,
            "name": call.name,
        }
        for i, call in enumerate(reply.tool_calls)
    ]
    return output


def response_object(
    reply: Reply, model: str, number: int, *, status: str | None = None, created: int | None = None
) -> dict[str, object]:
    """A Response object: in progress (empty), or finished with its output and usage (`created`: now)."""
    prompt, completion = _usage(reply)
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(_finish_reason(reply))
    finished = status is None
    return {
        "id": f"resp_fake{number}",
        "object": "response",
        "created_at": int(time.time()) if created is None else created,
        "status": status or ("incomplete" if reason else "completed"),
        "error": None,
        "incomplete_details": {"reason": reason} if finished and reason else None,
        "model": model,
        "output": _response_output(reply, number) if finished else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        if finished
        else None,
    }


def responses_stream_error(message: str, sequence_number: int) -> bytes:
    """OpenAI's in-stream failure: a nested `error` event, then `response.failed` (§2.7)."""
    error = {"type": "server_error", "code": "server_error", "message": message, "param": None}
    failed = {
        "id": "resp_failed",
        "object": "response",
        "status": "failed",
        "output": [],
        "error": {"code": "server_error", "message": message},
    }
    return (
        b"event: error\ndata: "
        + orjson.dumps({"type": "error", "sequence_number": sequence_number, "error": error})
        + b"\n\n"
        b"event: response.failed\ndata: "
        + orjson.dumps({"type": "response.failed", "sequence_number": sequence_number + 1, "response": failed})
        + b"\n\n"
    )


def openai_completion(reply: Reply, model: str, number: int) -> dict[str, object]:
    message: dict[str, object] = {
        "role": "assistant",
        "content": "".join(reply.tokens) if reply.tokens else None,
        "refusal": None,
    }
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(reply)}],
        "usage": _openai_usage(reply),
    }


def _text_completion_chunk(
    completion_id: str, created: int, model: str, choices: list[dict[str, object]], usage: object = None
) -> dict[str, object]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }


def text_completion_frames(reply: Reply, model: str, number: int, *, include_usage: bool) -> list[Frame]:
    """A legacy completions stream: one `text_completion` chunk per token, as OpenAI and vLLM send it."""
    completion_id, created = f"cmpl-fake{number}", int(time.time())

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return _data_line(_text_completion_chunk(completion_id, created, model, [choice]))

    frames = [Frame(chunk(token), token=True) for token in reply.tokens]
    frames.append(Frame(chunk("", _finish_reason(reply))))
    if include_usage:
        prompt, completion = _usage(reply)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        frames.append(Frame(_data_line(_text_completion_chunk(completion_id, created, model, [], usage))))
    if not reply.omit_done:
        frames.append(Frame(b"data: [DONE]\n\n"))
    return frames


def text_completion(reply: Reply, model: str, number: int) -> dict[str, object]:
    prompt, completion = _usage(reply)
    choice = {"index": 0, "text": "".join(reply.tokens), "logprobs": None, "finish_reason": _finish_reason(reply)}
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return _text_completion_chunk(f"cmpl-fake{number}", int(time.time()), model, [choice], usage)


def embeddings_body(body: dict[str, object], model: str, reply: Reply) -> dict[str, object]:
    """One vector per input, `[len(input), index, 0.5]`; base64 little-endian float32s when asked."""
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, item in enumerate(inputs):
        vector = [float(len(item) if isinstance(item, (str, list)) else 0), float(index), 0.5]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt = reply.usage[0]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def _event(payload: dict[str, object], *, token: bool = False) -> Frame:
    """An Anthropic event: the SSE event name always equals the data's `type`."""
    return Frame(b"event: " + str(payload["type"]).encode() + b"\n" + _data_line(payload), token=token)


def anthropic_frames(reply: Reply, model: str, number: int) -> list[Frame]:
    """The Messages stream of sse_protocol.md §5.1-5.2, one frame per event."""
    _, completion = _usage(reply)
    frames = [
        _event(
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_fake{number}",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**_anthropic_input(reply), "output_tokens": 1},
                },
            }
        )
    ]
    ping = _event({"type": "ping"})
    pinged = False

    def open_block(index: int, block: dict[str, object]) -> None:
        nonlocal pinged
        frames.append(_event({"type": "content_block_start", "index": index, "content_block": block}))
        if not pinged:  # where the recorded stream has it: right after the first block start
            frames.append(ping)
            pinged = True

    def delta(index: int, body: dict[str, object], *, token: bool) -> Frame:
        return _event({"type": "content_block_delta", "index": index, "delta": body}, token=token)

    index = 0
    if reply.tokens:
        open_block(index, {"type": "text", "text": ""})
        frames += [delta(index, {"type": "text_delta", "text": token}, token=True) for token in reply.tokens]
        frames.append(_event({"type": "content_block_stop", "index": index}))
        index += 1
    for call in reply.tool_calls:
        open_block(index, {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        frames.append(delta(index, {"type": "input_json_delta", "partial_json": ""}, token=False))
        frames += [
            delta(index, {"type": "input_json_delta", "partial_json": piece}, token=True)
            for piece in _fragments(call.arguments)
        ]
        frames.append(_event({"type": "content_block_stop", "index": index}))
        index += 1
    if not pinged:
        frames.append(ping)
    finish = _finish_reason(reply)
    frames.append(
        _event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _ANTHROPIC_STOP_REASONS.get(finish, finish), "stop_sequence": None},
                "usage": {"output_tokens": completion},
            }
        )
    )
    if not reply.omit_done:
        frames.append(_event({"type": "message_stop"}))
    return frames


def anthropic_stream_error(message: str) -> bytes:
    return _event({"type": "error", "error": {"type": "overloaded_error", "message": message}}).data


def anthropic_message(reply: Reply, model: str, number: int) -> dict[str, object]:
    _, completion = _usage(reply)
    content: list[dict[str, object]] = []
    if reply.tokens:
        content.append({"type": "text", "text": "".join(reply.tokens)})
    for call in reply.tool_calls:
        try:
            arguments: Any = orjson.loads(call.arguments) if call.arguments else {}
        except orjson.JSONDecodeError:
            arguments = call.arguments  # keep malformed arguments visible rather than hide them
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    finish = _finish_reason(reply)
    return {
        "id": f"msg_fake{number}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _ANTHROPIC_STOP_REASONS.get(finish, finish),
        "stop_sequence": None,
        "usage": {**_anthropic_input(reply), "output_tokens": completion},
    }
