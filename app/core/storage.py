"""Where things live on disk. Paths are built from server-generated ids only, never names."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
        """A finished model lives under the id of the job that trained it."""
        return self.root / "models" / self._safe(job_id)

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

    @staticmethod
    def remove_tree(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


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
