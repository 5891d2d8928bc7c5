"""The fault suite (bench/faults.py) under pytest: its fast cases at --quick sizes by
default, every case at full size with ``pytest -m faults_slow``. Each test runs one case
against real processes (workers, sshd, moto) and fails with the case's row of counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import faults  # noqa: E402

# Cases that wait for issue 10 work being done on other branches. Non-strict: once the
# behaviour lands they pass (XPASS), and their line here should go.
PENDING = {}


def _cases(quick: bool) -> list:
    return [
        pytest.param(
            name,
            id=name,
            marks=[pytest.mark.xfail(reason=PENDING[name], strict=False)]
            if name in PENDING
            else [],
        )
        for name, case in faults.CASES.items()
        if case.quick or not quick
    ]


@pytest.fixture
def fault_context(request: pytest.FixtureRequest):
    """The suite's context on this session's servers, started only by cases that use them."""
    context = faults.Faults(
        faults.QUICK if "faults_slow" not in request.keywords else faults.Sizes(),
        ssh_server=lambda: request.getfixturevalue("ssh_server"),
        moto_server=lambda: request.getfixturevalue("moto_server"),
    )
    yield context
    context.close()


def _check(context: faults.Faults, name: str) -> None:
    outcome = faults.run_case(context, faults.CASES[name])
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert outcome.passed, "\n" + faults.table([outcome])


@pytest.mark.parametrize("name", _cases(quick=True))
def test_fault_case(fault_context: faults.Faults, name: str) -> None:
    _check(fault_context, name)


@pytest.mark.faults_slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", _cases(quick=False))
def test_fault_case_at_full_size(fault_context: faults.Faults, name: str) -> None:
    _check(fault_context, name)
