"""
Which front answers for a path: its errors are in that front's protocol. No sockets: the
responses are built, not served.
"""

from __future__ import annotations

import orjson
import pytest

from trioproxy._exceptions import NotFoundError
from trioproxy.server.fronts import (
    FRONTS,
    anthropic_messages,
    error_response,
    events,
    openai_chat,
    openai_embeddings,
    openai_responses,
)


@pytest.mark.parametrize(
    ("path", "front"),
    [
        ("/v1/messages", anthropic_messages),
        ("/v1/messages/count_tokens", anthropic_messages),
        ("/v1/messages/batches", anthropic_messages),
        ("/v1/chat/stream", events),
        ("/v1/chat/stream/json", events),
        ("/v1/streams/st_1", events),
        ("/v1/responses", openai_responses),
        ("/v1/responses/resp_1/cancel", openai_responses),
        ("/v1/chat/completions", openai_chat),
        ("/v1/embeddings", openai_embeddings),
        ("/v1/messagesX", openai_chat),
        ("/v1/nothing", openai_chat),
        ("/", openai_chat),
    ],
)
def test_each_path_has_one_front(path: str, front: object) -> None:
    assert next(f for f in FRONTS if f.owns(path)) is front


async def test_errors_in_the_shape_of_the_path_s_protocol() -> None:
    error = NotFoundError("no such thing")
    anthropic = error_response("/v1/messages/batches", error)
    openai = error_response("/v1/files", error)
    ndjson = error_response("/v1/chat/stream/json", error)
    assert [r.status_code for r in (anthropic, openai, ndjson)] == [404, 404, 404]
    assert orjson.loads(await anthropic.get_data()) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such thing"},
    }
    assert orjson.loads(await openai.get_data())["error"]["message"] == "no such thing"
    assert ndjson.content_type == "application/x-ndjson"
    assert orjson.loads(await ndjson.get_data())["type"] == "error"
