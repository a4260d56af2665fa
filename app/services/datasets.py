"""Dataset validation and reading, shared by the upload route and the training process.

Files are read line by line (never whole in memory). The first row decides the format; each
format has one row checker that either normalises the row or says in words what is wrong.
A problem is reported with the number of the first bad line. Pure Python: no torch here.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields of a CSV cell are unbounded by default in spirit, but the csv module caps them.
csv.field_size_limit(16 * 1024 * 1024)


class DatasetError(ValueError):
    def __init__(self, message: str, line: int | None = None):
        self.line = line
        self.reason = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


RowChecker = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RowFormat:
    name: str  # also the task kind that trains on it
    keys: frozenset[str]  # the keys that identify the format
    check: RowChecker  # returns the normalised row or raises ValueError(reason)


FORMATS: dict[str, RowFormat] = {}


def register_format(name: str, keys: set[str]) -> Callable[[RowChecker], RowChecker]:
    def decorate(check: RowChecker) -> RowChecker:
        FORMATS[name] = RowFormat(name, frozenset(keys), check)
        return check

    return decorate


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


@register_format("classification", {"text", "label"})
def check_classification_row(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("text", "label"):
        if key not in row:
            raise ValueError(f"missing required field '{key}'")
    unknown = sorted(set(row) - {"text", "label"})
    if unknown:
        raise ValueError(
            f"unknown field '{unknown[0]}' (a classification row has only 'text' and 'label')"
        )
    text, label = row["text"], row["label"]
    if not isinstance(text, str):
        raise ValueError(f"field 'text' must be a string, got {_type_name(text)}")
    if not text.strip():
        raise ValueError("field 'text' is empty")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise ValueError(f"field 'label' must be a string or an integer, got {_type_name(label)}")
    if isinstance(label, str) and not label.strip():
        raise ValueError("field 'label' is empty")
    return {"text": text, "label": str(label)}


def _detect_format(row: dict[str, Any]) -> RowFormat:
    keys = set(row)
    # The format whose identifying keys overlap most with the row; ties go to the first one.
    best = max(FORMATS.values(), key=lambda fmt: len(fmt.keys & keys))
    return best


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"not valid UTF-8 (byte {exc.start + 1})", number) from None
            yield number, text.rstrip("\r\n")


def _first_line(path: Path) -> str | None:
    for _, line in _decoded_lines(path):
        stripped = line.strip()
        if stripped:
            return stripped
    return None


def _is_jsonl(first_line: str) -> bool:
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


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"not valid JSON ({exc.msg} at column {exc.colno})", number
            ) from None


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    lines = _decoded_lines(path)
    numbers: list[int] = []

    def texts() -> Iterator[str]:
        for number, line in lines:
            numbers.append(number)
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
    reader = csv.reader(texts(), delimiter=delimiter, strict=True)
    while True:
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
        yield numbers[-1], dict(zip(header, cells, strict=True))


def _raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    first = _first_line(path)
    if first is None:
        raise DatasetError("the file is empty")
    return _jsonl_rows(path) if _is_jsonl(first) else _csv_rows(path)


@dataclass
class DatasetInfo:
    format: str
    rows: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sorted(self.stats.get("label_counts", {}))


def _checked_rows(path: Path) -> Iterator[tuple[int, RowFormat, dict[str, Any]]]:
    fmt: RowFormat | None = None
    for number, row in _raw_rows(path):
        if not isinstance(row, dict):
            raise DatasetError(f"expected a JSON object, got {_type_name(row)}", number)
        if fmt is None:
            fmt = _detect_format(row)
        try:
            yield number, fmt, fmt.check(row)
        except ValueError as exc:
            raise DatasetError(str(exc), number) from None


def validate_dataset(path: Path) -> DatasetInfo:
    """Read the whole file once; return its format and statistics or raise DatasetError."""
    fmt_name = ""
    rows = 0
    labels: Counter[str] = Counter()
    lengths: list[int] = []
    for _, fmt, row in _checked_rows(path):
        fmt_name = fmt.name
        rows += 1
        if "label" in row:
            labels[row["label"]] += 1
        if "text" in row:
            lengths.append(len(row["text"]))
    if rows == 0:
        raise DatasetError("the file has no rows")
    if fmt_name == "classification" and len(labels) < 2:
        only = ", ".join(repr(label) for label in labels)
        raise DatasetError(f"a classifier needs at least 2 distinct labels, found 1 ({only})")
    stats: dict[str, Any] = {"rows": rows}
    if labels:
        stats["label_counts"] = dict(sorted(labels.items()))
    if lengths:
        stats["text_chars"] = {
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
        }
    return DatasetInfo(format=fmt_name, rows=rows, stats=stats)


def iter_examples(path: Path) -> Iterator[dict[str, Any]]:
    """The normalised rows of a validated file (for classification: text and string label)."""
    for _, _, row in _checked_rows(path):
        yield row
