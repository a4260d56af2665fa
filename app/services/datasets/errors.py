"""The one error a dataset raises: what is wrong, and where (a line, or a Parquet row)."""

from __future__ import annotations


class DatasetError(ValueError):
    def __init__(self, message: str, line: int | None = None, unit: str = "line"):
        self.line = line
        self.unit = unit  # "line" for text files, "row" for Parquet
        self.reason = message
        super().__init__(f"{unit} {line}: {message}" if line is not None else message)
