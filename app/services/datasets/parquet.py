"""Parquet (detected by its ``PAR1`` magic bytes): rows read in bounded batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.services.datasets.errors import DatasetError
from app.services.datasets.tables import TableShaper

PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 1024


def is_parquet(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is installed with the server
        raise DatasetError("reading Parquet files needs pyarrow on the server") from None
    try:
        parquet = pq.ParquetFile(path)
        shape = TableShaper(list(parquet.schema_arrow.names))
    except (pyarrow.ArrowException, OSError) as exc:
        raise DatasetError(f"not a valid Parquet file ({exc})") from None
    number = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pyarrow.ArrowException, OSError) as exc:
            raise DatasetError(f"not valid Parquet ({exc})", number + 1, "row") from None
        for row in batch.to_pylist():
            number += 1
            try:
                yield number, shape(row)
            except ValueError as exc:
                raise DatasetError(str(exc), number, "row") from None
