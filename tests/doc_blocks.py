"""The code blocks of README.md and the documentation pages (docs/*.md), as tests read them.

Every block in a code language is marked on the line above it, ``<!-- tested: PATH (note) -->``
(PATH is the test that runs it) or ``<!-- untested: why -->``. Tests find their blocks by
the marker's note, wherever the block lives: moving a block between pages keeps it tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:<!-- (tested|untested): ([^\n]*?) -->\n)?```(\w+)\n(.*?)```", re.S)
CODE_LANGUAGES = {"python", "bash", "sh", "json"}
"""Blocks in these languages must be marked (text, nginx, toml, jinja: may be)."""


@dataclass(frozen=True)
class Block:
    path: Path
    marker: str | None
    note: str
    language: str
    code: str

    @property
    def runner(self) -> str:
        """The test file a ``tested`` marker names (the note's first word)."""
        return self.note.split(" ")[0]


def doc_files() -> list[Path]:
    """README.md first, then the pages in name order (the site's own, not docs/results)."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks() -> list[Block]:
    return [
        Block(path, *match)
        for path in doc_files()
        for match in BLOCK.findall(path.read_text(encoding="utf-8"))
    ]


def blocks_run_by(test_file: str, language: str | None = None) -> list[Block]:
    """The tested blocks whose marker names ``test_file`` (``tests/...py``), in doc order."""
    return [
        b
        for b in blocks()
        if b.marker == "tested"
        and b.runner == test_file
        and (language is None or b.language == language)
    ]


def noted(test_file: str, fragment: str) -> Block:
    """The one tested block of ``test_file`` whose note starts with ``(fragment``."""
    [block] = [b for b in blocks_run_by(test_file) if b.note.startswith(f"{test_file} ({fragment}")]
    return block
