"""The pipeline: a request's session and the stages that run in it."""

from ._session import SessionItem, StreamSession, start_session

__all__ = ["SessionItem", "StreamSession", "start_session"]
