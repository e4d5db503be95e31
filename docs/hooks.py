"""MkDocs hook: pages hold ``<!-- generated: NAME -->`` markers that are replaced, at each
build, by text made from the code itself (so the docs cannot drift from it).

Each ``gen_*.py`` module beside this file contributes ``GENERATED``: marker name -> a
function returning Markdown.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKER = re.compile(r"<!-- generated: ([a-z0-9-]+) -->")


def generators() -> dict[str, Callable[[], str]]:
    """Every marker any ``gen_*.py`` module knows."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    found: dict[str, Callable[[], str]] = {}
    for path in sorted(HERE.glob("gen_*.py")):
        found |= importlib.import_module(path.stem).GENERATED
    return found


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs API)
    known = generators()

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in known:
            raise KeyError(f"{page.file.src_path}: no generator for marker {name!r}")
        return known[name]()
    return MARKER.sub(replace, markdown)
