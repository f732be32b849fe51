"""What the benchmark scripts share: writing their section of a Markdown file in place."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str, start_mark: str, end_mark: str) -> None:
    """Replace the part of ``path`` between the marks (``text`` holds them), or append ``text``."""
    old = path.read_text() if path.exists() else ""
    start, end = old.find(start_mark), old.find(end_mark)
    if start != -1 and end > start:
        new = old[:start] + text + old[end + len(end_mark) :]
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + text + "\n"
    path.write_text(new)
