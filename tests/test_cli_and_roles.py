"""The CLI as a user runs it, and the app's roles."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import make_settings
from tests.stacks import base_env
from tests.support import Stack, jsonl, sentiment_rows, tunehouse


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    tunehouse("migrate", env=env)
    key = tunehouse("keys", "create", "--organization", "acme", env=env).stdout.strip()
    assert key.startswith("sk-th-") and len(key) > 40

    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/files", headers=headers).status_code == 200

        listing = tunehouse("keys", "list", "--organization", "acme", env=env).stdout
        assert key[:12] in listing and key not in listing  # the prefix only, never the key
        key_id = next(word for word in listing.split() if word.startswith("key-"))
        tunehouse("keys", "revoke", key_id, env=env)

        refused = client.get("/v1/files", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"


def test_inference_role_serves_inference_routes_only(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path / "data"), role="inference")) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/predictions" in paths and "/v1/models" in paths
    assert "/v1/files" not in paths and "/v1/fine_tuning/jobs" not in paths


def test_control_role_has_no_inference_routes(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path / "data"), role="control")) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/fine_tuning/jobs" in paths and "/v1/predictions" not in paths


# (command, role) -> the route it must not serve, and one it must.
REPLICAS = {
    ("api", "inference"): ("/v1/files", "/v1/predictions"),
    ("serve", "inference"): ("/v1/fine_tuning/jobs", "/v1/chat/completions"),
    ("api", "control"): ("/v1/predictions", "/v1/files"),
}


def test_role_option_of_the_real_cli_decides_the_routes(tmp_path: Path) -> None:
    """`tunehouse api|serve --role R` as a user starts it: each replica serves its role's
    routes only (a route of the other role is an unknown URL, 404)."""
    env = base_env(tmp_path / "data")
    tunehouse("migrate", env=env)
    key = tunehouse("keys", "create", env=env).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    stacks = {}
    try:
        for (command, role), _ in REPLICAS.items():  # started together: they boot in parallel
            stack = Stack(f"{command}-{role}", env, tmp_path)
            stack.start(command, "--role", role, "--port", str(stack.port), log=stack.name)
            stacks[(command, role)] = stack
        for (command, role), (absent, present) in REPLICAS.items():
            stack = stacks[(command, role)]
            stack.wait_ready(timeout=90)
            method = "POST" if absent in ("/v1/predictions", "/v1/chat/completions") else "GET"
            missing = httpx.request(method, stack.base_url + absent, headers=headers, json={})
            assert missing.status_code == 404, (command, role, absent, missing.text)
            assert missing.json()["error"]["type"] == "not_found_error"
            served = httpx.get(f"{stack.base_url}/openapi.json").json()["paths"]
            assert present in served and absent not in served, (command, role)
    except BaseException:
        print(next(iter(stacks.values())).logs())  # every replica's log is in tmp_path
        raise
    finally:
        for stack in stacks.values():
            stack.stop()


def test_event_stream_follows_the_job_to_its_end(api) -> None:
    file = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("t.jsonl", jsonl(sentiment_rows(20, seed=0)))},
        data={"purpose": "fine-tune"},
    ).json()
    job = api.client.post(
        "/v1/fine_tuning/jobs",
        headers=api.headers(),
        json={"model": "sentence-transformers/all-MiniLM-L6-v2", "training_file": file["id"]},
    ).json()
    api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=api.headers())
    with api.client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", headers=api.headers()
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    messages = [json.loads(line[len("data: ") :])["message"] for line in lines[:-1]]
    assert messages[0].startswith("Created fine-tuning job")  # oldest first, as they happened
    assert messages[-1] == "Fine-tuning job cancelled"


def test_readyz_reports_an_unreachable_broker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("error")


def test_an_idle_connection_outlives_the_clients_keep_alive(tmp_path: Path) -> None:
    """The server keeps an idle connection longer than httpx and the SDK keep theirs (5 s), so
    a request a client sends on its pooled connection never meets a server closing it (before,
    uvicorn's 5 s made that a race the soak test saw as a connection reset)."""
    env = {**base_env(tmp_path / "data"), "TUNEHOUSE_KEEP_ALIVE_SECONDS": "8"}
    tunehouse("migrate", env=env)
    stack = Stack("api", env, tmp_path)
    stack.start("api", "--port", str(stack.port), log="api")
    try:
        stack.wait_ready(timeout=90)
        connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        try:
            pooled = None
            for idle in (5.5, 5.5, 0):  # idle past the client's keep-alive, twice
                connection.request("GET", "/healthz")
                answer = connection.getresponse()  # RemoteDisconnected if the server closed it
                assert answer.status == 200 and answer.read() == b'{"status":"ok"}'
                assert pooled in (None, connection.sock), "one connection throughout"
                pooled = connection.sock
                time.sleep(idle)
            assert pooled is not None
            pooled.settimeout(15)
            assert pooled.recv(1) == b"", "past the server's 8 s, it closes the connection"
        finally:
            connection.close()
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
