"""Where things live on disk. Paths are built from server-generated ids only, never names."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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
