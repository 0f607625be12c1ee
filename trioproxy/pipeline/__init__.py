"""The pipeline: a request's session and the stages that run in it."""

from ._assemble import Pipeline, pipeline_for
from ._content import (
    Transform,
    Validator,
    banned_phrases,
    build_transforms,
    build_validators,
    max_length,
    regex_redact,
    replace_text,
)
from ._items import HEARTBEAT, Heartbeat, RetryNotice, SessionItem, Sink
from ._session import StreamSession, start_session
from ._stages import ValidationError
from ._stats import StreamStats

__all__ = [
    "HEARTBEAT",
    "Heartbeat",
    "Pipeline",
    "RetryNotice",
    "SessionItem",
    "Sink",
    "StreamSession",
    "StreamStats",
    "Transform",
    "ValidationError",
    "Validator",
    "banned_phrases",
    "build_transforms",
    "build_validators",
    "max_length",
    "pipeline_for",
    "regex_redact",
    "replace_text",
    "start_session",
]
