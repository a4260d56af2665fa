"""JSON Lines: one JSON value per line (blank lines skipped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.services.datasets.errors import DatasetError
from app.services.datasets.lines import decoded_lines


def is_jsonl(first_line: str) -> bool:
    if first_line[0] in "{[":
        return True
    if first_line[0] != '"':
        return False
    # A quoted CSV header ("text","label") also starts with a quote: it is not one JSON value.
    try:
        json.loads(first_line)
    except json.JSONDecodeError:
        return False
    return True


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def jsonl_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    for number, line in decoded_lines(path, max_line_bytes):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"not valid JSON ({exc.msg} at column {exc.colno})", number
            ) from None
