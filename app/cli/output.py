"""How the client commands print: the API's JSON for scripts (`--json`), rich tables for
people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Column, Table

# Piped output keeps whole rows: a terminal's width only limits a terminal. What the server
# sends is printed as it is (no markup: a "[" in a file name is a "["); styles are asked for.
console = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def print_json(value: Any) -> None:
    """One JSON document on one line (a list of them reads as JSON lines)."""
    print(json.dumps(value), flush=True)


def print_deleted(deleted: dict[str, Any], json_output: bool) -> None:
    """A delete's answer: the API's JSON, or one line."""
    if json_output:
        print_json(deleted)
    else:
        console.print(f"Deleted {deleted['id']}")


def when(seconds: int | float | None) -> str:
    """Unix seconds as local time, or nothing."""
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def size(count: int | None) -> str:
    if count is None:
        return ""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # hyperparameters, stats: the ones that are set
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return str(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], ids: int = 1) -> None:
    """A table whose first ``ids`` columns (ids that people copy) never wrap."""
    head = [Column(name, no_wrap=index < ids) for index, name in enumerate(columns)]
    grid = Table(*head)
    for row in rows:
        grid.add_row(*(cell(value) for value in row))
    console.print(grid)


def fields(title: str, pairs: Iterable[tuple[str, Any]]) -> None:
    """One object as a two-column table; empty values left out."""
    grid = Table(title=title, show_header=False, title_justify="left")
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for name, value in pairs:
        if value not in (None, "", [], {}):
            grid.add_row(name, cell(value))
    console.print(grid)
