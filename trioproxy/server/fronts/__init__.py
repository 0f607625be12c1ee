"""
The fronts: one module per client protocol, each with its routes, its request parsing and its
error shape, over the `Core` they share (sessions, limits, metrics, resumable streams). What a
front renders is sans-IO and lives beside the server (`_openai_front.py`, `_anthropic_front.py`,
`_events_front.py`); a front module is the part that meets quart.

A front is a module with three functions:

- `register(app, core)` adds its routes;
- `owns(path)` says whether a path belongs to its protocol, so that every error on it (an
  unknown path, a refused key, a limit) is answered in that protocol's shape;
- `error_response(path, error)` is that answer.

Adding a protocol is adding a module here and naming it in `FRONTS`. `forwarding` is no
protocol: it forwards what the providers allow, as it is, and answers errors in the shape of
the path's front (or Anthropic's, for an Anthropic provider).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

from . import anthropic_messages, events, openai_chat, openai_embeddings, openai_responses

if TYPE_CHECKING:
    from quart import Response
    from quart_trio import QuartTrio

    from ..._exceptions import TrioproxyError
    from .._core import Core

__all__ = ["FRONTS", "Front", "error_response"]


class Front(Protocol):
    def register(self, app: QuartTrio, core: Core) -> None: ...
    def owns(self, path: str) -> bool: ...
    def error_response(self, path: str, error: TrioproxyError) -> Response: ...


FRONTS: Final[tuple[Front, ...]] = (anthropic_messages, events, openai_embeddings, openai_responses, openai_chat)
"""In the order they claim paths: OpenAI's last, as it answers for every path no other owns."""


def error_response(path: str, error: TrioproxyError) -> Response:
    """`error` in the protocol of the front that owns `path`."""
    front = next(front for front in FRONTS if front.owns(path))
    return front.error_response(path, error)
