"""What a file must keep to, filled from the server's settings by the upload route."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.settings import Settings

DEFAULT_MAX_LINE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class DatasetLimits:
    """What a file must keep to. The defaults accept any non-empty file with lines (and rows)
    up to 1 MiB; the upload route passes the server's settings (``max_dataset_line_bytes``,
    ``min_dataset_rows``, ``min_examples_per_label``, ``max_dataset_uncompressed_bytes``,
    ``max_dataset_labels``). ``None`` leaves a limit off: a reader of a file the server already
    validated (the training process) needs no more than the row limit."""

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    min_rows: int = 1
    min_examples_per_label: int = 1
    max_uncompressed_bytes: int | None = None
    max_labels: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(
            max_line_bytes=settings.max_dataset_line_bytes,
            min_rows=settings.min_dataset_rows,
            min_examples_per_label=settings.min_examples_per_label,
            max_uncompressed_bytes=(
                settings.max_dataset_uncompressed_bytes or settings.max_upload_bytes
            ),
            max_labels=settings.max_dataset_labels,
        )
