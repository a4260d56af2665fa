"""bench/serving.py works end to end: its --quick smoke run starts both servers, drives them,
prints every table and target, and leaves no server behind. It asserts no speed (figures of a
one-second run mean nothing); the benchmark itself is run by hand (README, bench/README.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stacks import base_env
from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_quick_run_prints_every_figure_and_stops_its_servers(
    shared_data: Path, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path / "unused"), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "bench/serving.py", "--quick", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]

    # Every level of both routes answered without an error.
    for clients in (1, 8):
        for route in ("naive", "tunehouse"):
            row = re.search(rf"^\s+{clients} {route} .* (\d+)$", out, re.MULTILINE)
            assert row is not None and row.group(1) == "0", (clients, route, out)
    # The naive route and Tunehouse gave the same label to every dev sentence sent.
    agreed = re.search(r"labels equal, Tunehouse fp32 vs naive: (\d+)/(\d+)", out)
    assert agreed is not None and agreed.group(1) == agreed.group(2) == "24", out
    assert re.search(r"^plain .* 8/8$", out, re.MULTILINE), out  # greedy: same text together
    assert re.search(r"^streamed .* 8/8$", out, re.MULTILINE), out
    assert re.search(r"^\s+2 +-?\d+\.\d+ +\d+\.\d+ +-?\d+\.\d+$", out, re.MULTILINE), out  # memory
    targets = out.split("== Targets (issue 10) ==")[1]
    for target in (
        "8 clients, fp32",  # the top level: 8 in a quick run
        "1 client: p50",
        "predictions identical",
        "int8",
        "generation, plain",
        "generation, streamed",
        "memory, base + 2 adapters",
    ):
        assert target in targets, target

    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 3, out  # two classification servers, one generation server
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"server {pid} still runs"


def _zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
