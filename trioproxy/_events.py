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
    "estimated_tokens",
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


CHARS_PER_TOKEN: Final = 4
"""Characters per token in an estimate, where no upstream counted them (about four in English text)."""


def estimated_tokens(chars: int) -> int:
    """About how many tokens `chars` characters make (rounded up): what a count says when the upstream gave none."""
    return -(-chars // CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Usage:
    """
    Token counts of a whole request. `estimated` marks counts we made up ourselves.

    `prompt_tokens` counts the whole prompt; `cache_read_tokens` and `cache_creation_tokens`
    say how much of it was read from, or written to, the upstream's prompt cache, when the
    upstream says (`None`: not reported). Anthropic reports its input in those three parts.
    """

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cache_read_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cache_read_tokens}
        return usage


@dataclass(slots=True)
class Delta:
    """
    One step of a generation.

    `reasoning` is text the model thinks before it answers (Anthropic's thinking blocks,
    `reasoning_content` of OpenAI-compatible servers such as vLLM); it is output, so it counts
    as a first token. `reasoning_signature` is Anthropic's signature of that reasoning, which
    the client must send back with it on its next turn (it may come with no reasoning text at
    all, when Anthropic is asked to omit it). `stop_sequence` is the stop sequence that ended the generation, when the
    upstream says which (it comes with `finish_reason` "stop").

    `raw` is the upstream's own SSE event for this step, exactly as it came, kept only when
    the client speaks the upstream's protocol (the translation decides, from
    `ChatRequest.protocol`): the client then gets those exact bytes (vendor fields, thinking
    signatures, citations intact, nothing re-serialised) unless a stage changed content, which
    drops `raw`. An event that carries nothing the common model knows (an Anthropic `ping`,
    `content_block_stop`, a signature) becomes a delta with only `raw`.

    `raw_item` is an output item the common model has no fields for (a Responses upstream's
    hosted tool call, its reasoning with encrypted content), whole, in the upstream's JSON,
    kept, like `raw`, only for a client of the upstream's protocol. Unlike `raw` it survives
    the stages, which leave it alone: a renderer re-rendering the stream places it in order.

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
    reasoning: str = ""
    reasoning_signature: str | None = None
    stop_sequence: str | None = None
    raw_item: dict[str, Any] | None = None

    @property
    def has_content(self) -> bool:
        """Whether this delta carries generated output (what makes a "first token")."""
        return bool(self.text or self.tool_calls or self.reasoning or self.raw_item)

    @property
    def says_anything(self) -> bool:
        """Whether the common model sees anything in it, its `raw` bytes aside."""
        return bool(self.has_content or self.role or self.finish_reason or self.usage or self.reasoning_signature)


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
