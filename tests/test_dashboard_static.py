"""The dashboard's files as the server gives them, without a browser: the page at `/` and every
script, stylesheet and module import it reaches, served from the package by the control role,
nothing from another origin, and none of it in the OpenAPI document."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.dashboard import STATIC_DIR
from app.main import create_app
from tests.conftest import make_settings

# `src="..."`, `href="..."` in the page; `import ... from "./x.js"` in the modules.
PAGE_REFERENCE = re.compile(r'(?:src|href)="(dashboard/[^"]+)"')
MODULE_IMPORT = re.compile(r'^import [^;]*? from "(\.[^"]+)";', re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("dashboard") / "data")
    with TestClient(create_app(settings, role="control")) as client:
        yield client


def test_the_page_and_everything_it_loads_are_served(control: TestClient) -> None:
    page = control.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]

    pending = [f"/{path}" for path in PAGE_REFERENCE.findall(page.text)]
    assert (
        "/dashboard/js/app.js" in pending and "/dashboard/vendor/uplot/uPlot.iife.min.js" in pending
    )
    seen: set[str] = set()
    while pending:  # the page's files, then every module those modules import
        url = pending.pop()
        if url in seen:
            continue
        seen.add(url)
        answer = control.get(url)
        assert answer.status_code == 200, url
        assert answer.headers["x-content-type-options"] == "nosniff"
        if url.endswith(".js"):
            assert "javascript" in answer.headers["content-type"], url
            base = url.rsplit("/", 1)[0]
            for target in MODULE_IMPORT.findall(answer.text):
                pending.append(posixpath.normpath(posixpath.join(base, target)))
    assert {"/dashboard/js/api.js", "/dashboard/js/charts.js", "/dashboard/js/views/job.js"} <= seen


def test_nothing_is_fetched_from_another_origin() -> None:
    for path in STATIC_DIR.rglob("*"):
        if path.is_dir() or "vendor" in path.parts:
            continue
        text = re.sub(r'xmlns="[^"]*"', "", path.read_text())  # a name, not a fetch
        # An absolute or protocol-relative URL would load from elsewhere (or fail offline).
        assert not re.search(r"https?://|[\"'(]//", text), path


def test_the_dashboard_is_not_in_the_openapi_document(control: TestClient) -> None:
    paths = control.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/dashboard")]


def test_the_inference_role_serves_no_dashboard(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path / "data"), role="inference")) as client:
        assert client.get("/").status_code == 404
        assert client.get("/dashboard/js/app.js").status_code == 404
