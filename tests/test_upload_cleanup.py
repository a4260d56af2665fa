"""Upload temporary files never outlive their upload (issue 9, A9). A full disk while the body
is written, or when it is flushed at the end, answers 507 ``disk_full`` and leaves nothing in
storage/tmp; and at start-up an API process sweeps what dead processes left there, but never
another live process's upload (several API processes may share one storage directory)."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.core.process import local_owner_prefix
from app.core.storage import TMP_MAX_AGE_SECONDS, Storage
from app.main import create_app
from tests.conftest import make_settings
from tests.support import ROOT, jsonl, sentiment_rows
from tests.test_bad_input import assert_error, changes_nothing
from tests.test_files_api import upload
from tests.test_uploads import BOUNDARY, Server, multipart, read_response, serving


class FullDisk(io.FileIO):
    """A file on a full disk: every write fails with ENOSPC."""

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files opened in storage/tmp are on a full disk (buffered, as the upload writes them:
    a small body fails when it is flushed at the end, a large one while it is written)."""
    real_fdopen = os.fdopen
    tmp_dir = str(Storage(api.settings.storage_root).tmp_dir)

    def fdopen(fd: int, *args, **kwargs):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(tmp_dir):
            return io.BufferedWriter(FullDisk(fd, "wb"))
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize(
    "rows",
    [20, 4000],
    ids=["fails-at-the-final-flush", "fails-while-writing"],
)
def test_a_full_disk_answers_507_and_leaves_no_temporary_file(api, full_disk, rows: int) -> None:
    content = jsonl(sentiment_rows(rows, seed=5))
    assert (len(content) < io.DEFAULT_BUFFER_SIZE) == (rows == 20)
    tmp = Storage(api.settings.storage_root).tmp_dir
    with changes_nothing(api):
        response = upload(api, content)
        error = assert_error(response, 507, words="disk is full")
    assert (error["type"], error["code"]) == ("server_error", "disk_full")
    assert list(tmp.iterdir()) == []


def test_an_upload_after_the_disk_has_room_again_goes_through(api) -> None:
    response = upload(api, jsonl(sentiment_rows(20, seed=5)), content_type="text/plain")
    assert response.status_code == 200, response.text
    assert list(Storage(api.settings.storage_root).tmp_dir.iterdir()) == []


def test_a_failure_after_the_body_is_received_removes_the_temporary_file(
    api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between receiving and storing (here: the dataset limits cannot be built), the route's
    error leaves no temporary file."""
    from app.api.routes import files as files_route

    def broken(settings: object) -> None:
        raise RuntimeError("the settings are gone")

    monkeypatch.setattr(files_route.DatasetLimits, "from_settings", broken)
    response = upload(api, jsonl(sentiment_rows(20, seed=5)), content_type="text/plain")
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


# ---- concurrent uploads on one storage -----------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with serving(make_settings(tmp_path / "data")) as running:
        yield running


def test_another_process_starting_mid_upload_leaves_the_upload_alone(server: Server) -> None:
    """A second API process starts on the same storage while an upload is half received: its
    sweep keeps the upload's temporary file, and the upload completes."""
    content = jsonl(sentiment_rows(40, seed=6))
    payload = multipart(content, b"train.jsonl")
    head = server.request_head(f"Content-Length: {len(payload)}\r\n")
    tmp = Storage(server.settings.storage_root).tmp_dir
    half = len(payload) // 2
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + payload[:half])
        deadline = time.monotonic() + 30
        while not list(tmp.iterdir()):
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.05)
        env = {**os.environ, "TUNEHOUSE_DATA_DIR": str(server.settings.data_dir)}
        started = subprocess.run(
            [sys.executable, "-c", "from app.main import create_app; create_app()"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr[-2000:]
        assert len(list(tmp.iterdir())) == 1
        sock.sendall(payload[half:])
        status, body = read_response(sock)
    assert status == 200, body
    assert body["bytes"] == len(content)
    assert list(tmp.iterdir()) == []


def test_concurrent_uploads_good_and_bad_leave_nothing_in_tmp(server: Server) -> None:
    """Twelve clients at once: good files, bad datasets, forms with too many fields, bodies cut
    off mid-file. The good ones are stored; nothing else is left anywhere."""
    good = jsonl(sentiment_rows(30, seed=7))
    bad = good + b'{"text": "x", "label": ' + b"[" * 1000 + b"\n"
    too_many = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'.encode()
        for i in range(40)
    ) + multipart(good, b"t.jsonl")

    def send(kind: str) -> int:
        payload = {
            "good": multipart(good, b"t.jsonl"),
            "bad": multipart(bad, b"t.jsonl"),
            "fields": too_many,
            "cut": multipart(good, b"t.jsonl")[:-200],
        }[kind]
        if kind == "cut":  # the client leaves before the body ends
            head = server.request_head(f"Content-Length: {len(payload) + 200}\r\n")
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(head + payload)
            return 0
        head = server.request_head(f"Content-Length: {len(payload)}\r\n")
        status, _, _ = server.send(head, iter([payload]))
        return status

    kinds = ["good", "bad", "fields", "cut"] * 3
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        statuses = list(pool.map(send, kinds))
    assert statuses == [200, 400, 400, 0] * 3
    tmp = Storage(server.settings.storage_root).tmp_dir
    deadline = time.monotonic() + 30  # the cut-off bodies end when the server sees them go
    while list(tmp.iterdir()):
        assert time.monotonic() < deadline, list(tmp.iterdir())
        time.sleep(0.1)
    stored = list((server.settings.storage_root / "files").iterdir())
    assert len(stored) == 3
