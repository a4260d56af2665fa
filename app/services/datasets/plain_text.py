"""Plain text (a ``.txt`` upload): every blank-line-separated paragraph is one ``{"text"}``
row. A paragraph is a row, so it keeps to the row limit (``max_line_bytes``) like a line does:
a file with no blank line is not one row of the whole file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.services.datasets.errors import DatasetError
from app.services.datasets.lines import decoded_lines


def paragraph_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    """Plain text: each run of non-blank lines is one row, numbered by its first line."""
    start, lines, size = 0, [], 0
    for number, line in decoded_lines(path, max_line_bytes):
        if line.strip():
            start = start or number
            lines.append(line)
            size += len(line.encode("utf-8")) + (len(lines) > 1)  # and the joining newline
            if size > max_line_bytes:
                raise DatasetError(
                    f"the paragraph starting at this line is longer than {max_line_bytes} "
                    "bytes, this server's limit for a row (max_dataset_line_bytes); a blank "
                    "line ends a paragraph",
                    start,
                )
        elif lines:
            yield start, {"text": "\n".join(lines)}
            start, lines, size = 0, [], 0
    if lines:
        yield start, {"text": "\n".join(lines)}
