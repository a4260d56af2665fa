"""Upload temporary files never outlive their upload (issue 9, A9). A full disk while the body
is written, or when it is flushed at the end, answers 507 ``disk_full`` and leaves nothing in
storage/tmp; and at start-up an API process sweeps what dead processes left there, but never
another live process's upload (several API processes may share one storage directory)."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.process import local_owner_prefix
from app.core.storage import TMP_MAX_AGE_SECONDS, Storage
from app.main import create_app
from tests.conftest import make_settings
from tests.support import ROOT, jsonl, sentiment_rows
from tests.test_bad_input import assert_error, changes_nothing


class FullDisk(io.FileIO):
    """A file on a full disk: every write fails with ENOSPC."""

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(api, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Files opened in storage/tmp are on a full disk (buffered, as the upload writes them:
    a small body fails when it is flushed at the end, a large one while it is written)."""
    real_fdopen = os.fdopen
    tmp_dir = str(Storage(api.settings.storage_root).tmp_dir)

    def fdopen(fd: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.readlink(f"/proc/self/fd/{fd}").startswith(tmp_dir):
            return io.BufferedWriter(FullDisk(fd, "wb"))
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize(
    "rows",
    [20, 4000],
    ids=["fails-at-the-final-flush", "fails-while-writing"],
)
def test_a_full_disk_answers_507_and_leaves_no_temporary_file(api, full_disk, rows: int) -> None:  # type: ignore[no-untyped-def]
    content = jsonl(sentiment_rows(rows, seed=5))
    assert (len(content) < io.DEFAULT_BUFFER_SIZE) == (rows == 20)
    tmp = Storage(api.settings.storage_root).tmp_dir
    with changes_nothing(api):
        response = api.client.post(
            "/v1/files",
            headers=api.headers(),
            files={"file": ("train.jsonl", content, "application/octet-stream")},
            data={"purpose": "fine-tune"},
        )
        error = assert_error(response, 507, words="disk is full")
    assert (error["type"], error["code"]) == ("server_error", "disk_full")
    assert list(tmp.iterdir()) == []


def test_an_upload_after_the_disk_has_room_again_goes_through(api) -> None:  # type: ignore[no-untyped-def]
    response = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("train.jsonl", jsonl(sentiment_rows(20, seed=5)), "text/plain")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    assert list(Storage(api.settings.storage_root).tmp_dir.iterdir()) == []


def test_a_failure_after_the_body_is_received_removes_the_temporary_file(
    api, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Between receiving and storing (here: the dataset limits cannot be built), the route's
    error leaves no temporary file."""
    from app.api.routes import files as files_route

    def broken(settings: object) -> None:
        raise RuntimeError("the settings are gone")

    monkeypatch.setattr(files_route.DatasetLimits, "from_settings", broken)
    response = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("train.jsonl", jsonl(sentiment_rows(20, seed=5)), "text/plain")},
        data={"purpose": "fine-tune"},
    )
    assert_error(response, 500)
    assert list(Storage(api.settings.storage_root).tmp_dir.iterdir()) == []


# ---- the sweep at start-up ----------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process of this machine that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


OWNER = """
import sys, time
from pathlib import Path
from app.core.storage import owned_tmp_file
path, handle = owned_tmp_file(Path(sys.argv[1]), "upload")
handle.write(b"half an upload")
handle.flush()
print(path, flush=True)
time.sleep(120)
"""


@pytest.fixture
def live_owner(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another API process on this machine, in the middle of an upload into the shared
    storage: it holds a temporary file and lives on."""
    tmp_dir = Storage(make_settings(tmp_path / "data").storage_root).tmp_dir
    process = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    path = Path(process.stdout.readline().strip())
    try:
        assert path.is_file(), path
        yield process, path
    finally:
        process.kill()
        process.wait()


def test_starting_keeps_a_live_process_upload_and_sweeps_it_once_its_owner_is_gone(
    tmp_path: Path, live_owner: tuple[subprocess.Popen[str], Path]
) -> None:
    process, path = live_owner
    settings = make_settings(tmp_path / "data")
    create_app(settings)
    assert path.read_bytes() == b"half an upload"  # its owner is alive: untouched
    process.kill()
    process.wait()
    create_app(settings)
    assert not path.exists()


def test_the_sweep_removes_what_no_live_process_owns(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    tmp = Storage(settings.storage_root).tmp_dir
    tmp.mkdir(parents=True)
    here = local_owner_prefix()
    old = time.time() - TMP_MAX_AGE_SECONDS - 60

    def entry(name: str, *, age: float | None = None, folder: bool = False) -> Path:
        path = tmp / name
        if folder:
            path.mkdir()
        else:
            path.write_bytes(b"partial")
        if age is not None:
            os.utime(path, (age, age))
        return path

    gone = entry(f"upload~{here}{dead_pid()}:tmp~abc")
    mine = entry(f"upload~{here}{os.getpid()}:tmp~def")
    elsewhere = entry("upload~another-host:4026531836:12345:tmp~ghi")
    unowned_fresh = entry("upload-xyz")  # a name from before owners were named
    unowned_old = entry("upload-old", age=old)
    elsewhere_old = entry("upload~another-host:4026531836:12345:tmp~jkl", age=old)
    old_folder = entry("leftover", age=old, folder=True)

    assert Storage(settings.storage_root).sweep_tmp() == 4
    assert {p for p in tmp.iterdir()} == {mine, elsewhere, unowned_fresh}
    for path in (gone, unowned_old, elsewhere_old, old_folder):
        assert not path.exists()
