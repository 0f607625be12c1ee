"""
Mid-stream continuation, sans-IO: the request that asks an upstream to go on from the text a
client already has, and the trimming that keeps what it sends back from repeating any of it.

Two ways exist, a capability of the upstream named in the config (`continuation`):

- `prefill` (Anthropic Messages): the text goes last, as an assistant turn, and the model
  continues it. Anthropic refuses a prefill that ends in whitespace, so the trailing
  whitespace is left out of the turn; the model writes it again (or other whitespace, or
  none), and `Overlap` drops from its answer what the client already has.
- `continue_final_message` (vLLM, SGLang, llama.cpp's server): the text goes last as an
  assistant message, with `continue_final_message: true` and `add_generation_prompt: false`,
  so the chat template leaves the message open; the model continues it exactly.

OpenAI's own API has neither (`none`): there a broken stream still ends with its error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

from ._request import ChatRequest

__all__ = ["Continuation", "Overlap", "Refusals", "continuation", "ends_with_assistant"]


@dataclass(frozen=True, slots=True)
class Continuation:
    """The request that continues a stream, and the whitespace the client has that it left out."""

    chat: ChatRequest
    overlap: str


def continuation(chat: ChatRequest, text: str, way: str) -> Continuation:
    """`chat`, asked to continue `text` (the answer so far) in `way` (`prefill` or `continue_final_message`)."""
    if way == "prefill":
        prefix = text.rstrip()
        overlap = text[len(prefix) :]
        extra: dict[str, Any] = {}
    else:
        prefix, overlap = text, ""
        extra = {"continue_final_message": True, "add_generation_prompt": False}
    turn = {"role": "assistant", "content": prefix}
    body = {**chat.body, "messages": [*chat.messages, turn], **extra}
    native = chat.native
    if native is not None:
        native = replace(native, body={**native.body, "messages": [*native.body.get("messages", []), turn]})
    return Continuation(replace(chat, body=body, messages=body["messages"], native=native), overlap)


def ends_with_assistant(chat: ChatRequest) -> bool:
    """The client's own request ends with an assistant turn (its own prefill): not one to continue again."""
    return bool(chat.messages) and chat.messages[-1].get("role") == "assistant"


class Overlap:
    """
    Drops from the start of a continuation's text what the client already has: the whitespace
    a prefill left out. Whatever of it the model does not write again stays delivered as it
    was (extra whitespace, never a lost or repeated word).
    """

    def __init__(self, overlap: str) -> None:
        self._pending = overlap

    def trim(self, text: str) -> str:
        """The part of `text`, the continuation's next text, that the client does not have yet."""
        pending = self._pending
        if not pending:
            return text
        same = 0
        for ours, theirs in zip(pending, text, strict=False):
            if ours != theirs:
                break
            same += 1
        if same == len(text) and same < len(pending):
            self._pending = pending[same:]  # all of it was already delivered; more may match
            return ""
        self._pending = ""
        return text[same:]


MAX_REFUSALS: Final = 1024
"""Routes remembered as refusing continuations at once: more are forgotten, the oldest first."""


class Refusals:
    """
    Which routes refused a continuation (a 400 for the prefill), and until when they are not
    asked that way again: a refusal is a capability missing, not a passing fault. Shared by
    every request of a router; times are the caller's clock.
    """

    def __init__(self) -> None:
        self._until: dict[tuple[str, str], float] = {}

    def refuse(self, provider: str, model: str, *, until: float) -> None:
        self._until.pop((provider, model), None)
        self._until[(provider, model)] = until
        if len(self._until) > MAX_REFUSALS:
            del self._until[next(iter(self._until))]

    def refused(self, provider: str, model: str, *, now: float) -> bool:
        until = self._until.get((provider, model))
        if until is None:
            return False
        if now < until:
            return True
        del self._until[(provider, model)]
        return False
