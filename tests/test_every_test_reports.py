"""The guard against lost tests (tests/every_test_reports.py), in a pytest run of its own: a
conftest makes one test vanish without a report, the way a test lost under pytest-xdist does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TESTS = """
def test_one():
    assert True

def test_vanishes():
    assert True

def test_three():
    assert True
"""

# Runs no protocol for test_vanishes: no setup, no call, no report, as if its worker lost it.
VANISH = """
def pytest_runtest_protocol(item, nextitem):
    if item.name == "test_vanishes":
        return True
    return None
"""


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.every_test_reports", "-p", "no:cacheprovider",
         "-q", *args],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    (tmp_path / "test_some.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir
    return tmp_path


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_run_with_a_lost_test_fails_and_names_it(suite: Path, workers: list[str]) -> None:
    (suite / "conftest.py").write_text(VANISH)
    run = run_pytest(suite, *workers)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 of 3 selected tests never reported:" in run.stdout, run.stdout
    assert "test_some.py::test_vanishes" in run.stdout
    assert "2 passed" in run.stdout


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_run_where_every_test_reports_passes(suite: Path, workers: list[str]) -> None:
    run = run_pytest(suite, *workers)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout and "never reported" not in run.stdout


def test_deselected_tests_are_not_counted_as_lost(suite: Path) -> None:
    run = run_pytest(suite, "-n", "2", "-k", "not three")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout and "never reported" not in run.stdout


# Two items under one node id, the way schemathesis 4's per-operation items are named on pytest
# 9.2: a serial run runs both, xdist only the first.
TWINS = """
import pytest

class Twin(pytest.Function):
    pass

def pytest_collection_modifyitems(session, config, items):
    first = items[0]
    twin = Twin.from_parent(first.parent, name=first.name, callobj=first.obj)
    items.insert(1, twin)
"""


def test_tests_that_share_a_node_id_fail_the_run(suite: Path) -> None:
    (suite / "conftest.py").write_text(TWINS)
    run = run_pytest(suite)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "share these node ids" in run.stdout and "test_some.py::test_one" in run.stdout
