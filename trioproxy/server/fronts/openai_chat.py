"""
The OpenAI Chat Completions front: `POST /v1/chat/completions`, streamed (`_openai_front`
renders the chunks) or not, and OpenAI's error object, which also answers for every path no
other front owns.
"""

from __future__ import annotations

from quart import Response, request
from quart_trio import QuartTrio

from ..._exceptions import TrioproxyError
from ..._request import parse_chat_request, parse_json_object
from .._core import SSE, Core, complete, json_response, with_retry_after
from .._generic import prompt_chars
from .._openai_front import OpenAIChunkRenderer, completion_body, error_body

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
        try:
            chat = parse_chat_request(parse_json_object(await request.get_data()))
            pipeline = core.pipeline(chat.model)
        except TrioproxyError as exc:
            return _error(exc)
        if chat.stream:
            renderer = OpenAIChunkRenderer(model=chat.model, include_usage=chat.include_usage)
            return await core.stream(core.start(pipeline, chat), renderer, SSE, _error)
        # A non-streaming answer is built from the upstream's stream, so retries and stages apply.
        session = core.start(pipeline, chat, heartbeats=False)
        error = await complete(session)
        if error is not None:
            return _error(error)
        return json_response(completion_body(session.accumulator, model=chat.model, prompt_chars=prompt_chars(chat)))
