"""Plain text (a ``.txt`` upload): every blank-line-separated paragraph is one ``{"text"}``
row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.services.datasets.lines import decoded_lines


def paragraph_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    """Plain text: each run of non-blank lines is one row, numbered by its first line."""
    start, lines = 0, []
    for number, line in decoded_lines(path, max_line_bytes):
        if line.strip():
            start = start or number
            lines.append(line)
        elif lines:
            yield start, {"text": "\n".join(lines)}
            start, lines = 0, []
    if lines:
        yield start, {"text": "\n".join(lines)}
