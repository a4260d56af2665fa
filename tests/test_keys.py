"""API keys as a user manages them: the admin route under /v1/organization/api_keys, the
`tunehouse keys` commands, revocation that takes effect at once, and keys kept out of logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.cli import cli
from app.core.db import session_scope
from app.main import create_app
from app.models import ApiKey
from app.services import keys
from tests.conftest import make_settings
from tests.test_bad_input import assert_error

ROUTE = "/v1/organization/api_keys"
KEY_FIELDS = {
    "object", "id", "name", "redacted_value", "created_at", "last_used_at", "revoked_at",
    "admin", "organization_id",
}  # fmt: skip


def admin_key(api, organization: str = "org-a") -> str:
    with session_scope(api.settings.sqlalchemy_url) as session:
        return keys.create_key(session, organization, name="admin", admin=True).key


def key_count(api) -> int:
    with session_scope(api.settings.sqlalchemy_url) as session:
        return int(session.scalar(select(func.count()).select_from(ApiKey)) or 0)


def test_admin_creates_a_key_shown_once_that_works_at_once(api) -> None:
    admin = api.headers(admin_key(api))
    created = api.client.post(ROUTE, headers=admin, json={"name": "ci"})
    assert created.status_code == 200, created.text
    body = created.json()
    assert set(body) == KEY_FIELDS | {"value"}
    new_key = body["value"]
    assert new_key.startswith(keys.KEY_PREFIX) and len(new_key) > 40
    assert body["object"] == "organization.api_key" and body["name"] == "ci"
    assert body["admin"] is False and body["revoked_at"] is None
    assert body["redacted_value"] == new_key[: keys.PREFIX_LENGTH] + "…"

    files = api.client.get("/v1/files", headers=api.headers(new_key))
    assert files.status_code == 200

    listed = api.client.get(ROUTE, headers=admin)
    assert listed.status_code == 200
    assert new_key not in listed.text  # shown once: never in a listing
    entry = next(k for k in listed.json()["data"] if k["id"] == body["id"])
    assert set(entry) == KEY_FIELDS
    assert entry["redacted_value"] == body["redacted_value"]
    assert entry["last_used_at"] is not None  # it was used for /v1/files above
    retrieved = api.client.get(f"{ROUTE}/{body['id']}", headers=admin).json()
    assert retrieved == entry


def test_revoked_key_is_refused_from_the_next_request(api) -> None:
    admin = api.headers(admin_key(api))
    created = api.client.post(ROUTE, headers=admin, json={}).json()
    victim = api.headers(created["value"])
    assert api.client.get("/v1/files", headers=victim).status_code == 200

    revoked = api.client.delete(f"{ROUTE}/{created['id']}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {
        "id": created["id"],
        "object": "organization.api_key.deleted",
        "deleted": True,
    }
    error = assert_error(api.client.get("/v1/files", headers=victim), 401)
    assert error["code"] == "invalid_api_key"
    listed = api.client.get(f"{ROUTE}/{created['id']}", headers=admin).json()
    assert listed["revoked_at"] is not None
    # Revoking again changes nothing and still answers as deleted.
    again = api.client.delete(f"{ROUTE}/{created['id']}", headers=admin)
    assert again.status_code == 200 and again.json()["deleted"] is True


def test_an_admin_key_can_make_another_admin_key(api) -> None:
    admin = api.headers(admin_key(api))
    created = api.client.post(ROUTE, headers=admin, json={"admin": True}).json()
    assert created["admin"] is True
    second = api.client.get(ROUTE, headers=api.headers(created["value"]))
    assert second.status_code == 200
    assert created["id"] in [k["id"] for k in second.json()["data"]]


def test_a_plain_key_gets_403_and_changes_nothing(api) -> None:
    before = key_count(api)
    with session_scope(api.settings.sqlalchemy_url) as session:
        other_id = session.scalar(select(ApiKey.id).where(ApiKey.admin.is_(False)))
    plain = api.headers()
    for response in (
        api.client.post(ROUTE, headers=plain, json={"name": "sneaky"}),
        api.client.get(ROUTE, headers=plain),
        api.client.get(f"{ROUTE}/{other_id}", headers=plain),
        api.client.delete(f"{ROUTE}/{other_id}", headers=plain),
    ):
        error = assert_error(response, 403, words="admin")
        assert error["code"] == "admin_key_required" and error["type"] == "permission_error"
    assert key_count(api) == before
    assert api.client.get("/v1/files", headers=plain).status_code == 200  # not revoked


def test_admin_acts_only_within_its_organization(api) -> None:
    admin_a, admin_b = api.headers(admin_key(api, "org-a")), api.headers(admin_key(api, "org-b"))
    theirs = api.client.post(ROUTE, headers=admin_a, json={"name": "a's"}).json()
    listed_by_b = api.client.get(ROUTE, headers=admin_b).json()["data"]
    assert theirs["id"] not in [k["id"] for k in listed_by_b]
    assert {k["organization_id"] for k in listed_by_b} == {listed_by_b[0]["organization_id"]}
    for response in (
        api.client.get(f"{ROUTE}/{theirs['id']}", headers=admin_b),
        api.client.delete(f"{ROUTE}/{theirs['id']}", headers=admin_b),
    ):
        assert_error(response, 404, words=theirs["id"])
    assert api.client.get("/v1/files", headers=api.headers(theirs["value"])).status_code == 200


def test_bad_create_is_a_400_and_stores_nothing(api) -> None:
    admin = api.headers(admin_key(api))
    before = key_count(api)
    assert_error(api.client.post(ROUTE, headers=admin, json={"name": "x" * 200}), 400, param="name")
    assert_error(api.client.post(ROUTE, headers=admin, json={"admin": "maybe"}), 400, param="admin")
    assert key_count(api) == before


def test_keys_never_reach_the_logs(api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    admin_value = admin_key(api)
    admin = api.headers(admin_value)
    created = api.client.post(ROUTE, headers=admin, json={"name": "logged"}).json()
    new_key = created["value"]
    api.client.get("/v1/files", headers=api.headers(new_key))
    api.client.get(ROUTE, headers=admin)
    api.client.delete(f"{ROUTE}/{created['id']}", headers=admin)
    api.client.get("/v1/files", headers=api.headers(new_key))  # refused: revoked
    api.client.get("/v1/files", headers=api.headers(new_key + "x"))  # refused: wrong

    logged = caplog.text
    # The flow was logged (by key id), so this checks real log lines, not an empty capture.
    assert f"created key {created['id']}" in logged and f"revoked key {created['id']}" in logged
    for secret in (new_key, admin_value, api.key_a, api.key_b):
        assert secret not in logged
        assert secret[keys.PREFIX_LENGTH :] not in logged


def test_cli_create_list_revoke_within_an_organization(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"TUNEHOUSE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, list(args), env=env)
        assert result.exit_code == code, result.output
        return result.stdout

    admin = run("keys", "create", "--organization", "acme", "--admin", "--name", "ops")
    admin = admin.splitlines()[0].strip()
    plain = run("keys", "create", "--organization", "other").splitlines()[0].strip()
    assert admin.startswith(keys.KEY_PREFIX) and plain.startswith(keys.KEY_PREFIX)

    listing = run("keys", "list")
    for key, org in ((admin, "acme"), (plain, "other")):
        assert key not in listing and key[keys.PREFIX_LENGTH :] not in listing
        line = next(row for row in listing.splitlines() if key[: keys.PREFIX_LENGTH] in row)
        assert org in line
    admin_row = next(row for row in listing.splitlines() if admin[: keys.PREFIX_LENGTH] in row)
    assert "ops" in admin_row and "yes" in admin_row
    only_acme = run("keys", "list", "--organization", "acme")
    assert plain[: keys.PREFIX_LENGTH] not in only_acme

    plain_id = next(
        w for w in listing.split() if w.startswith("key-") and w in _row(listing, plain)
    )
    # --organization scopes the revocation: a key of another organization is left alone.
    assert "No active key" in run("keys", "revoke", plain_id, "--organization", "acme", code=1)
    assert api_key_works(tmp_path, plain)
    run("keys", "revoke", plain_id, "--organization", "other")
    assert not api_key_works(tmp_path, plain)
    revoked_row = _row(run("keys", "list", "--organization", "other"), plain)
    assert revoked_row.count("20") >= 2  # created and revoked timestamps


def api_key_works(tmp_path: Path, key: str) -> bool:
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        status = client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code
    assert status in (200, 401)
    return status == 200


def _row(listing: str, key: str) -> str:
    return next(row for row in listing.splitlines() if key[: keys.PREFIX_LENGTH] in row)
