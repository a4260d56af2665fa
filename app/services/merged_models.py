"""A LoRA model's merged weights, for ``GET /v1/models/{model}/content?merged=true``.

The API process never imports torch, so the merge runs in a child process with a clean
interpreter (``python -m worker.merge``), bounded by ``merge_timeout_seconds``. It writes a
standalone Hugging Face directory into ``<model directory>/.merged``, by one rename once
complete: the merged copy is made once and kept for later downloads, it is deleted with its
model, and its bytes are added to the model's (so the organization's storage quota counts it).
A download of the model itself leaves it out.

Concurrent first downloads merge once: the merge runs under a lock (a thread lock within a
process, and an ``flock`` on ``<model directory>/.merged.lock`` between processes), and whoever
gets the lock after a merge finds its result. The lock is held only while the merge runs,
never while a tar is sent to a client. A merge that fails or times out leaves nothing behind,
and its partial output from a process that died is removed by the next merge.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest, TunehouseError
from app.core.kinds import KIND_CAUSAL_LM, model_kind
from app.core.settings import Settings
from app.core.storage import Storage, redact_paths, tree_bytes
from app.models import FineTunedModel, Organization
from app.services.model_transfer import MERGED_PREFIX, find_model_row
from app.services.models import adapter_base, require_safe_weights

log = logging.getLogger(__name__)

# In a model's directory; a plain download leaves out every name starting with MERGED_PREFIX.
MERGED_DIR = MERGED_PREFIX
LOCK_FILE = f"{MERGED_PREFIX}.lock"
PARTIAL_PREFIX = f"{MERGED_PREFIX}-partial-"
_POLL_SECONDS = 0.1

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class MergeFailed(TunehouseError):
    """500 ``merge_failed`` or ``merge_timeout``: the server could not merge the adapter."""

    status_code = 500
    error_type = "server_error"
    retryable = False


@dataclass(frozen=True)
class MergeSource:
    model_id: str
    adapter_dir: Path
    base_dir: Path


def merge_source(
    session: Session, settings: Settings, storage: Storage, org: Organization, model_id: str
) -> MergeSource:
    """One of ``org``'s LoRA models and its base's directory: 404 for no such model, 400 for a
    model that is not a LoRA adapter (it is already whole: download it without ``merged``)."""
    row, path = find_model_row(session, storage, org, model_id)
    causal = model_kind(row.task) == KIND_CAUSAL_LM
    base = adapter_base(session, settings, storage, row, path) if causal else None
    if base is None or base == path:  # an uploaded model is its own base
        raise InvalidRequest(
            f"Model '{model_id}' is not a LoRA adapter: its directory already holds the whole "
            "model. Download it without merged=true.",
            param="merged",
            code="not_a_lora_adapter",
        )
    require_safe_weights(path)
    require_safe_weights(base, "Its base model")
    return MergeSource(model_id, path, base)


def merged_directory(source: MergeSource, timeout: float) -> tuple[Path, int]:
    """The merged copy of ``source``, made now unless it exists; with the bytes this call
    added to storage (0 when the copy was already there)."""
    merged = source.adapter_dir / MERGED_DIR
    if merged.is_dir():
        return merged, 0
    with _merge_lock(source.adapter_dir, time.monotonic() + timeout):
        if merged.is_dir():  # merged by whoever held the lock before
            return merged, 0
        _run_merge(source, merged, timeout)
    return merged, tree_bytes(merged)


def count_merged_bytes(session: Session, model_id: str, added: int) -> None:
    """Add the merged copy's bytes to its model's, which the storage quota sums."""
    session.execute(
        update(FineTunedModel)
        .where(FineTunedModel.id == model_id)
        .values(bytes=FineTunedModel.bytes + added)
        .execution_options(synchronize_session=False)
    )


@contextlib.contextmanager
def _merge_lock(model_dir: Path, deadline: float) -> Iterator[None]:
    with _locks_guard:
        local = _locks.setdefault(str(model_dir), threading.Lock())
    if not local.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise _busy()
    try:
        with (model_dir / LOCK_FILE).open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another process merges it
                    if time.monotonic() > deadline:
                        raise _busy() from None
                    time.sleep(_POLL_SECONDS)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        local.release()


def _busy() -> MergeFailed:
    return MergeFailed(
        "The model's merged weights are still being made by another request; try again.",
        param="merged",
        code="merge_timeout",
    )


def _run_merge(source: MergeSource, merged: Path, timeout: float) -> None:
    model_dir = source.adapter_dir
    for stale in model_dir.glob(PARTIAL_PREFIX + "*"):  # left by a process that died
        Storage.remove_tree(stale)
    partial = model_dir / f"{PARTIAL_PREFIX}{secrets.token_hex(8)}"
    command = [sys.executable, "-m", "worker.merge", str(source.base_dir), str(model_dir),
               str(partial)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    try:
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:  # run() has killed the child
            raise MergeFailed(
                f"Merging the adapter of '{source.model_id}' into its base took longer than "
                f"{timeout:g} s (merge_timeout_seconds), and was stopped.",
                param="merged",
                code="merge_timeout",
            ) from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            reason = redact_paths(lines[-1] if lines else f"exit status {done.returncode}")
            log.error("merging %s failed: %s", source.model_id, "\n".join(lines[-20:]))
            raise MergeFailed(
                f"Merging the adapter of '{source.model_id}' into its base failed: {reason[:500]}",
                param="merged",
                code="merge_failed",
            )
        partial.rename(merged)  # one rename: a merged copy is whole or absent
    finally:
        Storage.remove_tree(partial)
    log.info("merged %s in %.1f s", source.model_id, time.monotonic() - started)
