"""The smoke check of an installed Tunehouse: the Docker image runs it at build time (as the
user the image runs as) and tests/test_deploy.py runs it the same way, as a script. It needs
the package alone (not the tests), no network and no server: on SQLite and the filesystem
broker in a temporary data directory, in-process,

- `tunehouse --help` runs (the console script is installed);
- the control role answers /healthz and /readyz and imports no torch;
- the inference role embeds a sentence with the packaged base model (torch, transformers and
  the weights are there and work);
- the training side imports (the worker's trainer and its libraries).

It ignores every TUNEHOUSE_* variable, so it may run inside a deployment too:

    python tests/smoke.py
    docker compose run --rm api python /opt/tunehouse/smoke.py
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check(condition: object, what: str) -> None:
    if not condition:
        raise SystemExit(f"smoke check failed: {what}")


def main() -> None:
    # Its own settings alone: run inside a deployment, it must not touch that deployment's
    # database, broker or storage.
    for name in [name for name in os.environ if name.startswith("TUNEHOUSE_")]:
        del os.environ[name]
    # The console script sits next to this interpreter (a venv's bin/, the image's /opt/venv).
    cli = Path(sys.executable).parent / "tunehouse"
    shown = subprocess.run([cli, "--help"], capture_output=True, text=True, timeout=60)
    check(shown.returncode == 0 and "worker" in shown.stdout, f"`{cli} --help`: {shown.stderr}")

    from fastapi.testclient import TestClient

    from app.core.db import session_scope
    from app.core.migrate import upgrade
    from app.core.settings import DEFAULT_BASE_MODEL, Settings, get_settings
    from app.main import create_app
    from app.services import keys

    with tempfile.TemporaryDirectory(prefix="tunehouse-smoke-") as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp) / "data", warm_poll_seconds=0)
        upgrade(settings.sqlalchemy_url)
        with session_scope(settings.sqlalchemy_url) as session:
            key = keys.create_key(session, "smoke").key
        headers = {"Authorization": f"Bearer {key}"}

        with TestClient(create_app(settings, role="control")) as client:
            health = client.get("/healthz")
            check(health.status_code == 200, f"/healthz: {health.status_code} {health.text}")
            ready = client.get("/readyz")
            check(ready.status_code == 200, f"/readyz: {ready.status_code} {ready.text}")
            listed = client.get("/v1/files", headers=headers)
            check(listed.status_code == 200, f"GET /v1/files: {listed.status_code}")
        check("torch" not in sys.modules, "the control role imported torch")

        with TestClient(create_app(settings, role="inference")) as client:
            embedded = client.post(
                "/v1/embeddings",
                headers=headers,
                json={"model": DEFAULT_BASE_MODEL, "input": ["a smoke check"]},
            )
            check(embedded.status_code == 200, f"/v1/embeddings: {embedded.text}")
            vector = embedded.json()["data"][0]["embedding"]
            check(len(vector) == 384, f"a MiniLM embedding has 384 numbers, not {len(vector)}")

        # The worker's Celery app reads the settings from the environment: the same data dir.
        os.environ["TUNEHOUSE_DATA_DIR"] = str(settings.data_dir)
        get_settings.cache_clear()
        for module in ("worker.celery_app", "worker.runner", "worker.training.loop"):
            importlib.import_module(module)
    print("smoke check passed")


if __name__ == "__main__":
    main()
