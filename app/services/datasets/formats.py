"""The row formats: the keys that identify each, its checker and its statistics. The first row
of a file decides its format; every later row must be of the same one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core.kinds import (
    FORMAT_CHAT,
    FORMAT_CLASSIFICATION,
    FORMAT_COMPLETION,
    FORMAT_PREFERENCE,
    FORMAT_TABULAR,
    FORMAT_TEXT,
)
from app.services.datasets import checks
from app.services.datasets.errors import DatasetError
from app.services.datasets.limits import DatasetLimits
from app.services.datasets.preference import PreferenceStats, check_preference_row
from app.services.datasets.statistics import (
    ChatStats,
    ClassificationStats,
    CompletionStats,
    FormatStats,
    TabularStats,
    TextStats,
)

RowChecker = Callable[[dict[str, Any]], dict[str, Any]]
StatsFactory = Callable[[DatasetLimits], FormatStats]


@dataclass(frozen=True)
class RowFormat:
    name: str  # a dataset format of app/core/kinds.py: the job's task
    keys: frozenset[str]  # the keys that identify the format
    check: RowChecker  # returns the normalised row or raises ValueError(reason)
    stats: StatsFactory = FormatStats  # called with the file's limits


FORMATS: dict[str, RowFormat] = {}


def register_format(
    name: str, keys: set[str], stats: StatsFactory = FormatStats
) -> Callable[[RowChecker], RowChecker]:
    def decorate(check: RowChecker) -> RowChecker:
        FORMATS[name] = RowFormat(name, frozenset(keys), check, stats)
        return check

    return decorate


# The order matters: a row that matches no format exactly goes to the first one sharing most keys.
register_format(FORMAT_CLASSIFICATION, {"text", "label"}, ClassificationStats)(
    checks.check_classification_row
)
register_format(FORMAT_CHAT, {"messages"}, ChatStats)(checks.check_chat_row)
register_format(FORMAT_COMPLETION, {"prompt", "completion"}, CompletionStats)(
    checks.check_completion_row
)
register_format(FORMAT_TEXT, {"text"}, TextStats)(checks.check_text_row)
register_format(FORMAT_TABULAR, {"features", "label"}, TabularStats)(checks.check_tabular_row)
register_format(
    FORMAT_PREFERENCE, {"input", "preferred_output", "non_preferred_output"}, PreferenceStats
)(check_preference_row)


def format_named(name: str) -> RowFormat:
    if name not in FORMATS:
        raise DatasetError(f"unknown dataset format '{name}' (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def _guess_format(row: dict[str, Any]) -> RowFormat | None:
    """The format whose keys are exactly the row's; else the one sharing most keys with it (ties
    go to the first registered); None when the row shares no key with any format."""
    keys = set(row)
    for fmt in FORMATS.values():
        if fmt.keys == keys:
            return fmt
    best = max(FORMATS.values(), key=lambda fmt: len(fmt.keys & keys))
    return best if best.keys & keys else None


def _detect_format(row: dict[str, Any]) -> RowFormat:
    fmt = _guess_format(row)
    if fmt is None:
        known = "; ".join(
            f"{f.name} ({', '.join(repr(k) for k in sorted(f.keys))})" for f in FORMATS.values()
        )
        raise ValueError(f"cannot tell the format of this row; the formats' fields are: {known}")
    return fmt


def _check_same_format(row: dict[str, Any], fmt: RowFormat) -> None:
    """Refuse a row that clearly belongs to another format (a row that merely lacks or adds a
    field is left to the format's checker, which says which field)."""
    other = _guess_format(row)
    if other is None or other is fmt:
        return
    keys = set(row)
    if not keys & fmt.keys or (keys == other.keys and not other.keys <= fmt.keys):
        raise ValueError(
            f"a {other.name} row in a file of {fmt.name} rows (a file holds one format)"
        )


def check_row(row: Any, fmt: RowFormat | None) -> tuple[RowFormat, dict[str, Any]]:
    """The row's format (``fmt``, or detected from the row when None) and the normalised row;
    raises ValueError(reason)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {checks.type_name(row)}")
    if fmt is None:
        fmt = _detect_format(row)
    else:
        _check_same_format(row, fmt)
    return fmt, fmt.check(row)
