"""Parquet (detected by its ``PAR1`` magic bytes): rows read in batches bounded in bytes.

A Parquet file is compressed, and its dictionary encoding lets one stored value stand for many
cells, so the size of the file says little about what reading it costs: 939 bytes of zstd can
hold 32 cells of 8 MiB each. So, before any data is read, the footer's uncompressed sizes are
checked: the whole file against ``max_uncompressed_bytes``, and each row group against the row
limit (a row group whose rows average more than ``max_line_bytes`` must hold a row over it; the
metadata only knows row groups, so the error names the group's first row and says so). Then the
rows are read with their strings kept as dictionaries, and each row's size is measured in Arrow
before it becomes Python objects: the first row over the row limit, or the row where the
file's running total passes the file limit, is refused by its number. Batches are sized from
the metadata, and rows become Python objects a few MiB at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.services.datasets.errors import DatasetError
from app.services.datasets.limits import DatasetLimits
from app.services.datasets.tables import TableShaper

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 1024
# What one batch may take decoded in Arrow, judged from the metadata's average row size.
BATCH_BYTES = 64 * 1024 * 1024
# Rows become Python objects (several times their Arrow size) this many bytes at a time.
SLICE_BYTES = 8 * 1024 * 1024
# The bytes of one value of each physical type as a row's size counts them (a string by its
# own bytes, which the column chunk's uncompressed size holds).
_VALUE_BYTES = {
    "BOOLEAN": 1,
    "INT32": 4,
    "FLOAT": 4,
    "INT64": 8,
    "DOUBLE": 8,
    "INT96": 8,  # read as a 64-bit timestamp
    "BYTE_ARRAY": 0,
}
# What the uncompressed size counts besides the values themselves: page headers, and per value
# its length prefix and its levels.
_OVERHEAD_PER_COLUMN = 64 * 1024
_OVERHEAD_PER_VALUE = 8


def is_parquet(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def _limit_words(limit: int, setting: str) -> str:
    return f"{limit} bytes, this server's limit ({setting})"


# ---- before reading: the footer ----------------------------------------------------------------


def _column_bytes(column: pq.ColumnChunkMetaData, schema: pq.ParquetSchema, index: int) -> int:
    """The fewest bytes a column chunk's cells can hold, as rows are measured: its values at
    their width (a dictionary-encoded column stores far fewer bytes than it holds), or its
    uncompressed pages less what pages hold besides the values."""
    kind = column.physical_type
    width = schema.column(index).length if kind == "FIXED_LEN_BYTE_ARRAY" else _VALUE_BYTES[kind]
    overhead = _OVERHEAD_PER_COLUMN + column.num_values * _OVERHEAD_PER_VALUE
    return max(column.num_values * width, column.total_uncompressed_size - overhead)


def _row_group_bytes(metadata: pq.FileMetaData, group: int) -> int:
    """The fewest bytes the rows of a row group can hold."""
    row_group = metadata.row_group(group)
    return sum(
        _column_bytes(row_group.column(i), metadata.schema, i) for i in range(row_group.num_columns)
    )


def _check_metadata(metadata: pq.FileMetaData, limits: DatasetLimits) -> int:
    """Refuse a file whose footer shows more data than the limits allow (a row group holding
    more than its rows may, or a file more than it may); returns the most bytes of one row, on
    average, over the row groups."""
    first_row, total, widest = 1, 0, 1
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        decoded = _row_group_bytes(metadata, group)
        total += decoded
        cap = limits.max_uncompressed_bytes
        if cap is not None and total > cap:
            raise DatasetError(
                f"the file holds more than {_limit_words(cap, 'max_dataset_uncompressed_bytes')}"
                f" uncompressed, by the row group starting at this row (the Parquet metadata)",
                first_row,
                "row",
            )
        if rows and decoded > rows * limits.max_line_bytes:
            raise DatasetError(
                f"the row group starting at this row holds at least {decoded} bytes in "
                f"{rows} {'row' if rows == 1 else 'rows'}, so one of its rows is longer than "
                f"{_limit_words(limits.max_line_bytes, 'max_dataset_line_bytes')} (the Parquet "
                "metadata tells row groups only)",
                first_row,
                "row",
            )
        if rows:
            widest = max(widest, decoded // rows)
        first_row += rows
    return widest


def _dictionary_columns(schema: pq.ParquetSchema) -> list[str]:
    """Every string or bytes column (nested ones too), read as a dictionary: a value stored
    once stays once in memory however many cells repeat it."""
    return [
        column.path
        for column in (schema.column(i) for i in range(len(schema)))
        if column.physical_type == "BYTE_ARRAY" and column.logical_type.type in ("STRING", "NONE")
    ]


# ---- while reading: each row's size in Arrow ---------------------------------------------------


def _is_string_kind(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return any(
        check(kind)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_binary,
            pa.types.is_large_binary,
        )
    )


def _cell_bytes(array: pa.Array) -> np.ndarray:
    """The bytes each cell of ``array`` holds decoded (strings by their UTF-8 bytes, lists and
    structs by the sum of their parts), without turning any into Python objects."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind, count = array.type, len(array)
    if pa.types.is_dictionary(kind):
        values = _cell_bytes(array.dictionary)
        if not len(values):
            return np.zeros(count, dtype=np.int64)
        indices = pc.fill_null(array.indices, 0).to_numpy(zero_copy_only=False)
        sizes = values[indices]
        sizes[~pc.is_valid(array).to_numpy(zero_copy_only=False)] = 0
        return sizes
    if _is_string_kind(kind):
        lengths = pc.fill_null(pc.binary_length(array), 0)
        return lengths.cast("int64").to_numpy(zero_copy_only=False)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        children = _cell_bytes(array.flatten())
        summed = np.bincount(parents, weights=children, minlength=count)
        return summed.astype(np.int64)
    if pa.types.is_struct(kind):
        sizes = np.zeros(count, dtype=np.int64)
        for field in array.flatten():
            sizes += _cell_bytes(field)
        return sizes
    try:
        width = max(1, kind.bit_width // 8)
    except ValueError:  # another variable-width type: its share of the buffers
        width = max(1, array.nbytes // max(count, 1))
    return np.full(count, width, dtype=np.int64)


def _row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    import numpy as np

    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        sizes += _cell_bytes(column)
    return sizes


class _RowBudget:
    """The row and file limits, applied to each batch's row sizes in order."""

    def __init__(self, limits: DatasetLimits):
        self.limits = limits
        self.total = 0

    def first_refused(self, sizes: np.ndarray, first_row: int) -> tuple[int, DatasetError] | None:
        """The index in the batch of the first row over a limit, and its error; None if every
        row keeps to them."""
        import numpy as np

        row_limit = self.limits.max_line_bytes
        over_row = np.flatnonzero(sizes > row_limit)
        cap = self.limits.max_uncompressed_bytes
        running = self.total + np.cumsum(sizes)
        over_file = np.flatnonzero(running > cap) if cap is not None else over_row[:0]
        self.total = int(running[-1]) if len(running) else self.total
        candidates = [int(i[0]) for i in (over_row, over_file) if len(i)]
        if not candidates:
            return None
        index = min(candidates)
        number = first_row + index
        if len(over_row) and over_row[0] == index:
            reason = (
                f"the row holds {int(sizes[index])} bytes, more than "
                f"{_limit_words(row_limit, 'max_dataset_line_bytes')}"
            )
        else:
            assert cap is not None
            reason = (
                "the file's rows up to this one hold more than "
                f"{_limit_words(cap, 'max_dataset_uncompressed_bytes')} uncompressed"
            )
        return index, DatasetError(reason, number, "row")


def _slices(sizes: np.ndarray) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) ranges of rows, each holding about SLICE_BYTES at most (and
    at least one row)."""
    start, held = 0, 0
    for index, size in enumerate(sizes.tolist()):
        if index > start and held + size > SLICE_BYTES:
            yield start, index
            start, held = index, 0
        held += size
    if start < len(sizes):
        yield start, len(sizes)


# ---- the rows -----------------------------------------------------------------------------------


def _open(path: Path, limits: DatasetLimits) -> tuple[pq.ParquetFile, int]:
    """The file opened with its strings as dictionaries, and the batch size its metadata
    allows; raises DatasetError for a file that is no Parquet or holds too much."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as footer:
            metadata = footer.metadata
        widest = _check_metadata(metadata, limits)
        dictionaries = _dictionary_columns(metadata.schema)
        parquet = pq.ParquetFile(path, metadata=metadata, read_dictionary=dictionaries)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DatasetError(f"not a valid Parquet file ({exc})") from None
    return parquet, max(1, min(PARQUET_BATCH_ROWS, BATCH_BYTES // widest))


def parquet_rows(path: Path, limits: DatasetLimits) -> Iterator[tuple[int, Any]]:
    parquet, batch_rows = _open(path, limits)
    with parquet:
        yield from _checked_rows(parquet, batch_rows, limits)


def _checked_rows(
    parquet: pq.ParquetFile, batch_rows: int, limits: DatasetLimits
) -> Iterator[tuple[int, Any]]:
    import pyarrow

    try:
        shape = TableShaper(list(parquet.schema_arrow.names))
    except (pyarrow.ArrowException, OSError) as exc:
        raise DatasetError(f"not a valid Parquet file ({exc})") from None
    budget = _RowBudget(limits)
    number = 0
    batches = parquet.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches)
            sizes = _row_bytes(batch)
        except StopIteration:
            return
        except (pyarrow.ArrowException, OSError) as exc:
            raise DatasetError(f"not valid Parquet ({exc})", number + 1, "row") from None
        refused = budget.first_refused(sizes, number + 1)
        end = refused[0] if refused else batch.num_rows
        for start, stop in _slices(sizes[:end]):
            for row in batch.slice(start, stop - start).to_pylist():
                number += 1
                try:
                    shaped = shape(row)
                except ValueError as exc:
                    raise DatasetError(str(exc), number, "row") from None
                yield number, shaped
        if refused:
            raise refused[1]
