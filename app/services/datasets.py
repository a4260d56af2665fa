"""Dataset validation and reading, shared by the upload route and the training process.

Files are read row by row (never whole in memory). The first row decides the format; each
format has one row checker that either normalises the row or says in words what is wrong, and
one statistics accumulator. A problem is reported with the number of the first bad line (or
"row N" for Parquet). Pure Python (pyarrow only for Parquet): no torch here.

Encoding: UTF-8, with or without a byte-order mark (stripped, like CRLF line ends); a UTF-16 or
UTF-32 file is refused with a message that says so. No line may be longer than
``DatasetLimits.max_line_bytes`` (lines are read at most that long, so one huge line never fills
the memory). ``DatasetLimits`` also holds the fewest rows a file needs and the fewest examples a
label needs; the upload route fills it from the settings, other readers keep the defaults.

Sources: JSONL, CSV/TSV (a header line), Parquet (detected by its ``PAR1`` magic bytes), and
plain text (a ``.txt`` upload, stored with format ``text``: every blank-line-separated paragraph
is one ``{"text": ...}`` row). Plain text cannot be told from CSV by its content, so readers pass
the stored format back: ``iter_examples(path, fmt=file.format)``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.settings import Settings

# Fields of a CSV cell are unbounded by default in spirit, but the csv module caps them.
csv.field_size_limit(16 * 1024 * 1024)

PARQUET_MAGIC = b"PAR1"
UTF8_BOM = b"\xef\xbb\xbf"
# Byte-order marks of encodings that are not UTF-8 (UTF-32 first: it starts like UTF-16).
OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
DEFAULT_MAX_LINE_BYTES = 1024 * 1024
PARQUET_BATCH_ROWS = 1024
CHAT_ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight")


class DatasetError(ValueError):
    def __init__(self, message: str, line: int | None = None, unit: str = "line"):
        self.line = line
        self.unit = unit  # "line" for text files, "row" for Parquet
        self.reason = message
        super().__init__(f"{unit} {line}: {message}" if line is not None else message)


RowChecker = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class DatasetLimits:
    """What a file must keep to. The defaults accept any non-empty file with lines up to 1 MiB;
    the upload route passes the server's settings (``max_dataset_line_bytes``,
    ``min_dataset_rows``, ``min_examples_per_label``)."""

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    min_rows: int = 1
    min_examples_per_label: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(
            max_line_bytes=settings.max_dataset_line_bytes,
            min_rows=settings.min_dataset_rows,
            min_examples_per_label=settings.min_examples_per_label,
        )


# ---- statistics ---------------------------------------------------------------------------------


class Summary:
    """Min, mean and max of a series seen one value at a time."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.low: int | None = None
        self.high: int | None = None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def as_dict(self) -> dict[str, Any]:
        mean = round(self.total / self.count, 1) if self.count else 0.0
        return {"min": self.low or 0, "mean": mean, "max": self.high or 0}


class FormatStats:
    """Statistics of one file, fed its normalised rows in order with their line (or row)
    numbers. ``add`` may raise ValueError for a row that disagrees with earlier ones (reported
    at that row); ``result`` may raise ValueError for a problem of the whole file, or
    DatasetError for one it can place at a line."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, row: dict[str, Any], number: int) -> None:
        self.rows += 1
        self._add(row, number)

    def result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {"rows": self.rows, **self._result(limits)}

    def _add(self, row: dict[str, Any], number: int) -> None:
        pass

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {}


class LabelCounts:
    """How often each label occurs, and the line where it first does."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, int] = {}

    def add(self, label: str, number: int) -> None:
        self.counts[label] += 1
        self.first_seen.setdefault(label, number)

    def check(self, limits: DatasetLimits) -> dict[str, int]:
        """The counts, sorted by label; raises when fewer than 2 labels, or a label with fewer
        examples than ``limits.min_examples_per_label`` (at the line it first occurs)."""
        if len(self.counts) < 2:
            only = ", ".join(repr(label) for label in self.counts)
            raise ValueError(
                f"a classifier needs at least 2 distinct labels, found {len(self.counts)} ({only})"
            )
        needed = limits.min_examples_per_label
        rare = [label for label, count in self.counts.items() if count < needed]
        if rare:
            label = min(rare, key=self.first_seen.__getitem__)
            count = self.counts[label]
            seen = "only once" if count == 1 else f"only {count} times"
            raise DatasetError(
                f"label {label!r} is seen {seen} in the file; each label needs at least "
                f"{needed} examples (min_examples_per_label)",
                self.first_seen[label],
            )
        return dict(sorted(self.counts.items()))


class ClassificationStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.labels = LabelCounts()
        self.text_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.labels.add(row["label"], number)
        self.text_chars.add(len(row["text"]))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {
            "label_counts": self.labels.check(limits),
            "text_chars": self.text_chars.as_dict(),
        }


class ChatStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.messages = Summary()
        self.roles: Counter[str] = Counter()
        self.trained_turns = 0
        self.chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        messages = row["messages"]
        self.messages.add(len(messages))
        self.roles.update(m["role"] for m in messages)
        self.trained_turns += sum(m["role"] == "assistant" and m["weight"] == 1 for m in messages)
        self.chars.add(sum(len(m["content"]) for m in messages))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {
            "messages_per_row": self.messages.as_dict(),
            "role_counts": {role: self.roles[role] for role in CHAT_ROLES},
            "trained_assistant_turns": self.trained_turns,
            "text_chars": self.chars.as_dict(),
        }


class CompletionStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.prompt_chars = Summary()
        self.completion_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.prompt_chars.add(len(row["prompt"]))
        self.completion_chars.add(len(row["completion"]))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {
            "prompt_chars": self.prompt_chars.as_dict(),
            "completion_chars": self.completion_chars.as_dict(),
        }


class TextStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.text_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.text_chars.add(len(row["text"]))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {"text_chars": self.text_chars.as_dict(), "total_chars": self.text_chars.total}


class TabularStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.features: int | None = None
        self.labels = LabelCounts()

    def _add(self, row: dict[str, Any], number: int) -> None:
        size = len(row["features"])
        if self.features is None:
            self.features = size
        elif size != self.features:
            raise ValueError(f"expected {self.features} features as in the first row, got {size}")
        self.labels.add(row["label"], number)

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {"features": self.features, "label_counts": self.labels.check(limits)}


# ---- the formats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFormat:
    name: str  # also the task kind that trains on it
    keys: frozenset[str]  # the keys that identify the format
    check: RowChecker  # returns the normalised row or raises ValueError(reason)
    stats: Callable[[], FormatStats] = FormatStats


FORMATS: dict[str, RowFormat] = {}


def register_format(
    name: str, keys: set[str], stats: Callable[[], FormatStats] = FormatStats
) -> Callable[[RowChecker], RowChecker]:
    def decorate(check: RowChecker) -> RowChecker:
        FORMATS[name] = RowFormat(name, frozenset(keys), check, stats)
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


def _require_keys(row: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Every one of ``keys`` present, and nothing else."""
    for key in keys:
        if key not in row:
            raise ValueError(f"missing required field '{key}'")
    unknown = sorted(set(row) - set(keys))
    if unknown:
        names = " and ".join(f"'{key}'" for key in keys)
        raise ValueError(f"unknown field '{unknown[0]}' ({what} has only {names})")


def _check_string(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def _check_label(label: Any) -> str:
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise ValueError(f"field 'label' must be a string or an integer, got {_type_name(label)}")
    if isinstance(label, str) and not label.strip():
        raise ValueError("field 'label' is empty")
    return str(label)


@register_format("classification", {"text", "label"}, ClassificationStats)
def check_classification_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("text", "label"), "a classification row")
    return {"text": _check_string(row, "text"), "label": _check_label(row["label"])}


def _check_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object, got {_type_name(message)}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"{where}: missing required field '{key}'")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown field '{unknown[0]}' (a message has only 'role', 'content' "
            "and 'weight')"
        )
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        shown = repr(role) if isinstance(role, str) else _type_name(role)
        raise ValueError(f"{where}: unknown role {shown} (use one of {', '.join(CHAT_ROLES)})")
    if not isinstance(content, str):
        raise ValueError(f"{where}: field 'content' must be a string, got {_type_name(content)}")
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f"{where}: field 'weight' must be 0 or 1, got {weight!r}")
    return {"role": role, "content": content, "weight": int(weight)}


@register_format("chat", {"messages"}, ChatStats)
def check_chat_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("messages",), "a chat row")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"field 'messages' must be an array, got {_type_name(messages)}")
    if not messages:
        raise ValueError("field 'messages' is empty")
    normalised = [_check_message(i, m) for i, m in enumerate(messages)]
    assistant = [m for m in normalised if m["role"] == "assistant"]
    if not assistant:
        raise ValueError("no assistant message: a chat row needs one to learn from")
    if not any(m["weight"] == 1 for m in assistant):
        raise ValueError("every assistant message has weight 0: there is nothing to learn from")
    return {"messages": normalised}


@register_format("completion", {"prompt", "completion"}, CompletionStats)
def check_completion_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("prompt", "completion"), "a completion row")
    prompt = _check_string(row, "prompt", allow_empty=True)
    return {"prompt": prompt, "completion": _check_string(row, "completion")}


@register_format("text", {"text"}, TextStats)
def check_text_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("text",), "a text row")
    return {"text": _check_string(row, "text")}


def _check_feature(index: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"features[{index}] must be a number, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"features[{index}] must be a finite number, got {value!r}")
    return number


@register_format("tabular", {"features", "label"}, TabularStats)
def check_tabular_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("features", "label"), "a tabular row")
    features = row["features"]
    if not isinstance(features, list):
        kind = _type_name(features)
        raise ValueError(f"field 'features' must be an array of numbers, got {kind}")
    if not features:
        raise ValueError("field 'features' is empty")
    values = [_check_feature(i, v) for i, v in enumerate(features)]
    return {"features": values, "label": _check_label(row["label"])}


def _format_named(name: str) -> RowFormat:
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


# ---- sources: the raw rows of a file ------------------------------------------------------------


def _refuse_other_encodings(head: bytes) -> None:
    for bom, encoding in OTHER_BOMS.items():
        if head.startswith(bom):
            raise DatasetError(
                f"the file is {encoding} (it starts with a {encoding} byte-order mark); "
                "save it as UTF-8",
                1,
            )


def _decoded_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file without their ends (LF or CRLF), numbered from 1. A
    UTF-8 byte-order mark is dropped; no line is read past ``max_line_bytes``."""
    with path.open("rb") as handle:
        number = 0
        # Room for the longest allowed line and its CRLF: anything longer is too long.
        while raw := handle.readline(max_line_bytes + 2):
            number += 1
            if number == 1:
                _refuse_other_encodings(raw)
                raw = raw.removeprefix(UTF8_BOM)
            raw = raw.rstrip(b"\r\n")
            if len(raw) > max_line_bytes:
                raise DatasetError(
                    f"the line is longer than {max_line_bytes} bytes, this server's limit "
                    "(max_dataset_line_bytes)",
                    number,
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"not valid UTF-8 (byte {exc.start + 1})", number) from None
            yield number, text


def _first_line(path: Path, max_line_bytes: int) -> str | None:
    for _, line in _decoded_lines(path, max_line_bytes):
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


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _jsonl_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    for number, line in _decoded_lines(path, max_line_bytes):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"not valid JSON ({exc.msg} at column {exc.colno})", number
            ) from None


