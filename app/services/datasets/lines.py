"""The lines of a text file: UTF-8 (a byte-order mark and CRLF ends dropped), none longer than
the limit, and never read past it, so one huge line never fills the memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from app.services.datasets.errors import DatasetError

UTF8_BOM = b"\xef\xbb\xbf"
# Byte-order marks of encodings that are not UTF-8 (UTF-32 first: it starts like UTF-16).
OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _refuse_other_encodings(head: bytes) -> None:
    for bom, encoding in OTHER_BOMS.items():
        if head.startswith(bom):
            raise DatasetError(
                f"the file is {encoding} (it starts with a {encoding} byte-order mark); "
                "save it as UTF-8",
                1,
            )


def decoded_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
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


def first_line(path: Path, max_line_bytes: int) -> str | None:
    """The first line that is not blank, stripped; None for a file of blank lines."""
    for _, line in decoded_lines(path, max_line_bytes):
        stripped = line.strip()
        if stripped:
            return stripped
    return None
