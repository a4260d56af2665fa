"""JSON Lines: one JSON value per line (blank lines skipped).

``parse_json`` reads every JSON value of a dataset (a JSONL line, a CSV ``features`` cell). Two
things the json module cannot read become a reason instead of a server error: nesting deeper
than MAX_JSON_DEPTH (json recurses, and a line of 100,000 ``[`` is a RecursionError) and an
integer longer than the interpreter converts (``sys.get_int_max_str_digits()``, 4,300 digits).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.services.datasets.errors import DatasetError
from app.services.datasets.lines import decoded_lines

# A dataset row nests 3 levels deep at most (a chat row, its messages, a message).
MAX_JSON_DEPTH = 64
# A JSON string (skipped whole, so brackets inside text do not count), or a bracket.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _check_depth(text: str) -> None:
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return  # it cannot nest deeper than it has brackets
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(
                    f"the JSON nests deeper than {MAX_JSON_DEPTH} levels (a dataset row needs 3)"
                )
        elif token in "]}":
            depth -= 1


def parse_json(text: str) -> Any:
    """``json.loads``; raises json.JSONDecodeError for text that is not JSON, and ValueError
    with a reason for JSON nested too deeply or holding an integer too long to read."""
    _check_depth(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(
            f"a number has more than {sys.get_int_max_str_digits()} digits, the most this "
            "server reads"
        ) from None


def is_jsonl(first_line: str) -> bool:
    if first_line[0] in "{[":
        return True
    if first_line[0] != '"':
        return False
    # A quoted CSV header ("text","label") also starts with a quote: it is not one JSON value.
    try:
        parse_json(first_line)
    except ValueError:
        return False
    return True


def is_json_object(line: str) -> bool:
    try:
        return isinstance(parse_json(line), dict)
    except ValueError:
        return False


def jsonl_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    for number, line in decoded_lines(path, max_line_bytes):
        if not line.strip():
            continue
        try:
            value = parse_json(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"not valid JSON ({exc.msg} at column {exc.colno})", number
            ) from None
        except ValueError as exc:
            raise DatasetError(str(exc), number) from None
        yield number, value