def _paragraph_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    """Plain text: each run of non-blank lines is one row, numbered by its first line."""
    start, lines = 0, []
    for number, line in _decoded_lines(path, max_line_bytes):
        if line.strip():
            start = start or number
            lines.append(line)
        elif lines:
            yield start, {"text": "\n".join(lines)}
            start, lines = 0, []
    if lines:
        yield start, {"text": "\n".join(lines)}


# Columns that mark a table as something other than numeric features plus a label.
_NON_FEATURE_COLUMNS = {"text", "features", "messages", "prompt", "completion"}


def _table_cell_number(column: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(
                f"column '{column}' must be a number, got {value!r} (a table of features has "
                "numeric columns and a 'label' column)"
            ) from None
    if value is None:
        raise ValueError(f"column '{column}' is empty")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"column '{column}' must be a finite number, got {value!r}")
    return float(value)


def _parse_features_cell(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(
            f"field 'features' must be a JSON array of numbers, got {value[:40]!r}"
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


def _csv_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    lines = _decoded_lines(path, max_line_bytes)
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
    shape = TableShaper(header)
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
        try:
            row = shape(dict(zip(header, cells, strict=True)))
        except ValueError as exc:
            raise DatasetError(str(exc), numbers[-1]) from None
        yield numbers[-1], row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
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


def _is_parquet(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def _is_plain_text_name(filename: str | None) -> bool:
    return bool(filename) and str(filename).lower().endswith(".txt")


@dataclass(frozen=True)
class _Source:
    unit: str  # how a position is named in errors: "line" or "row"
    rows: Iterator[tuple[int, Any]]


def _open_source(
    path: Path, fmt: str | None, filename_hint: str | None, max_line_bytes: int
) -> _Source:
    if _is_parquet(path):
        return _Source("row", _parquet_rows(path))
    first = _first_line(path, max_line_bytes)
    if first is None:
        raise DatasetError("the file is empty")
    # A text dataset is plain text unless it is JSONL (its first line a JSON object).
    plain = (fmt == "text" or _is_plain_text_name(filename_hint)) and not _is_json_object(first)
    if plain:
        rows = _paragraph_rows(path, max_line_bytes)
    elif _is_jsonl(first):
        rows = _jsonl_rows(path, max_line_bytes)
    else:
        rows = _csv_rows(path, max_line_bytes)
    return _Source("line", rows)


# ---- reading and validating ---------------------------------------------------------------------


@dataclass
class DatasetInfo:
    format: str
    rows: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sorted(self.stats.get("label_counts", {}))


@dataclass(frozen=True)
class _Checked:
    number: int
    unit: str
    format: RowFormat
    row: dict[str, Any]


def _check_row(row: Any, fmt: RowFormat | None) -> tuple[RowFormat, dict[str, Any]]:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(row)}")
    if fmt is None:
        fmt = _detect_format(row)
    else:
        _check_same_format(row, fmt)
    return fmt, fmt.check(row)


def _checked_rows(
    path: Path, fmt: str | None, filename_hint: str | None, limits: DatasetLimits
) -> Iterator[_Checked]:
    expected = _format_named(fmt) if fmt else None
    source = _open_source(path, fmt, filename_hint, limits.max_line_bytes)
    for number, raw in source.rows:
        try:
            expected, row = _check_row(raw, expected)
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
            stats, fmt_name, unit = checked.format.stats(), checked.format.name, checked.unit
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
        summary = stats.result(limits)
    except DatasetError as exc:
        raise DatasetError(exc.reason, exc.line, unit) from None
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    return DatasetInfo(format=fmt_name, rows=stats.rows, stats=summary)


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
