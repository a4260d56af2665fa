"""Streaming multipart uploads: the file part goes straight to a temporary file on disk while
its sha256 and size are counted, so a large upload is never held in memory and an oversized
one is refused before the rest of the body is read: at once when its Content-Length says so,
otherwise as soon as the count passes the limit. What is not the file (fields, part headers,
boundaries) is bounded too: at most MAX_FORM_FIELDS fields of MAX_FIELD_BYTES, and
FORM_OVERHEAD_BYTES in all. The client's filename is a label only (control characters dropped,
at most 255 characters); the file is stored under a server-made name.

Whatever goes wrong while the body is received (a malformed form, a limit, a client that
leaves, a full disk), the temporary file is closed and removed before the error leaves here; a
full disk is a 507 ``disk_full``."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import InsufficientStorage, InvalidRequest, TooLarge
from app.core.storage import owned_tmp_file

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 4096
# An upload sends 'purpose' and perhaps the two 'expires_after' fields; room for a few more.
MAX_FORM_FIELDS = 16
# A form's parts besides the file (boundaries, part headers, short fields) fit in this much.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 255
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Upload:
    path: Path | None = None  # the temporary file holding the file part
    filename: str = ""
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class _Receiver:
    """python-multipart callbacks that route each part to a field or to the temp file."""

    def __init__(self, tmp_dir: Path, max_bytes: int):
        self.tmp_dir, self.max_bytes = tmp_dir, max_bytes
        self.upload = Upload()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._field_name: str | None = None
        self._field_value = bytearray()
        self._fields_seen = 0
        self._in_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._header_name = self._header_value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self._file is not None:
                raise InvalidRequest("Send exactly one 'file' part.", param="file")
            self.upload.filename = filename_label(params.get(b"filename", b""))
            self.upload.path, self._file = owned_tmp_file(self.tmp_dir, "upload")
            self._in_file = True
        else:
            self._fields_seen += 1
            if self._fields_seen > MAX_FORM_FIELDS:
                raise InvalidRequest(
                    f"The form has more than {MAX_FORM_FIELDS} fields; an upload sends 'file', "
                    "'purpose' and, if it wants, 'expires_after[anchor]' and "
                    "'expires_after[seconds]'."
                )
            self._field_name, self._field_value = name, bytearray()
            self._in_file = False

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._in_file:
            assert self._file is not None
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise _too_large(f"The file is larger than this server's limit of {self.max_bytes}")
            self._hash.update(chunk)
            self._file.write(chunk)
        else:
            self._field_value += chunk
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"Form field '{self._field_name}' is too long.")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
        elif self._field_name is not None:
            try:
                value = self._field_value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"Form field '{self._field_name}' is not UTF-8.") from None
            self.upload.fields[self._field_name] = value
            self._field_name = None

    def finish(self) -> Upload:
        """Flush the file to the disk (fsync) and close it; the upload, whole."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        self.upload.sha256 = self._hash.hexdigest()
        return self.upload

    def abort(self) -> None:
        """Close and remove the temporary file, whatever state it is in. Closing flushes what
        is buffered, which fails again on a full disk: the file is closed all the same."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self.upload.discard()


def filename_label(raw: bytes) -> str:
    """The client's filename as a label to show: decoded, without control characters (a NUL or
    a newline would break a database column or a response header), at most 255 characters.
    Never used as a path."""
    name = raw.decode("utf-8", "replace")
    name = "".join(ch for ch in name if unicodedata.category(ch) != "Cc").strip()
    return name[:MAX_FILENAME_CHARS] or "upload"


def _too_large(what: str) -> TooLarge:
    return TooLarge(f"{what} bytes (max_upload_bytes).", param="file", code="file_too_large")


def _refuse_declared_size(content_length: str | None, max_bytes: int) -> None:
    """Refuse a body whose declared size cannot hold a file within the limit, unread."""
    try:
        declared = int(content_length) if content_length else None
    except ValueError:
        raise InvalidRequest("The Content-Length header is not a number.") from None
    if declared is not None and declared > max_bytes + FORM_OVERHEAD_BYTES:
        raise _too_large(
            f"The request body is {declared} bytes, more than this server's upload limit of "
            f"{max_bytes}"
        )


def _refuse_form_overhead(received: int, file_bytes: int) -> None:
    """Refuse a body whose bytes besides the file's (many fields, long headers, a preamble or
    an epilogue) pass FORM_OVERHEAD_BYTES: a body without a Content-Length is bounded too."""
    if received - file_bytes > FORM_OVERHEAD_BYTES:
        raise TooLarge(
            f"The form's parts besides the file hold more than {FORM_OVERHEAD_BYTES} bytes.",
            code="form_too_large",
        )


def _disk_full() -> InsufficientStorage:
    return InsufficientStorage(
        "The server's disk is full: the file was not stored. Try again later.", code="disk_full"
    )


async def receive_upload(
    content_type: str | None,
    body: AsyncIterator[bytes],
    *,
    tmp_dir: Path,
    max_bytes: int,
    content_length: str | None = None,
) -> Upload:
    """Parse a multipart body as it arrives. On any error the temporary file is removed."""
    _refuse_declared_size(content_length, max_bytes)
    mime, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise InvalidRequest("Send the file as multipart/form-data with 'file' and 'purpose'.")
    receiver = _Receiver(tmp_dir, max_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    received, upload = 0, None
    try:
        async for chunk in body:
            received += len(chunk)
            parser.write(chunk)
            _refuse_form_overhead(received, receiver.upload.size)
        parser.finalize()
        upload = receiver.finish()
    except FormParserError as exc:
        raise InvalidRequest(f"The multipart body is malformed: {exc}") from None
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full() from exc
        raise
    finally:
        if upload is None:
            receiver.abort()
    if upload.path is None:
        raise InvalidRequest("The form has no 'file' part.", param="file")
    return upload
