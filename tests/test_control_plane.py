"""The control plane stays small: importing the API never loads torch or transformers."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys, app.main\n"
        "app.main.create_app()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"TUNEHOUSE_DATA_DIR": str(ROOT / ".pytest_cache" / "cp-data"), "PATH": "/usr/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_healthz_readyz_metrics(api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    api.client.get("/v1/models", headers=api.headers())
    metrics = api.client.get("/metrics")
    assert metrics.status_code == 200
    assert (
        'tunehouse_http_requests_total{method="GET",route="list_models",status="200"}'
        in metrics.text
    )
