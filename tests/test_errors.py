"""The error boundary: an unexpected exception is a clean 500 envelope with the request id that
the log names, the connection stays usable, and every response carries ``x-request-id``."""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def assert_server_error(status: int, headers: dict[str, str], body: dict) -> str:
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
) -> None:
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


def test_every_response_carries_a_request_id(api) -> None:
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
def test_incoming_request_id_is_honoured_only_when_sane(api, sent: str, kept: bool) -> None:
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


# ---- request bounds ------------------------------------------------------------------------------

TOO_MANY_KEYS = {f"k{i}": "v" for i in range(17)}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "learning_rate_multiplier"),
        ({"hyperparameters": {"eval_every_steps": 10**7}}, "hyperparameters.eval_every_steps"),
        ({"hyperparameters": {"max_grad_norm": 1e6}}, "hyperparameters.max_grad_norm"),
        ({"suffix": ""}, "suffix"),
        ({"suffix": "s" * 65}, "suffix"),
        ({"metadata": TOO_MANY_KEYS}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"seed": -1}, "seed"),
    ],
)
def test_job_create_bounds(api, body: dict, param: str) -> None:
    request = {"model": "sentence-transformers/all-MiniLM-L6-v2", "training_file": "file-x", **body}
    response = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=request)
    assert_bad_request(response, param)
    listed = api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()
    assert listed["data"] == []


@pytest.mark.parametrize(
    ("url", "param"),
    [
        ("/v1/fine_tuning/jobs?limit=0", "limit"),
        ("/v1/fine_tuning/jobs?limit=101", "limit"),
        ("/v1/fine_tuning/jobs/ftjob-x/events?limit=101", "limit"),
        ("/v1/fine_tuning/jobs/ftjob-x/checkpoints?limit=0", "limit"),
        ("/v1/fine_tuning/jobs?after=" + "a" * 65, "after"),
        ("/v1/fine_tuning/jobs?" + "&".join(f"metadata[{k}]=v" for k in TOO_MANY_KEYS), "metadata"),
        ("/v1/fine_tuning/jobs?metadata[" + "k" * 65 + "]=v", "metadata"),
        ("/v1/files?limit=0", "limit"),
        ("/v1/files?limit=10001", "limit"),  # OpenAI's own bound for files
        ("/v1/files?purpose=" + "p" * 65, "purpose"),
        ("/v1/files?after=" + "a" * 65, "after"),
    ],
)
def test_query_bounds(api, url: str, param: str) -> None:
    assert_bad_request(api.client.get(url, headers=api.headers()), param)


CHAT: dict[str, Any] = {"model": "ft:none", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
        ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": CHAT["messages"] * 1025}, "messages"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x" * 100_001}]},
            "messages.0.content",
        ),
        ("/v1/completions", {"model": "ft:none", "prompt": "x" * 100_001}, "prompt"),
        ("/v1/completions", {"model": "ft:none", "prompt": ["p"] * 257}, "prompt"),
        ("/v1/embeddings", {"model": "ft:none", "input": "hi", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"model": "ft:none", "input": ["hi"] * 257}, "input"),
        ("/v1/predictions", {"model": "ft:none", "input": []}, "input"),
        ("/v1/predictions", {"model": "ft:none", "input": ["hi"] * 257}, "input"),
        ("/v1/predictions", {"model": "", "input": "hi"}, "model"),
    ],
)
def test_inference_bounds(api, route: str, body: dict, param: str) -> None:
    assert_bad_request(api.client.post(route, headers=api.headers(), json=body), param)


def test_non_finite_numbers_are_refused(api) -> None:
    # Python's json reads NaN and Infinity; nothing downstream may ever see them.
    for route, content, param in (
        ("/v1/predictions", '{"model": "ft:none", "input": [[1.0, NaN]]}', "input.0.1"),
        (
            "/v1/fine_tuning/jobs",
            '{"model": "m", "training_file": "f", "hyperparameters": {"max_grad_norm": Infinity}}',
            "hyperparameters.max_grad_norm",
        ),
    ):
        headers = {**api.headers(), "Content-Type": "application/json"}
        assert_bad_request(api.client.post(route, headers=headers, content=content), param)


def test_malformed_json_is_a_400(api) -> None:
    headers = {**api.headers(), "Content-Type": "application/json"}
    response = api.client.post("/v1/fine_tuning/jobs", headers=headers, content=b'{"model": ')
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def assert_bad_request(response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and param in error["param"], error
    assert response.headers["x-request-id"]


# ---- 405 ---------------------------------------------------------------------------------------

_DOCUMENTED_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def test_every_path_answers_an_undeclared_method_with_405_and_allow(api) -> None:
    """RFC 9110: a 405 names the methods the resource does support, in ``Allow``."""
    paths = api.client.get("/openapi.json").json()["paths"]
    assert len(paths) > 20
    for template, operations in paths.items():
        url = re.sub(r"\{[^}]+\}", "x", template)
        declared = {m.upper() for m in operations if m in _DOCUMENTED_METHODS}
        response = api.client.request("TRACE", url, headers=api.headers())
        assert response.status_code == 405, (url, response.text)
        assert_envelope(response.json())
        allow = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
        # HEAD comes with GET on Starlette's own routes (the document and docs pages).
        assert allow - {"HEAD"} == declared, (url, response.headers.get("allow"))


def assert_envelope(body: dict) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
