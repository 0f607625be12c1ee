"""
Client keys: which key a request presents, and whether it is one of ours.

OpenAI clients send `Authorization: Bearer KEY`, Anthropic clients `x-api-key: KEY`; both are
accepted everywhere. Keys are compared in constant time, and against every configured key
whatever the outcome, so that timing tells an attacker nothing about how close a guess was or
which key it matched.

Metrics and logs name a key by `key_name`, a fingerprint: who spends what can be told apart,
and the same key has the same name in every process and after a restart, without the key
itself ever appearing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = ["NO_KEY", "key_is_valid", "key_name", "presented_key"]

NO_KEY: Final = "none"
"""The key name of every request while `[auth]` has no keys: addresses would be unbounded labels."""


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


def key_name(key: str) -> str:
    """`sha256:` and the first 12 hex digits of the key's SHA-256 (`printf %s KEY | sha256sum`)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]
