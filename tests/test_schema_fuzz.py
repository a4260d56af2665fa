"""Schemathesis against the app's own OpenAPI document: every operation, called with a valid API
key and generated input, never answers 5xx, never answers a status its document leaves out, and
always answers in the shape (and content type) its document gives."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import keys
from tests.conftest import make_settings

EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CALLS: Counter[str] = Counter()


# The schema is read when this module is collected, so the app is built then (that only makes
# folders under a temporary directory); the database and the key are made when the test runs.
# (schemathesis.pytest.from_fixture would defer all of it, but it does not run on pytest 9.)
DATA_DIR = Path(tempfile.mkdtemp(prefix="tunehouse-fuzz-"))
# A generous rate limit: the limiter runs, yet never refuses the fuzzer (429 is documented).
APP_SETTINGS = make_settings(DATA_DIR / "data", rate_limit_per_minute=1_000_000)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(APP_SETTINGS))


@pytest.fixture(scope="module")
def api_key() -> Iterator[str]:
    """The key of the one organization the fuzzer acts for."""
    upgrade(APP_SETTINGS.sqlalchemy_url)
    with session_scope(APP_SETTINGS.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-fuzz").key
    yield key
    # How much ran: the figure for the note (shown with `pytest -s`).
    print(f"\nschemathesis: {len(CALLS)} operations, {sum(CALLS.values())} requests")
    for operation, count in sorted(CALLS.items()):
        print(f"  {count:5d}  {operation}")
    shutil.rmtree(DATA_DIR, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_keeps_its_documented_contract(
    case: schemathesis.Case, api_key: str
) -> None:
    CALLS[case.operation.label] += 1
    case.call_and_validate(headers={"Authorization": f"Bearer {api_key}"}, checks=CHECKS)
