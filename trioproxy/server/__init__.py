"""
The HTTP side: the quart-trio app, its front adapters, and hypercorn serving it.

`create_app` and `serve` are imported on first use (PEP 562): the fronts' renderers and
request readers beside them are sans-IO, and importing one loads neither quart, hypercorn,
trio nor httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._app import create_app
    from ._serve import serve

__all__ = ["create_app", "serve"]

#: The exports imported on first use, and the module of each.
_LAZY: Final = {"create_app": "._app", "serve": "._serve"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
