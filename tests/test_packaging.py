"""pyproject.toml in the form current setuptools builds without a warning."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_license_is_an_spdx_expression_with_a_setuptools_that_reads_it() -> None:
    # a { text = ... } table makes setuptools >= 77 warn on every install
    assert PYPROJECT["project"]["license"] == "MIT"
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    lowest = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert lowest, setuptools
    assert int(lowest.group(1)) >= 77, setuptools  # PEP 639 license expressions
