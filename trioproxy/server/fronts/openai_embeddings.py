"""
`POST /v1/embeddings`, routed by `model` like a chat request, to OpenAI-compatible upstreams:
the client's body goes up whole (with the routed model name), and the upstream's answer comes
back unchanged. It runs as a session of one answer, so keys, limits, retries and failover
before the answer, the timeouts (`first_token_timeout` bounds the wait for it), usage, metrics
and the access log are those of chat; there is nothing in it for a route's stages.
"""

from __future__ import annotations

from quart import Response, request
from quart_trio import QuartTrio

from ..._events import Delta
from ..._exceptions import TrioproxyError
from ..._request import parse_embedding_request, parse_json_object
from ...pipeline import SessionItem
from .._core import Core, complete
from .openai_chat import error_response

__all__ = ["error_response", "owns", "register"]


def owns(path: str) -> bool:
    return path == "/v1/embeddings"


def register(app: QuartTrio, core: Core) -> None:
    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        try:
            chat = parse_embedding_request(parse_json_object(await request.get_data()))
            pipeline = core.pipeline(chat.model).unstaged()
        except TrioproxyError as exc:
            return error_response(request.path, exc)
        answer = bytearray()

        def take(item: SessionItem) -> None:
            if isinstance(item, Delta) and item.raw is not None:
                answer.extend(item.raw)

        error = await complete(core.start(pipeline, chat, heartbeats=False, streamed=False), take)
        if error is not None:
            return error_response(request.path, error)
        return Response(bytes(answer), content_type="application/json")
