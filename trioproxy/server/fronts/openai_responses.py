"""
The OpenAI Responses front: `POST /v1/responses`, streamed (`_responses_front` renders the
events) or not (the same events folded into the Response object the stream ends with), and
WebSocket mode on the same path (`_responses_websocket`). Errors are OpenAI's error object.
"""

from __future__ import annotations

from quart import Response, request
from quart_trio import QuartTrio

from ..._exceptions import TrioproxyError
from ..._request import parse_json_object
from .._core import SSE, Core, complete, json_response
from .._generic import prompt_chars, render
from .._responses_front import ResponsesEventRenderer, response_from_events
from .._responses_request import parse_responses_request
from .._responses_websocket import register_responses_websocket
from .openai_chat import error_response

__all__ = ["error_response", "owns", "register"]


def owns(path: str) -> bool:
    return path == "/v1/responses" or path.startswith("/v1/responses/")


def _error(error: TrioproxyError) -> Response:
    return error_response("/v1/responses", error)


def register(app: QuartTrio, core: Core) -> None:
    @app.post("/v1/responses")
    async def responses() -> Response:
        try:
            body = parse_json_object(await request.get_data())
            chat = parse_responses_request(body)
            pipeline = core.pipeline(chat.model)
        except TrioproxyError as exc:
            return _error(exc)
        renderer = ResponsesEventRenderer(request=body, model=chat.model, prompt_chars=prompt_chars(chat))
        if chat.stream:
            return await core.stream(core.start(pipeline, chat), renderer, SSE, _error)
        events = bytearray()
        session = core.start(pipeline, chat, heartbeats=False)
        error = await complete(session, lambda item: events.extend(render(renderer, item)))
        if error is not None:
            return _error(error)
        return json_response(response_from_events(bytes(events + renderer.done(session))))

    register_responses_websocket(app, core)
