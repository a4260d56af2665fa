"""The error boundary: an unexpected exception is a clean 500 envelope with the request id that
the log names, the connection stays usable, and every response carries ``x-request-id``."""

from __future__ import annotations

import http.client
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import files, keys
from tests.conftest import make_settings
from tests.support import free_port, wait_until

SECRET = "secret-internal-detail-/var/lib/db"


def _explode(*args: object, **kwargs: object) -> None:
    raise RuntimeError(SECRET)


def assert_server_error(status: int, headers: dict[str, str], body: dict) -> str:  # type: ignore[type-arg]
    assert status == 500
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "server_error"
    assert SECRET not in str(body) and "RuntimeError" not in str(body)
    request_id = headers["x-request-id"]
    assert request_id
    return request_id


def logged_with(caplog: pytest.LogCaptureFixture, request_id: str) -> logging.LogRecord:
    records = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    return records[0]


def test_unexpected_exception_is_a_500_envelope_with_the_logged_request_id(
    api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(files, "list_files", _explode)
    with caplog.at_level(logging.ERROR, logger="tunehouse.api"):
        response = api.client.get("/v1/files", headers=api.headers())
    request_id = assert_server_error(response.status_code, response.headers, response.json())
    record = logged_with(caplog, request_id)
    assert record.exc_text and "Traceback" in record.exc_text and SECRET in record.exc_text
    assert "GET /v1/files" in record.getMessage()

    # The same client goes on working.
    monkeypatch.undo()
    after = api.client.get("/v1/files", headers=api.headers())
    assert after.status_code == 200
    assert after.headers["x-request-id"] != request_id


def test_every_response_carries_a_request_id(api) -> None:  # type: ignore[no-untyped-def]
    seen = set()
    for response in (
        api.client.get("/healthz"),
        api.client.get("/v1/files", headers=api.headers()),
        api.client.get("/v1/files"),  # 401
        api.client.get("/v1/files/file-nope", headers=api.headers()),  # 404
        api.client.get("/v1/no-such-route"),
        api.client.get("/v1/fine_tuning/jobs?limit=0", headers=api.headers()),  # 400
    ):
        request_id = response.headers.get("x-request-id")
        assert request_id and request_id.startswith("req_"), response.headers
        seen.add(request_id)
    assert len(seen) == 6


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("trace-1234:abc/DEF", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("", False),
        ("caf\xe9", False),
    ],
)
def test_incoming_request_id_is_honoured_only_when_sane(api, sent: str, kept: bool) -> None:  # type: ignore[no-untyped-def]
    response = api.client.get("/healthz", headers={"X-Request-ID": sent.encode("latin-1")})
    assert response.status_code == 200
    answered = response.headers["x-request-id"]
    if kept:
        assert answered == sent
    else:
        assert answered != sent and answered.startswith("req_")


# ---- over a real keep-alive connection -------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """The app under uvicorn in a thread of this process (so a monkeypatch reaches it)."""
    settings = make_settings(tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30, what="uvicorn to start")
    try:
        yield port, key
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_500_keeps_the_connection_alive(
    served: tuple[int, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port, key = served
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": "client-chosen-id-1"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    monkeypatch.setattr(files, "list_files", _explode)
    with caplog.at_level(logging.ERROR, logger="tunehouse.api"):
        connection.request("GET", "/v1/files", headers=headers)
        response = connection.getresponse()
        body = json.loads(response.read())
    request_id = assert_server_error(response.status, dict(response.headers), body)
    assert request_id == "client-chosen-id-1"
    assert not response.will_close
    assert "Traceback" in (logged_with(caplog, request_id).exc_text or "")
    socket_before = connection.sock

    monkeypatch.undo()
    connection.request("GET", "/v1/files", headers={"Authorization": f"Bearer {key}"})
    second = connection.getresponse()
    assert second.status == 200, second.read()
    second.read()
    # The same socket carried both: the server did not reset the connection after the 500.
    assert connection.sock is socket_before
    connection.close()
