"""Shared stores: a step one teammate ran is a cache hit for the others."""

from __future__ import annotations

import subprocess
import sys

import pytest
import remote_tasks as tasks
from conftest import client_env, system_code

import remoterun as rr


@pytest.fixture(autouse=True)
def team_key(monkeypatch):
    """The team's signing key, which share= needs (the teammates' processes inherit it)."""
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", "a-team-key-for-the-shared-store-tests")


def _teammate(home, code: str) -> str:
    """Run ``code`` in a process of its own with its own REMOTERUN_HOME; its stdout."""
    env = client_env()
    env["REMOTERUN_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_two_teammates_one_execution(system, s3, marker, tmp_path):
    step = (
        "import remoterun as rr, remote_tasks as t\n"
        + system_code(system)
        + f"fn = rr.function(t.record_call, system=SYSTEM, share={s3 + '/team'!r})\n"
        f"print(fn.get_or_call({marker!r}, 21, run_name='prep'))\n"
    )
    # Alice runs the step on the system under test; Bob, on his own machine, later.
    alice = _teammate(tmp_path / "alice", step.replace("SYSTEM", "s"))
    bob = _teammate(tmp_path / "bob", step.replace("SYSTEM", "'here'"))
    assert alice.splitlines()[-1] == bob == "42"  # Alice's includes the step's output
    assert tasks.executions(marker) == 1
    shared = rr.run(path=f"{s3}/team/prep")
    assert shared.result() == 42
    assert not (tmp_path / "bob" / "runs" / "prep").exists()  # Bob executed nothing


def test_get_or_run_publishes_once_completed(s3, marker, tmp_path):
    fn = rr.function(tasks.record_call, share=f"{s3}/team")
    run = fn.get_or_run(marker, 5, run_name="later")
    assert run.result(timeout=30) == 10
    assert rr.run(path=f"{s3}/team/later").result() == 10
    # A fresh local store: the hit comes from the shared one, as a Run there.
    elsewhere = rr.LocalSystem(root=str(tmp_path / "elsewhere"))
    other = rr.function(tasks.record_call, system=elsewhere, share=f"{s3}/team")
    again = other.get_or_run(marker, 5, run_name="later")
    assert again.url == f"{s3}/team/later"
    assert again.result() == 10
    assert tasks.executions(marker) == 1


def test_a_shared_run_from_other_arguments_is_not_used(s3, marker, tmp_path):
    fn = rr.function(tasks.record_call, share=f"{s3}/team")
    assert fn.get_or_call(marker, 1, run_name="argued") == 2
    elsewhere = rr.LocalSystem(root=str(tmp_path / "elsewhere"))
    other = rr.function(tasks.record_call, system=elsewhere, share=f"{s3}/team")
    assert other.get_or_call(marker, 2, run_name="argued") == 4  # executed, not taken
    assert tasks.executions(marker) == 2
    assert rr.run(path=f"{s3}/team/argued").result() == 2  # the first publisher's kept


def test_a_system_shares_for_every_function_on_it(s3, marker, tmp_path):
    alice = rr.LocalSystem(root=str(tmp_path / "alice"), share=f"{s3}/team")
    bob = rr.LocalSystem(root=str(tmp_path / "bob"), share=[f"{s3}/team"])
    assert rr.function(tasks.record_call, system=alice).get_or_call(marker, 3, run_name="s") == 6
    assert rr.function(tasks.record_call, system=bob).get_or_call(marker, 3, run_name="s") == 6
    assert tasks.executions(marker) == 1
    assert not (tmp_path / "bob" / "s").exists()


def test_a_share_root_named_like_the_run_holds_it_one_level_down(s3, moto_server, marker):
    from remoterun.systems.storage import StorageSystem

    store = StorageSystem(f"{s3}/prep", **moto_server.storage_options())
    fn = rr.function(tasks.record_call, share=store)
    assert fn.get_or_call(marker, 4, run_name="prep") == 8
    assert rr.run(path=f"{s3}/prep/prep").result() == 8
    assert fn.share == ((f"{s3}/prep", moto_server.storage_options()),)
