"""
The OpenAI completions front: `POST /v1/chat/completions` and the legacy text completions of
`POST /v1/completions`, streamed (`_openai_front` renders the chunks) or not, and OpenAI's
error object, which also answers for every path no other front owns.

Both are one kind of request in the common model, run by the same supervised session
(heartbeats, timeouts, retries and failover before the first token, disconnects). A legacy
completion keeps its body whole (`prompt`, `suffix` and the rest) for an OpenAI-compatible
upstream, whose `text_completion` chunks pass through byte for byte; no other upstream takes
one (`parse_completion_request`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from ..._exceptions import TrioproxyError
from ..._request import ChatRequest, parse_chat_request, parse_completion_request, parse_json_object
from .._core import SSE, Core, complete, json_response, with_retry_after
from .._generic import prompt_chars
from .._openai_front import (
    OpenAIChunkRenderer,
    TextCompletionRenderer,
    completion_body,
    error_body,
    text_completion_body,
)

__all__ = ["error_response", "owns", "register"]


def owns(path: str) -> bool:
    return True


def error_response(path: str, error: TrioproxyError) -> Response:
    return _error(error)


def _error(error: TrioproxyError) -> Response:
    return with_retry_after(json_response(error_body(error), status=error.status), error)


def register(app: QuartTrio, core: Core) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await _answer(core, parse_chat_request, OpenAIChunkRenderer, completion_body)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await _answer(core, parse_completion_request, TextCompletionRenderer, text_completion_body)


async def _answer(
    core: Core,
    parse: Callable[[dict[str, Any]], ChatRequest],
    renderer: type[OpenAIChunkRenderer],
    whole_body: Callable[..., dict[str, Any]],
) -> Response:
    """The current request, parsed by `parse`: streamed by `renderer`, or folded into `whole_body`."""
    try:
        chat = parse(parse_json_object(await request.get_data()))
        pipeline = core.pipeline(chat.model)
    except TrioproxyError as exc:
        return _error(exc)
    if chat.stream:
        chunks = renderer(model=chat.model, include_usage=chat.include_usage)
        return await core.stream(core.start(pipeline, chat), chunks, SSE, _error)
    # A non-streaming answer is built from the upstream's stream, so retries and stages apply.
    session = core.start(pipeline, chat, heartbeats=False, streamed=False)
    error = await complete(session)
    if error is not None:
        return _error(error)
    return json_response(whole_body(session.accumulator, model=chat.model, prompt_chars=prompt_chars(chat)))
