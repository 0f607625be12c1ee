"""The HTTP side: the quart-trio app, its front adapters, and hypercorn serving it."""

from ._app import create_app
from ._serve import serve

__all__ = ["create_app", "serve"]
