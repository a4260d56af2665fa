"""Tables (CSV, TSV, and Parquet's rows): how a table row becomes a dataset row, and the CSV
reader."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.services.datasets.checks import shown
from app.services.datasets.errors import DatasetError
from app.services.datasets.jsonl import parse_json
from app.services.datasets.lines import decoded_lines

# Fields of a CSV cell are unbounded by default in spirit, but the csv module caps them.
csv.field_size_limit(16 * 1024 * 1024)

# Columns that mark a table as something other than numeric features plus a label.
_NON_FEATURE_COLUMNS = {"text", "features", "messages", "prompt", "completion"}


def _table_cell_number(column: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(
                f"column '{column}' must be a number, got {shown(value)} (a table of features has "
                "numeric columns and a 'label' column)"
            ) from None
    if value is None:
        raise ValueError(f"column '{column}' is empty")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"column '{column}' must be a finite number, got {shown(value)}")
    return float(value)


def _parse_features_cell(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return parse_json(value)  # ValueError(reason) for JSON nested too deeply, or a huge number
    except json.JSONDecodeError:
        raise ValueError(
            f"field 'features' must be a JSON array of numbers, got {shown(value)}"
        ) from None


def _is_number_cell(value: Any) -> bool:
    try:
        _table_cell_number("", value)
    except ValueError:
        return False
    return True


class TableShaper:
    """How a CSV or Parquet row becomes a dataset row: a ``features`` column holding a (JSON)
    array; or numeric columns gathered into ``features`` beside ``label`` (when the first row's
    cells besides ``label`` are all numbers); otherwise the row as it is."""

    def __init__(self, header: list[str]):
        self.columns = [name for name in header if name != "label"]
        self.has_array = "features" in header
        # Only a table with a label and no column another format names can be numeric columns;
        # for one that can, the first row decides (None until then).
        possible = "label" in header and self.columns and not _NON_FEATURE_COLUMNS & set(header)
        self.from_columns: bool | None = None if possible else False

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.has_array:
            return {**row, "features": _parse_features_cell(row["features"])}
        if self.from_columns is None:
            self.from_columns = all(_is_number_cell(row[name]) for name in self.columns)
        if not self.from_columns:
            return row
        features = [_table_cell_number(name, row[name]) for name in self.columns]
        return {"features": features, "label": row["label"]}


class _Record:
    """The lines of the CSV record being read: a quoted cell may span lines, and the record,
    like a line, keeps to the row limit."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.start, self.size = 0, 0

    def begin(self) -> None:
        self.start, self.size = 0, 0

    def add(self, number: int, line: str) -> None:
        self.start = self.start or number
        self.size += len(line.encode("utf-8")) + 1
        if self.size > self.max_bytes + 1:  # the last line's end is not the record's
            raise DatasetError(
                f"the row starting at this line is longer than {self.max_bytes} bytes, this "
                "server's limit (max_dataset_line_bytes); is a quote left open?",
                self.start,
            )


def csv_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    lines = decoded_lines(path, max_line_bytes)
    numbers: list[int] = []
    record = _Record(max_line_bytes)

    def texts() -> Iterator[str]:
        for number, line in lines:
            numbers.append(number)
            record.add(number, line)
            yield line

    # The header is the first line that is not blank.
    header_line = next((line for line in texts() if line.strip()), None)
    if header_line is None:
        return
    delimiter = "\t" if "\t" in header_line and "," not in header_line else ","
    header = next(csv.reader([header_line], delimiter=delimiter))
    header = [name.strip() for name in header]
    if len(set(header)) != len(header):
        raise DatasetError("the header repeats a column name", numbers[-1])
    shape = TableShaper(header)
    reader = csv.reader(texts(), delimiter=delimiter, strict=True)
    while True:
        record.begin()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetError(f"not valid CSV ({exc})", numbers[-1] if numbers else 1) from None
        if not cells or all(not cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise DatasetError(
                f"expected {len(header)} columns as in the header, got {len(cells)}", numbers[-1]
            )
        try:
            row = shape(dict(zip(header, cells, strict=True)))
        except ValueError as exc:
            raise DatasetError(str(exc), numbers[-1]) from None
        yield numbers[-1], row
