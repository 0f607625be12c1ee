"""
The public API, `trioproxy.__all__`: sorted, complete and resolvable, each name presented as
trioproxy's own; and the sans-IO modules stay sans-IO: importing one, in a fresh process,
loads no I/O library (the package's heavy exports are loaded on first use).
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import trioproxy
from trioproxy import _exceptions

#: Libraries that do I/O or run an event loop: what a sans-IO module must never pull in.
IO_LIBRARIES = ("trio", "httpx", "httpcore", "h11", "quart", "quart_trio", "hypercorn")

SANS_IO_MODULES = [
    "trioproxy",
    "trioproxy._sse",
    "trioproxy._events",
    "trioproxy._exceptions",
    "trioproxy._request",
    "trioproxy._limits",
    "trioproxy._targets",
    "trioproxy._continuation",
    "trioproxy._forwarding",
    "trioproxy.providers.openai",
    "trioproxy.providers.anthropic",
    "trioproxy.providers.simulated",
    "trioproxy.providers.responses",
    "trioproxy.server._openai_front",
    "trioproxy.server._anthropic_front",
    "trioproxy.server._responses_front",
    "trioproxy.server._events_front",
    "trioproxy.server._anthropic_request",
    "trioproxy.server._responses_request",
]


def test_all_is_sorted() -> None:
    assert trioproxy.__all__ == sorted(trioproxy.__all__)


def test_every_public_exception_is_exported() -> None:
    errors = {
        name
        for name, value in vars(_exceptions).items()
        if inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
    }
    assert errors - set(trioproxy.__all__) == set()


def test_every_export_resolves_and_is_presented_as_trioproxys() -> None:
    for name in trioproxy.__all__:
        value = getattr(trioproxy, name)
        if inspect.isclass(value) or inspect.isfunction(value):  # not `__version__` nor the `EventType` alias
            assert value.__module__ == "trioproxy", name


def test_dir_lists_every_export_and_an_unknown_name_is_an_attribute_error() -> None:
    assert set(trioproxy.__all__) <= set(dir(trioproxy))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = trioproxy.no_such_name  # the attribute access is the test


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_importing_a_sans_io_module_loads_no_io_library(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.partition('.')[0] in {IO_LIBRARIES!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert loaded == []
