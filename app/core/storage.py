"""Where things live on disk. Paths are built from server-generated ids only, never names.

``tmp/`` holds files on their way in (an upload being received and validated). Each is named
after the process that owns it, so a process starting on a storage directory that others share
(a cluster) can sweep what a dead process left there without touching another live process's
upload: ``sweep_tmp`` removes the files whose owner on this machine is gone, and anything left
untouched for a day."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from app.core.process import holder_is_gone, process_identity

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A temporary file's name: "<purpose>~<owner>~<random>", where <owner> is process_identity
# ("host:pid-namespace:pid:tmp"); "~" is in no host name.
_OWNER_SEPARATOR = "~"
# Anything in tmp/ untouched this long belongs to nobody: an upload in flight writes to its
# file as the bytes arrive, and a received one is validated and moved within minutes.
TMP_MAX_AGE_SECONDS = 24 * 3600

logger = logging.getLogger("tunehouse.storage")


def owned_tmp_file(directory: Path, purpose: str) -> tuple[Path, BinaryIO]:
    """A new file in ``directory``, open for writing, named after this process."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{purpose}{_OWNER_SEPARATOR}{process_identity('tmp')}{_OWNER_SEPARATOR}"
    fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        return Path(name), os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise


def tmp_owner(name: str) -> str | None:
    """The process identity a temporary file's name carries, if any."""
    parts = name.split(_OWNER_SEPARATOR)
    return parts[1] if len(parts) == 3 else None


# An absolute path in a message: a slash that starts a word (not "a/b", "ft:org/x" or a URL's
# "//"), then one or more segments.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])(?:/[^\s/'\"`:,;()\[\]{}<>]+)+/?")


class Storage:
    def __init__(self, root: Path):
        self.root = root

    def _safe(self, object_id: str) -> str:
        if not _SAFE_ID.match(object_id):
            raise ValueError(f"not a storage id: {object_id!r}")
        return object_id

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / self._safe(file_id)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / self._safe(job_id)

    def checkpoints_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def model_dir(self, job_id: str) -> Path:
        """A finished model lives under the id of the job that trained it, in the directory
        of the attempt that trained it (``attempt_model_dir``)."""
        return self.root / "models" / self._safe(job_id)

    def attempt_model_dir(self, job_id: str, attempt: str) -> Path:
        """Where one attempt at a job (``attempt_name``) puts its finished model: a directory
        of its own, so that a stale attempt and the one that took its job over never write,
        replace or remove each other's files."""
        return self.model_dir(job_id) / self._safe(attempt)

    def final_output_dir(self, job_id: str, attempt: str) -> Path:
        """Where one attempt's training writes its model, before it is registered."""
        return self.job_dir(job_id) / f"final-{self._safe(attempt)}"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"path escapes storage: {relative!r}")
        return path

    def ensure(self) -> None:
        for sub in ("tmp", "files", "jobs", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def sweep_tmp(self, max_age_seconds: float = TMP_MAX_AGE_SECONDS) -> int:
        """Remove from ``tmp/`` what no live process owns: entries whose owner on this
        machine is gone, and entries untouched for ``max_age_seconds`` (an owner on another
        machine, or none). Returns how many were removed."""
        if not self.tmp_dir.is_dir():
            return 0
        removed, now = 0, time.time()
        for entry in self.tmp_dir.iterdir():
            try:
                untouched = now - entry.lstat().st_mtime
            except FileNotFoundError:  # its owner just moved or removed it
                continue
            if untouched > max_age_seconds or holder_is_gone(tmp_owner(entry.name)):
                if entry.is_dir() and not entry.is_symlink():
                    self.remove_tree(entry)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("removed %d abandoned temporary file(s) from %s", removed, self.tmp_dir)
        return removed

    @staticmethod
    def remove_tree(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def attempt_name(lease_owner: str) -> str:
    """A storage id for one attempt at a job, from its lease holder (``host:ns:pid:token``,
    which is not a safe path part): unique per claim, as the holder is."""
    return "lease-" + hashlib.sha256(lease_owner.encode()).hexdigest()[:16]


def redact_paths(text: str, root: Path | None = None) -> str:
    """``text`` without the server's absolute paths, for what a user reads (a job's error and
    its events): a path under ``root`` (the storage root) is named relative to it
    (``files/file-abc``), any other absolute path by its last part only."""
    if root is not None:
        for prefix in dict.fromkeys((str(root), str(root.resolve()))):
            text = text.replace(prefix.rstrip("/") + "/", "")
    return _ABSOLUTE_PATH.sub(lambda match: Path(match.group(0)).name, text)


# ---- sizes and a full disk ---------------------------------------------------------------------

# The errors a write gets when the disk (or the user's share of it) is full.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that hide the errno say it: Rust's io::Error (safetensors) and the C library.
_DISK_FULL_WORDS = ("No space left on device", "StorageFull", "Disk quota exceeded")
# torch.save only says "file write failed"; with less than this free, that was a full disk.
_NEARLY_FULL_BYTES = 16 * 1024 * 1024

DISK_FULL_MESSAGE = (
    "The server's disk is full: the job's checkpoint or model could not be written. Ask the "
    "server's operator to free space, then create the job again."
)


class DiskFull(OSError):
    """A write failed because the disk is full. Its message names no path."""

    def __init__(self, what: str):
        super().__init__(errno.ENOSPC, f"The server's disk is full: {what} could not be written")


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk. With ``where``, a
    failed write that names no cause counts when that file system has next to no space left
    (ask before removing what the failed write left behind)."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain of causes, never a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(words in str(seen) for words in _DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    if where is None or "write" not in str(exc).lower():
        return False
    try:
        return shutil.disk_usage(where).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file's own size; 0 when it is gone)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(dirpath) / name).stat().st_size
    return total
