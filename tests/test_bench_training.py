"""bench/training.py works end to end: a tiny classify run (64 SST-2 rows, 64 dev rows) starts
`tunehouse run`, trains through the API and a worker, runs the plain loop and both `Trainer`
baselines, and prints every run's row with its ratios and every target. It asserts no speed
(figures of a two-step run mean nothing); the benchmark itself is run by hand (README,
bench/README.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stacks import base_env
from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

RUNS = (
    "(a) Tunehouse job, create -> succeeded",
    "(b) plain PyTorch loop, length-grouped",
    "(c) Trainer, defaults + dynamic padding",
    "(d) Trainer, group_by_length",
)
NUMBER = r"\s+(-?\d+\.\d+)"


def test_tiny_classify_run_prints_every_run_ratio_and_target(
    shared_data: Path, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path / "unused"), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "bench/training.py", "--parts", "classify", "--rows", "64",
         "--dev-rows", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]

    rows = {}
    for name in RUNS:
        # wall s, train s, samples/s, dev accuracy, wall / plain, samples/s / plain
        row = re.search(rf"^{re.escape(name)}{NUMBER * 6}$", out, re.MULTILINE)
        assert row is not None, (name, out)
        rows[name] = [float(value) for value in row.groups()]
    for name, (wall, train, rate, accuracy, wall_ratio, rate_ratio) in rows.items():
        assert wall > train > 0 and rate > 0, (name, out)
        assert 0.0 <= accuracy <= 1.0, (name, out)
        assert wall_ratio > 0 and rate_ratio > 0, (name, out)
    plain = rows["(b) plain PyTorch loop, length-grouped"]
    assert plain[4] == plain[5] == 1.0, out  # the baseline's ratios to itself

    targets = out.split("== Targets (issue 11) ==")[1]
    for target in (
        "(a)'s loop",
        "(a) end to end",
        "faster than (c) Trainer's defaults",
        "as fast as (d) Trainer group_by_length",
        "dev accuracy of (a)",
    ):
        assert re.search(rf"\[(PASS|MISS)\] .*{re.escape(target)}", targets), (target, targets)
    # The model the job registered serves what the job evaluated: the same dev accuracy.
    assert "[PASS] (a)'s model served by /v1/predictions" in targets, targets
