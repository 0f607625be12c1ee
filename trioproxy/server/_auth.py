"""
Client keys: which key a request presents, and whether it is one of ours.

OpenAI clients send `Authorization: Bearer KEY`, Anthropic clients `x-api-key: KEY`; both are
accepted everywhere. Keys are compared in constant time, and against every configured key
whatever the outcome, so that timing tells an attacker nothing about how close a guess was or
which key it matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

__all__ = ["key_is_valid", "presented_key"]


def presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def key_is_valid(presented: str | None, keys: Sequence[str]) -> bool:
    if presented is None:
        return False
    candidate = presented.encode()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(candidate, key.encode())
    return valid
