"""The README's examples work as printed: every TOML block is a valid config."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from trioproxy import parse_config

README = Path(__file__).parent.parent / "README.md"
TOML_BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_readme_has_config_examples() -> None:
    assert len(TOML_BLOCKS) >= 2


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=[f"block{i}" for i in range(len(TOML_BLOCKS))])
def test_every_toml_block_is_a_valid_config(block: str) -> None:
    named = re.findall(r'_env = "(\w+)"', block)  # the variables the example names are set
    config = parse_config(tomllib.loads(block), environ={name: "value" for name in named})
    assert "sim" in config.providers
