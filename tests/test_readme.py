"""
The README's examples work as printed (every TOML block is a valid config), and a reader finds
their way: the contents list every section in order, and every link within it lands on one.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from trioproxy import parse_config

README = Path(__file__).parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
TOML_BLOCKS = re.findall(r"```toml\n(.*?)```", TEXT, re.DOTALL)
PROSE = re.sub(r"^```.*?^```", "", TEXT, flags=re.DOTALL | re.MULTILINE)
"""The README without its code blocks, whose `#` lines are comments, not headings."""


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_readme_has_config_examples() -> None:
    assert len(TOML_BLOCKS) >= 2


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=[f"block{i}" for i in range(len(TOML_BLOCKS))])
def test_every_toml_block_is_a_valid_config(block: str) -> None:
    named = re.findall(r'_env = "(\w+)"', block)  # the variables the example names are set
    config = parse_config(tomllib.loads(block), environ={name: "value" for name in named})
    assert "sim" in config.providers


def test_the_contents_list_every_section_in_order() -> None:
    contents = TEXT.split("In this README:\n", 1)[1].split("\n\n", 1)[0]
    sections = re.findall(r"^#{2,3} (.+)$", PROSE, re.MULTILINE)
    assert re.findall(r"\]\(#([\w-]+)\)", contents) == [_anchor(heading) for heading in sections]


def test_every_link_within_the_readme_lands_on_a_heading() -> None:
    anchors = {_anchor(heading) for heading in re.findall(r"^#+ (.+)$", PROSE, re.MULTILINE)}
    assert sorted(set(re.findall(r"\]\(#([\w-]+)\)", TEXT)) - anchors) == []
