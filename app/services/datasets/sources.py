"""Sources: the raw rows of a file, numbered by line (or Parquet row), whatever its kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.kinds import FORMAT_TEXT
from app.services.datasets.errors import DatasetError
from app.services.datasets.jsonl import is_json_object, is_jsonl, jsonl_rows
from app.services.datasets.limits import DatasetLimits
from app.services.datasets.lines import first_line
from app.services.datasets.parquet import is_parquet, parquet_rows
from app.services.datasets.plain_text import paragraph_rows
from app.services.datasets.tables import csv_rows


def _is_plain_text_name(filename: str | None) -> bool:
    return bool(filename) and str(filename).lower().endswith(".txt")


@dataclass(frozen=True)
class Source:
    unit: str  # how a position is named in errors: "line" or "row"
    rows: Iterator[tuple[int, Any]]


def open_source(
    path: Path, fmt: str | None, filename_hint: str | None, limits: DatasetLimits
) -> Source:
    if is_parquet(path):
        return Source("row", parquet_rows(path, limits))
    max_line_bytes = limits.max_line_bytes
    first = first_line(path, max_line_bytes)
    if first is None:
        raise DatasetError("the file is empty")
    # A text dataset is plain text unless it is JSONL (its first line a JSON object).
    plain = (fmt == FORMAT_TEXT or _is_plain_text_name(filename_hint)) and not is_json_object(first)
    if plain:
        rows = paragraph_rows(path, max_line_bytes)
    elif is_jsonl(first):
        rows = jsonl_rows(path, max_line_bytes)
    else:
        rows = csv_rows(path, max_line_bytes)
    return Source("line", rows)
