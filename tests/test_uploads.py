"""Uploads: an oversized body is refused with 413 before it is read (proved against a real
uvicorn server, counting the bytes the client got to send), no temporary file is left behind,
and a client's filename is a label only, never a path."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.services import keys
from tests.conftest import make_settings
from tests.support import as_dict, free_port, jsonl, sentiment_rows
from tests.test_files_api import upload

LIMIT = 64 * 1024  # the server's max_upload_bytes in these tests
STREAMED = 50 * 1024 * 1024  # what a client offers to send
CHUNK = 64 * 1024
BOUNDARY = "tunehouse-test-boundary"


def storage_tree(settings: Settings) -> dict[str, int]:
    """Every file under the storage root (uploads and their temporary spool) and its size."""
    root = settings.storage_root
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def form_head(filename: bytes = b"train.jsonl") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        f"fine-tune\r\n--{BOUNDARY}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )


def form_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart(content: bytes, filename: bytes) -> bytes:
    return form_head(filename) + content + form_tail()


# ---- a real server ------------------------------------------------------------------------------


class Server:
    def __init__(self, settings: Settings, key: str):
        self.settings, self.key = settings, key
        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def request_head(self, extra: str) -> bytes:
        return (
            f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{extra}\r\n"
        ).encode()

    def send(self, head: bytes, body: Iterator[bytes]) -> tuple[int, dict[str, object], int]:
        """Send ``head``, then the body's chunks until the server answers (or the body ends);
        returns the status, the JSON body, and how many body bytes were sent."""
        sent = 0
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            # A small send buffer, so that bytes counted as sent are close to bytes taken.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)
            sock.sendall(head)
            # poll, not select: select refuses descriptors past 1023.
            answered = select.poll()
            answered.register(sock, select.POLLIN)
            for chunk in body:
                if answered.poll(0):
                    break
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(chunk)
            return (*read_response(sock), sent)


def read_response(sock: socket.socket) -> tuple[int, dict[str, object]]:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed before a response: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int({k.lower(): v for k, v in headers.items()}["content-length"])
    while len(body) < length:
        part = sock.recv(65536)
        assert part, "connection closed in the middle of the response"
        body += part
    return status, json.loads(body[:length])


@contextmanager
def serving(settings: Settings) -> Iterator[Server]:
    """The app of ``settings`` served over real HTTP, on a migrated database with one
    organization's key."""
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    with Server(settings, key) as running:
        yield running


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with serving(make_settings(tmp_path / "data", max_upload_bytes=LIMIT)) as running:
        yield running


def assert_too_large(status: int, body: dict[str, object]) -> None:
    assert status == 413, body
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "request_too_large"
    assert error["param"] == "file"
    assert error["code"] == "file_too_large"
    assert str(LIMIT) in str(error["message"])
    assert "max_upload_bytes" in str(error["message"])


def test_declared_size_over_the_limit_is_refused_before_any_body_byte(server: Server) -> None:
    before = storage_tree(server.settings)
    head = server.request_head(f"Content-Length: {STREAMED}\r\n")
    status, body, sent = server.send(head, iter(()))  # the body is never sent at all
    assert_too_large(status, body)
    assert sent == 0
    assert str(STREAMED) in str(as_dict(body["error"])["message"])
    assert storage_tree(server.settings) == before


