"""Reading a whole file once: its format and statistics (``validate_dataset``), or its
normalised rows (``iter_examples``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.services.datasets.errors import DatasetError
from app.services.datasets.formats import RowFormat, check_row, format_named
from app.services.datasets.limits import DatasetLimits
from app.services.datasets.sources import open_source
from app.services.datasets.statistics import FormatStats


@dataclass
class DatasetInfo:
    format: str
    rows: int
    stats: dict[str, Any] = field(default_factory=dict)  # what the file object shows (bounded)
    labels: list[str] = field(default_factory=list)  # every label, sorted (stats lists a few)


@dataclass(frozen=True)
class _Checked:
    number: int
    unit: str
    format: RowFormat
    row: dict[str, Any]


def _checked_rows(
    path: Path, fmt: str | None, filename_hint: str | None, limits: DatasetLimits
) -> Iterator[_Checked]:
    expected = format_named(fmt) if fmt else None
    source = open_source(path, fmt, filename_hint, limits)
    for number, raw in source.rows:
        try:
            expected, row = check_row(raw, expected)
        except ValueError as exc:
            raise DatasetError(str(exc), number, source.unit) from None
        yield _Checked(number, source.unit, expected, row)


def validate_dataset(
    path: Path,
    filename_hint: str | None = None,
    *,
    fmt: str | None = None,
    limits: DatasetLimits | None = None,
) -> DatasetInfo:
    """Read the whole file once; return its format and statistics or raise DatasetError.

    ``filename_hint`` is the name the user uploaded it under (only ``.txt`` matters: plain
    text); ``fmt`` is the format stored for the file, when it is known already."""
    limits = limits or DatasetLimits()
    stats: FormatStats | None = None
    fmt_name, unit = "", "line"
    for checked in _checked_rows(path, fmt, filename_hint, limits):
        if stats is None:
            stats, fmt_name, unit = checked.format.stats(limits), checked.format.name, checked.unit
        try:
            stats.add(checked.row, checked.number)
        except ValueError as exc:
            raise DatasetError(str(exc), checked.number, checked.unit) from None
    if stats is None:
        raise DatasetError("the file has no rows")
    if stats.rows < limits.min_rows:
        raise DatasetError(
            f"too few rows: the file has {stats.rows}, a training file needs at least "
            f"{limits.min_rows} (min_dataset_rows)"
        )
    try:
        summary = stats.result()
    except DatasetError as exc:
        raise DatasetError(exc.reason, exc.line, unit) from None
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    return DatasetInfo(fmt_name, stats.rows, summary, stats.labels())


def iter_examples(
    path: Path, fmt: str | None = None, *, limits: DatasetLimits | None = None
) -> Iterator[dict[str, Any]]:
    """The normalised rows of a validated file. Pass the file's stored ``format`` as ``fmt``
    (needed for plain-text files, and it refuses rows of another format). Rows are:
    classification ``{"text", "label": str}``; chat ``{"messages": [{"role", "content",
    "weight": 0|1}]}``; completion ``{"prompt", "completion"}``; text ``{"text"}``; tabular
    ``{"features": [float], "label": str}``."""
    for checked in _checked_rows(path, fmt, None, limits or DatasetLimits()):
        yield checked.row
