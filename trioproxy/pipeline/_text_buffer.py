"""
The buffer's rules, without its clock: which text is ready to send as a chunk.

Tokens arrive as `"Hello"`, `" wor"`, `"ld."`; a word is complete only once whitespace
follows it, and a sentence once whitespace follows its punctuation. So the buffer cuts
*before* whitespace: chunks are `"Hello"`, `" world."`, each next chunk keeping its own
leading space. The timer that bounds how long text may wait lives in the buffer stage; this
class only says what is ready now (`push`) and what is left (`flush`).

Sans-IO. Python strings are sequences of code points, so no cut can split a UTF-8 character.
"""

from __future__ import annotations

import re
from typing import Final

from .._policy import BufferConfig

__all__ = ["TextBuffer"]

_SENTENCE_END: Final = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[」』”’)\]]*|\n")
"""Latin punctuation ends a sentence once whitespace follows; CJK full stops need none."""


class TextBuffer:
    def __init__(self, config: BufferConfig) -> None:
        self.config = config
        self._text = ""

    @property
    def pending(self) -> int:
        """Characters held back."""
        return len(self._text)

    def push(self, text: str) -> list[str]:
        """Add a token; return the chunks now ready, in order."""
        self._text += text
        return self._ready()

    def flush(self) -> list[str]:
        """Everything held back, as chunks no longer than `max_chunk_size`."""
        text, self._text = self._text, ""
        return self._split(text) if text else []

    def _ready(self) -> list[str]:
        config, text = self.config, self._text
        if config.buffer_by_sentence:
            cut = max((m.end() for m in _SENTENCE_END.finditer(text)), default=0)
        elif config.buffer_by_word:
            cut = _last_whitespace(text, len(text))
        else:
            cut = len(text)
        if cut < config.min_chunk_size:
            cut = 0
        ready, self._text = text[:cut], text[cut:]
        chunks = self._split(ready) if ready else []
        if config.max_chunk_size and len(self._text) > config.max_chunk_size:
            # Never hold more than one chunk's worth: send all but a tail that still fits.
            *overflow, self._text = self._split(self._text)
            chunks.extend(overflow)
        return chunks

    def _split(self, text: str) -> list[str]:
        limit = self.config.max_chunk_size
        if not limit or len(text) <= limit:
            return [text]
        chunks = []
        while len(text) > limit:
            cut = _last_whitespace(text, limit + 1) if self.config.buffer_by_word else 0
            cut = cut or limit
            chunks.append(text[:cut])
            text = text[cut:]
        if text:
            chunks.append(text)
        return chunks


def _last_whitespace(text: str, end: int) -> int:
    """Index of the last whitespace in `text[1:end]` (a cut point before it), or 0."""
    for i in range(min(end, len(text)) - 1, 0, -1):
        if text[i].isspace():
            return i
    return 0
