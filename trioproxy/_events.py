"""
The two event vocabularies of trioproxy.

*Internal model* — what flows through a request's pipeline, whatever protocol the upstream
and the client speak: a `Delta` is one step of a generation (text, tool-call fragments, the
role, the finish reason, usage). Providers parse upstream bytes into deltas; front adapters
render deltas into the client's protocol. So an OpenAI client can stream from an Anthropic
upstream, and a stage (buffer, validator, accumulator) works the same for every protocol.

*Generic vocabulary* — `StreamEvent`, what trioproxy's own SSE, NDJSON and WebSocket
endpoints send: `token`, `chunk`, `done`, `error` and `metadata`.

Sans-IO: nothing here does I/O or imports trio or httpx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import orjson

from ._sse import encode_event

__all__ = [
    "EVENT_TYPES",
    "OPENED",
    "Delta",
    "EventType",
    "FinishReason",
    "Opened",
    "StreamEvent",
    "ToolCallDelta",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]

EventType = Literal["token", "chunk", "done", "error", "metadata"]
EVENT_TYPES: Final = frozenset(get_args(EventType))


@dataclass(frozen=True, slots=True)
class Opened:
    """
    The upstream accepted the request (HTTP 200 on the wire). The client's response need not
    start yet: until its first token, a failure can still be an HTTP status.
    """


OPENED: Final = Opened()


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of one tool call, OpenAI-style: `arguments` arrive as string pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a whole request. `estimated` marks counts we made up ourselves."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(slots=True)
class Delta:
    """
    One step of a generation.

    `raw` holds the upstream's own `chat.completion.chunk` JSON when the upstream speaks
    OpenAI: an OpenAI client then gets those exact bytes (vendor fields such as `logprobs` or
    `reasoning_content` intact, nothing re-serialised) unless a stage changed the delta, which
    drops `raw`.

    `arrived` is when the delta's oldest character came from the upstream (trio's clock), so
    the time it then waited inside the proxy (the buffer latency) can be measured.
    """

    text: str = ""
    role: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    raw: bytes | None = None
    arrived: float | None = None

    @property
    def has_content(self) -> bool:
        """Whether this delta carries generated output (what makes a "first token")."""
        return bool(self.text or self.tool_calls)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """
    One event of trioproxy's generic vocabulary.

    - `token`: one piece of text as the upstream produced it (`data` is the text);
    - `chunk`: several tokens merged by the buffer (`data` is the text);
    - `metadata`: facts about the stream (`metadata` holds them; `data` names the kind);
    - `done`: the stream ended well (`metadata` has finish reason and usage);
    - `error`: the stream failed (`data` is `{"message", "type", "code", "status"}`).

    `id`, when set, becomes the SSE `id:` field so that a client can resume.
    """

    type: EventType
    data: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown StreamEvent type {self.type!r}; expected one of {sorted(EVENT_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "data": self.data, "metadata": self.metadata}

    def to_json(self) -> str:
        """Compact JSON, one line: the NDJSON and WebSocket form."""
        return orjson.dumps(self.to_dict()).decode()

    def to_sse(self) -> str:
        """The SSE form: one `data:` line of JSON (and an `id:` line when the event has one)."""
        return encode_event(self.to_json(), id=self.id)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], *, id: str | None = None) -> StreamEvent:
        return cls(
            type=obj["type"],
            data=obj.get("data"),
            metadata=dict(obj.get("metadata") or {}),
            id=id,
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, id: str | None = None) -> StreamEvent:
        return cls.from_dict(orjson.loads(text), id=id)
