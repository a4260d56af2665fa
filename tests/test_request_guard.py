"""Bodies are read only after authentication, and within bounds (app/api/guard.py): a request
without a valid key is refused before one byte of its body is taken, a JSON body over
max_json_body_bytes is a 413 envelope (declared or counted), and a body that stops arriving is
answered with 408 within request_body_timeout_seconds and its connection closed."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.services import keys
from tests.conftest import make_settings
from tests.served import served
from tests.test_bad_input import assert_error

JSON_LIMIT = 64 * 1024
HUGE = 64 * 1024 * 1024  # what a client offers to send
CHUNK = 64 * 1024
BODY_TIMEOUT = 1.0


@dataclass
class Guarded:
    settings: Settings
    key: str


@pytest.fixture
def guarded(tmp_path: Path) -> Guarded:
    settings = make_settings(
        tmp_path / "data",
        max_json_body_bytes=JSON_LIMIT,
        request_body_timeout_seconds=BODY_TIMEOUT,
    )
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    return Guarded(settings, key)


class CountedBody:
    """A request body made as the app asks for it; ``taken`` counts the bytes it took."""

    def __init__(self, size: int, piece: bytes = b" ") -> None:
        self.size, self.piece, self.taken = size, piece * CHUNK, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.taken < self.size:
            chunk = self.piece[: self.size - self.taken]
            self.taken += len(chunk)
            yield chunk


def post_in_process(
    settings: Settings, path: str, body: CountedBody | bytes, headers: dict[str, str]
) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=body, headers=headers)

    return asyncio.run(post())


JSON = {"Content-Type": "application/json"}
ROUTES = ["/v1/fine_tuning/jobs", "/v1/predictions", "/v1/files", "/v1/organization/api_keys"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer sk-th-not-a-key", "Basic abc"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_no_valid_key_is_a_401_before_any_body_byte(
    guarded: Guarded, path: str, authorization: str | None, declared: bool
) -> None:
    body = CountedBody(HUGE)
    headers = dict(JSON)
    if authorization:
        headers["Authorization"] = authorization
    if declared:
        headers["Content-Length"] = str(HUGE)
    response = post_in_process(guarded.settings, path, body, headers)
    assert body.taken == 0
    assert_error(response, 401)
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["connection"] == "close"  # the unread body ends the connection


def test_a_json_body_declared_over_the_limit_is_a_413_unread(guarded: Guarded) -> None:
    body = CountedBody(JSON_LIMIT + 1)
    headers = {**JSON, "Authorization": f"Bearer {guarded.key}", "Content-Length": str(body.size)}
    response = post_in_process(guarded.settings, "/v1/fine_tuning/jobs", body, headers)
    assert body.taken == 0
    error = assert_error(response, 413, words=str(JSON_LIMIT))
    assert error["code"] == "request_too_large" and error["type"] == "request_too_large"
    assert "max_json_body_bytes" in error["message"]


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/predictions", "/v1/embeddings"])
def test_a_chunked_json_body_over_the_limit_is_a_413_once_counted(
    guarded: Guarded, path: str
) -> None:
    body = CountedBody(HUGE)
    headers = {**JSON, "Authorization": f"Bearer {guarded.key}"}
    response = post_in_process(guarded.settings, path, body, headers)
    assert body.taken <= JSON_LIMIT + CHUNK  # read up to the limit, and no further
    error = assert_error(response, 413, words=str(JSON_LIMIT))
    assert error["code"] == "request_too_large"
    assert response.headers["connection"] == "close"


def test_a_json_body_within_the_limit_is_served(guarded: Guarded) -> None:
    # Padded with spaces to just under the limit; the route answers as usual (unknown file).
    request = json.dumps({"model": "sentence-transformers/all-MiniLM-L6-v2", "training_file": "f"})
    padded = request.encode().ljust(JSON_LIMIT, b" ")
    headers = {**JSON, "Authorization": f"Bearer {guarded.key}"}
    response = post_in_process(guarded.settings, "/v1/fine_tuning/jobs", padded, headers)
    assert_error(response, 400, param="training_file")


# ---- a body that stops arriving, against a real server ------------------------------------------

BOUNDARY = "guard-boundary"
STALLED_BODIES = {
    "json": (
        "/v1/fine_tuning/jobs",
        "application/json",
        b'{"model": "sentence-transformers/all-MiniLM-L6-v2", "training',
    ),
    "upload": (
        "/v1/files",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
        '\r\n{"text": "a lovely film", "label": "pos'.encode(),
    ),
}


@pytest.fixture
def base_url(guarded: Guarded) -> Iterator[str]:
    with served(create_app(guarded.settings)) as url:
        yield url


@pytest.mark.parametrize("kind", list(STALLED_BODIES))
def test_a_body_shorter_than_its_content_length_is_a_408(
    guarded: Guarded, base_url: str, kind: str
) -> None:
    path, content_type, sent = STALLED_BODIES[kind]
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {guarded.key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(sent) + 1000}\r\n\r\n".encode()
            + sent
        )
        # Then nothing: the server answers within the body timeout (not never), and closes.
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_body_timeout"
    assert "request_body_timeout_seconds" in error["message"]
    # Nothing was kept of the stalled upload.
    tmp = guarded.settings.storage_root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
    listed = httpx.get(f"{base_url}/v1/files", headers={"Authorization": f"Bearer {guarded.key}"})
    assert listed.json()["data"] == []
