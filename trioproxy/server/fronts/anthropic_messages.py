"""
The Anthropic Messages front: `POST /v1/messages` (any query string: Claude Code sends
`?beta=true`), streamed or not, and `POST /v1/messages/count_tokens`; every path under
`/v1/messages` answers errors in Anthropic's shape.

The request is read by `_anthropic_request` (its native body kept for an Anthropic upstream),
the answer rendered by `_anthropic_front`; a non-streaming answer is the same events folded
into one `Message`.
"""

from __future__ import annotations

import orjson
from quart import Response, request
from quart_trio import QuartTrio

from ..._exceptions import TrioproxyError
from ..._request import parse_json_object
from .._anthropic_front import AnthropicEventRenderer, error_body, message_from_events, token_count_estimate
from .._anthropic_request import parse_messages_request
from .._core import SSE, Core, json_response, rendered_answer, with_retry_after
from .._generic import prompt_chars

__all__ = ["error_response", "owns", "register"]


def owns(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_response(path: str, error: TrioproxyError) -> Response:
    return _error(error)


def _error(error: TrioproxyError) -> Response:
    return with_retry_after(json_response(error_body(error), status=error.status), error)


def register(app: QuartTrio, core: Core) -> None:
    @app.post("/v1/messages")
    async def messages() -> Response:
        try:
            chat = parse_messages_request(parse_json_object(await request.get_data()), request.headers)
            pipeline = core.pipeline(chat.model)
        except TrioproxyError as exc:
            return _error(exc)
        renderer = AnthropicEventRenderer(model=chat.model, prompt_chars=prompt_chars(chat))
        if chat.stream:
            return await core.stream(core.start(pipeline, chat), renderer, SSE, _error)
        events = await rendered_answer(core.start(pipeline, chat, heartbeats=False, streamed=False), renderer)
        if isinstance(events, TrioproxyError):
            return _error(events)
        try:
            return json_response(message_from_events(events))
        except TrioproxyError as exc:  # the upstream's tool input is not JSON
            return _error(exc)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens() -> Response:
        """An Anthropic upstream's own count; an estimate, marked so, from any other."""
        try:
            chat = parse_messages_request(parse_json_object(await request.get_data()), request.headers, counting=True)
            route = core.router.route(chat.model)
            counted = await core.ask_upstream(route, chat, lambda upstream, routed: upstream.count_tokens(routed))
        except TrioproxyError as exc:
            return _error(exc)
        if counted is None:
            tools = chat.client_body.get("tools")
            return json_response(token_count_estimate(prompt_chars(chat) + (len(orjson.dumps(tools)) if tools else 0)))
        return Response(counted, content_type="application/json")
