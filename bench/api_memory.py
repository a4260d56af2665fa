"""Resident memory of the API process after start-up, against a bare FastAPI app.

    .venv/bin/python bench/api_memory.py

Starts `tunehouse api` (control and inference routes, no model loaded yet) and a FastAPI app
with no routes under the same uvicorn, waits until each answers, and reads VmRSS from /proc.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stacks import base_env  # noqa: E402
from tests.support import free_port, tunehouse, wait_until  # noqa: E402

BARE_APP = (
    "import sys, uvicorn, fastapi\n"
    "app = fastapi.FastAPI()\n"
    "app.get('/healthz')(lambda: {'status': 'ok'})\n"
    "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')\n"
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(command: list[str], env: dict[str, str], port: int) -> float:
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_until(up, 60, what="the server")
        time.sleep(1)
        return rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = base_env(Path(tmp) / "data")
        tunehouse("migrate", env=env)
        port = free_port()
        api = measure([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env, port)
        port = free_port()
        bare = measure([sys.executable, "-c", BARE_APP, str(port)], env, port)
    print(f"{'':28}{'tunehouse api':>14}{'bare FastAPI':>14}{'ratio':>8}")
    print(f"{'RSS after start-up (MiB)':28}{api:>14.1f}{bare:>14.1f}{api / bare:>8.2f}")


if __name__ == "__main__":
    main()
