"""Models that move between installations: a model's directory streamed out as a tar, and a tar
of a Hugging Face-format safetensors directory taken in as an organization's base model.

No torch here. A tar that comes in is read member by member before anything is extracted: only
regular files and directories, relative names that stay inside the directory, and no pickle
files; then it is extracted with tarfile's ``data`` filter into a temporary directory under
storage, its weights' headers are read (``unsafe_weights``), and the directory is moved into
place with one rename.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tarfile
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.storage import Storage, tree_bytes
from app.models import FineTunedModel, Organization
from app.services.models import PICKLE_WEIGHTS, base_model_kind, unsafe_weights

# Files never sent or taken: pickles (weights or a trainer's state, which only a worker reads).
REFUSED_FILES = (*PICKLE_WEIGHTS, "*.pt")
CHUNK_BYTES = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAR_MEDIA_TYPE = "application/x-tar"
# A LoRA model's merged copy and its lock, in the model's directory (app/services/merged_models.py).
MERGED_PREFIX = ".merged"


def _refused(name: str) -> bool:
    return any(fnmatch(PurePosixPath(name).name, pattern) for pattern in REFUSED_FILES)


# Download --------------------------------------------------------------------------------------


def find_model_row(
    session: Session, storage: Storage, org: Organization, model_id: str
) -> tuple[FineTunedModel, Path]:
    """One of ``org``'s models (fine-tuned or uploaded) and its directory; 404 otherwise."""
    row = session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.organization_id == org.id
        )
    )
    path = storage.resolve(row.storage_path) if row is not None else None
    if row is None or path is None or not path.is_dir():
        raise NotFound(
            f"The model '{model_id}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return row, path


def model_directory(session: Session, storage: Storage, org: Organization, model_id: str) -> Path:
    """The directory of one of ``org``'s models (fine-tuned or uploaded); 404 otherwise."""
    return find_model_row(session, storage, org, model_id)[1]


def _files(root: Path) -> list[Path]:
    """The files a download sends: not pickles, links, or a LoRA model's merged copy (sent on
    its own with ``merged=true``)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and not _refused(p.name)
        and not p.relative_to(root).parts[0].startswith(MERGED_PREFIX)
    )


def tar_stream(root: Path) -> Iterator[bytes]:
    """A tar (POSIX pax) of the regular files under ``root``, named relative to it, as chunks of
    at most ``CHUNK_BYTES``: no file is ever held whole in memory. (tarfile's ``w|`` mode would
    copy each file whole into its sink before a chunk could be sent, so the headers come from
    ``TarInfo.tobuf`` and the contents are copied here, block-padded.)"""
    written = 0
    for path in _files(root):
        with path.open("rb") as source:
            size = path.stat().st_size
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mtime, info.mode = size, int(time.time()), 0o644
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            yield header
            written += len(header)
            left = size
            while left:
                chunk = source.read(min(CHUNK_BYTES, left))
                if not chunk:  # the file shrank while sent: pad, the tar stays well formed
                    chunk = b"\0" * left
                left -= len(chunk)
                written += len(chunk)
                yield chunk
        padding = -size % tarfile.BLOCKSIZE
        if padding:
            written += padding
            yield b"\0" * padding
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    yield b"\0" * end


# Upload ----------------------------------------------------------------------------------------


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code="invalid_model_archive")


def _check_members(archive: tarfile.TarFile, max_bytes: int) -> None:
    total = 0
    for member in archive:
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
            raise _bad(f"The archive's entry '{name}' is not a path inside the model directory.")
        if member.issym() or member.islnk():
            raise _bad(f"The archive's entry '{name}' is a link; send the files themselves.")
        if not (member.isfile() or member.isdir()):
            raise _bad(f"The archive's entry '{name}' is not a regular file or a directory.")
        if member.isfile() and _refused(name):
            raise _bad(
                f"The archive holds '{name}', a pickle file; this server takes safetensors "
                "weights only."
            )
        total += member.size
        if total > max_bytes:
            raise _bad(
                f"The archive's files are over this server's limit of {max_bytes} bytes "
                "(max_upload_bytes)."
            )


def _model_root(extracted: Path) -> Path:
    """The directory holding config.json: the archive's top, or its one top-level directory."""
    if (extracted / "config.json").is_file():
        return extracted
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise _bad("The archive holds no config.json (at its top or in its one top-level directory).")


def _model_name(requested: str | None, top_dir: str | None, filename: str) -> str:
    """The form's ``model``, else the archive's top-level directory, else the file's stem."""
    stem = PurePosixPath(filename).name.split(".")[0] if filename else ""
    name = requested or top_dir or stem or "model"
    if not _NAME.match(name):
        raise InvalidRequest(
            f"'{name}' is not a model name: 1 to 64 letters, digits, '.', '_' or '-'.",
            param="model",
        )
    return name


def uploaded_model_id(org: Organization, name: str) -> str:
    return f"uploaded:{org.name}/{name}"


def store_uploaded_model(
    session: Session,
    storage: Storage,
    org: Organization,
    archive_path: Path,
    *,
    name: str | None,
    filename: str,
    max_bytes: int,
) -> FineTunedModel:
    """Validate the tar at ``archive_path``, move its model directory into storage and add its
    row (flushed, not committed). On any refusal nothing is left in storage."""
    work = storage.tmp_dir / f"model-upload-{secrets.token_hex(8)}"
    (work / "extract").mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive_path, "r:*") as archive:
                _check_members(archive, max_bytes)
                archive.extractall(work / "extract", filter="data")
        except (tarfile.TarError, EOFError) as exc:
            raise _bad(f"The file is not a readable tar archive: {exc}") from None
        root = _model_root(work / "extract")
        problem = unsafe_weights(root)
        if problem:
            raise _bad(f"The model cannot be taken: {problem}.")
        nested = [p for p in root.rglob("*.safetensors") if p.parent != root]
        if nested:
            raise _bad("Weights must sit next to config.json, not in a subdirectory.")
        try:
            kind = base_model_kind(root)
        except (OSError, ValueError):
            raise _bad("The archive's config.json is not a JSON object.") from None
        top_dir = root.name if root != work / "extract" else None
        model_name = _model_name(name, top_dir, filename)
        model_id = uploaded_model_id(org, model_name)
        if session.get(FineTunedModel, model_id) is not None:
            raise Conflict(
                f"The model '{model_id}' already exists; delete it first.", param="model"
            )
        directory = f"uploaded-{secrets.token_hex(8)}"
        target = storage.root / "models" / directory
        target.parent.mkdir(parents=True, exist_ok=True)
        root.rename(target)  # same file system: atomic
        row = FineTunedModel(
            id=model_id,
            organization_id=org.id,
            task=kind,
            base_model=model_id,
            job_id="",
            storage_path=storage.relative(target),
            labels=None,
            bytes=tree_bytes(target),
        )
        session.add(row)
        try:
            session.flush()
        except Exception:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)
