"""A run in which a selected test never reported fails (pytest plugin, on in pyproject.toml).

Under pytest-xdist a test can be lost without a failure: the summary counts fewer tests than
were collected and the run still exits 0. Here the process whose exit status the caller sees
(the xdist controller, or the one process of a serial run) compares the tests selected with the
tests that reported, and a run that would pass with some missing fails, naming them. Tests that
share a node id fail the run too: xdist schedules by node id, so it runs only the first of them.
"""

from __future__ import annotations

from collections import Counter

import pytest

_selected: set[str] = set()
_shared: set[str] = set()  # node ids that more than one selected test has
_reported: set[str] = set()


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_finish(session: pytest.Session) -> None:
    """A serial run's selection (after -k, -m and deselection)."""
    if not _is_xdist_worker(session.config):
        _select([item.nodeid for item in session.items])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: object, ids: list[str]) -> None:
    """On the xdist controller: what a worker selected (every worker selects the same)."""
    _select(ids)


def _select(ids: list[str]) -> None:
    _selected.update(ids)
    _shared.update(shared_ids(ids))


def shared_ids(ids: list[str]) -> set[str]:
    return {nodeid for nodeid, count in Counter(ids).items() if count > 1}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _reported.add(report.nodeid)


def lost_tests(selected: set[str], reported: set[str]) -> list[str]:
    return sorted(selected - reported)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_xdist_worker(session.config) or session.config.option.collectonly:
        return
    if exitstatus != pytest.ExitCode.OK:
        return  # a failed or interrupted run has already said so
    lost = lost_tests(_selected, _reported)
    lines = []
    if lost:
        lines += [f"{len(lost)} of {len(_selected)} selected tests never reported:", *lost]
    if _shared:
        lines += ["selected tests share these node ids (xdist runs one of each):", *sorted(_shared)]
    if not lines:
        return
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if terminal is not None:
            terminal.write_line(line, red=True)
        else:
            print(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