def test_chunked_body_is_refused_once_it_passes_the_limit(server: Server) -> None:
    def chunked_body() -> Iterator[bytes]:
        def frame(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        yield frame(form_head())
        line = b'{"text": "the movie was great", "label": "positive"}\n'
        piece = line * (CHUNK // len(line))
        for _ in range(STREAMED // len(piece)):
            yield frame(piece)
        yield frame(form_tail()) + b"0\r\n\r\n"

    before = storage_tree(server.settings)
    head = server.request_head("Transfer-Encoding: chunked\r\n")
    status, body, sent = server.send(head, chunked_body())
    assert_too_large(status, body)
    # The answer came long before the 50 MiB were sent: after the limit (64 KiB) plus what
    # the socket buffers on both sides hold.
    assert LIMIT < sent < 8 * 1024 * 1024, sent
    assert storage_tree(server.settings) == before


def test_upload_within_the_limit_goes_through_a_real_server(server: Server) -> None:
    content = jsonl(sentiment_rows(20, seed=1))
    assert len(content) < LIMIT
    payload = multipart(content, b"train.jsonl")
    head = server.request_head(f"Content-Length: {len(payload)}\r\n")
    status, body, sent = server.send(head, iter([payload]))
    assert status == 200, body
    assert sent == len(payload)
    assert body["bytes"] == len(content)
    # The file sits under its id; nothing is left in the temporary folder.
    assert storage_tree(server.settings) == {f"files/{body['id']}": len(content)}


# ---- filenames are labels -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        (b"../../x", "../../x"),
        (b"/etc/passwd", "/etc/passwd"),
        (b"a\x00b", "ab"),
        (b"tab\there.jsonl", "tabhere.jsonl"),
        (b"n" * 1000, "n" * 255),
        (b"", "upload"),
        ("données/../ü.jsonl".encode(), "données/../ü.jsonl"),
    ],
)
def test_a_client_filename_is_only_a_label(api, tmp_path: Path, raw: bytes, label: str) -> None:
    def everything() -> set[str]:
        # All files under the test's folder but the database's own.
        return {
            str(p.relative_to(tmp_path))
            for p in tmp_path.rglob("*")
            if p.is_file() and not p.name.startswith("tunehouse.db")
        }

    before = everything()
    content = jsonl(sentiment_rows(20, seed=2))
    headers = {**api.headers(), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    response = api.client.post("/v1/files", headers=headers, content=multipart(content, raw))
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["filename"] == label
    # Stored under the server's id, and nowhere else.
    storage = api.settings.storage_root.relative_to(tmp_path)
    assert everything() - before == {f"{storage}/files/{file['id']}"}
    assert api.client.get(f"/v1/files/{file['id']}", headers=api.headers()).json() == file
    download = api.client.get(f"/v1/files/{file['id']}/content", headers=api.headers())
    assert download.status_code == 200
    assert download.content == content


def test_a_filename_over_the_part_header_limit_is_refused(api) -> None:
    before = storage_tree(api.settings)
    headers = {**api.headers(), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    content = multipart(jsonl(sentiment_rows(20, seed=2)), b"n" * 5000)
    response = api.client.post("/v1/files", headers=headers, content=content)
    assert response.status_code == 400
    assert "header size" in response.json()["error"]["message"]
    assert storage_tree(api.settings) == before


# ---- what is not the file is bounded too --------------------------------------------------------


def chunk_frame(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_hundred_thousand_fields_without_a_content_length_are_refused_early(
    server: Server,
) -> None:
    """100,000 form fields in a chunked body (27 MB) were all kept in memory, and the upload
    then succeeded. The 17th field is refused, long before the rest is sent."""
    fields = 100_000

    def many_fields() -> Iterator[bytes]:
        value = "v" * 200
        for start in range(0, fields, 500):
            parts = "".join(
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="field{i}"\r\n\r\n'
                f"{value}\r\n"
                for i in range(start, start + 500)
            )
            yield chunk_frame(parts.encode())
        content = jsonl(sentiment_rows(20, seed=1))
        yield chunk_frame(multipart(content, b"train.jsonl")) + b"0\r\n\r\n"

    before = storage_tree(server.settings)
    head = server.request_head("Transfer-Encoding: chunked\r\n")
    status, body, sent = server.send(head, many_fields())
    assert status == 400, body
    error = body["error"]
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert "more than 16 fields" in str(error["message"])
    assert sent < 8 * 1024 * 1024, sent  # of about 27 MB offered
    assert storage_tree(server.settings) == before


def test_a_huge_epilogue_without_a_content_length_is_refused_early(server: Server) -> None:
    """Bytes after the last boundary are not the file either (the parser skips them, so
    without a bound the server read them for as long as a client sent them): a body without a
    Content-Length holds at most FORM_OVERHEAD_BYTES (64 KiB) besides its file."""

    def form_then_epilogue() -> Iterator[bytes]:
        yield chunk_frame(multipart(jsonl(sentiment_rows(20, seed=1)), b"t.jsonl"))
        junk = b"x" * CHUNK
        for _ in range(STREAMED // CHUNK):
            yield chunk_frame(junk)
        yield b"0\r\n\r\n"

    before = storage_tree(server.settings)
    head = server.request_head("Transfer-Encoding: chunked\r\n")
    status, body, sent = server.send(head, form_then_epilogue())
    assert status == 413, body
    error = body["error"]
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("request_too_large", "form_too_large")
    assert "65536" in str(error["message"])
    assert sent < 8 * 1024 * 1024, sent  # of 50 MiB offered
    assert storage_tree(server.settings) == before


def test_a_few_fields_are_fine(api) -> None:
    extras = {f"extra{i}": "x" for i in range(15)}
    content = jsonl(sentiment_rows(20, seed=4))
    response = upload(api, content, "t.jsonl", content_type="application/json", **extras)
    assert response.status_code == 200, response.text
