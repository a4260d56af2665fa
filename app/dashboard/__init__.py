"""The dashboard: a single page served at ``/`` by the control role, with its scripts, styles and
the vendored charting library (uPlot) under ``/dashboard/``. Plain files, no build step and
nothing fetched from elsewhere: the page calls the ``/v1`` API with the key a person signs in
with, like any client. None of it is in the OpenAPI document."""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PREFIX = "/dashboard"

# Everything from this origin only: no CDN, no inline script. uPlot sizes its elements through
# style attributes, hence 'unsafe-inline' for styles alone.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class DashboardFiles(StaticFiles):
    """StaticFiles whose answers carry the dashboard's security headers and are revalidated on
    each load (they change with the package, and are small)."""

    def file_response(
        self,
        full_path: PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response


def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


def install(app: FastAPI) -> None:
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False, name="dashboard")
    app.mount(ASSETS_PREFIX, DashboardFiles(directory=STATIC_DIR), name="dashboard_assets")
