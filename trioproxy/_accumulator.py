"""
What a stream has said so far: its full text, tool calls, finish reason and usage.

One place folds deltas into a whole answer, so a non-streaming response, the generic `done`
event and (later) metrics all agree on what was generated. Sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._events import Delta, Usage, estimated_tokens
from ._exceptions import TrioproxyError

__all__ = ["Accumulator"]

_Error = TypeVar("_Error", bound=TrioproxyError)


@dataclass
class _ToolCall:
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


@dataclass
class Accumulator:
    text_parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    role: str = "assistant"
    finish_reason: str | None = None
    usage: Usage | None = None
    content_deltas: int = 0
    _tool_calls: dict[int, _ToolCall] = field(default_factory=dict)

    def add(self, delta: Delta) -> None:
        if delta.role:
            self.role = delta.role
        if delta.text:
            self.text_parts.append(delta.text)
        if delta.reasoning:
            self.reasoning_parts.append(delta.reasoning)
        if delta.has_content:
            self.content_deltas += 1
        for fragment in delta.tool_calls:
            call = self._tool_calls.setdefault(fragment.index, _ToolCall())
            call.id = call.id or fragment.id
            call.name = call.name or fragment.name
            if fragment.arguments:
                call.arguments.append(fragment.arguments)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage

    @property
    def text(self) -> str:
        if len(self.text_parts) > 1:
            self.text_parts[:] = ["".join(self.text_parts)]
        return self.text_parts[0] if self.text_parts else ""

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls in OpenAI's message shape, in index order."""
        return [
            {
                "id": call.id or f"call_{index}",
                "type": "function",
                "function": {"name": call.name or "", "arguments": "".join(call.arguments)},
            }
            for index, call in sorted(self._tool_calls.items())
        ]

    def ended_with(self, error: _Error) -> _Error:
        """`error` as the end of this stream: it says how much text was delivered, which is not repeated."""
        return error.after_delivery(len(self.text), content_delivered=bool(self.content_deltas))

    def usage_or_estimate(self, prompt_chars: int = 0) -> Usage:
        """The upstream's usage, else an estimate (about four characters a token), marked so."""
        if self.usage is not None:
            return self.usage
        completion_chars = len(self.text) + sum(len(c["function"]["arguments"]) for c in self.tool_calls())
        return Usage(
            prompt_tokens=estimated_tokens(prompt_chars),
            completion_tokens=max(self.content_deltas, estimated_tokens(completion_chars)),
            estimated=True,
        )
