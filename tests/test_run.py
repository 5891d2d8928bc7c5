"""Run handles: loading, waiting, logs, the context manager."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import remote_tasks as tasks

import remoterun as rr


def test_load_by_name_and_by_path(system):
    rr.function(tasks.add, system=system)(2, run_name="loadme")
    by_name = rr.run(name="loadme", system=system)
    by_path = rr.run(path=f"{system.root}/loadme", system=system)
    by_get = system.get_run("loadme")
    for run in (by_name, by_path, by_get):
        assert run.status is rr.RunStatus.COMPLETED
        assert run.result() == 4
        assert run.inputs() == {"args": [2], "kwargs": {}}
        assert "adding 2 and 2" in run.stdout()
        assert run.stderr() == ""
    assert by_name == by_path == by_get


def test_missing_run(system):
    with pytest.raises(rr.RunNotFoundError, match="nothere"):
        system.get_run("nothere")
    run = rr.run(name="nothere", system=system)
    assert run.status is rr.RunStatus.NOT_STARTED
    with pytest.raises(rr.RunNotFoundError):
        run.result()


def test_wait_times_out_then_completes(system):
    run = rr.function(tasks.sleep_for, system=system).run(0.5, run_name="waiting")
    with pytest.raises(TimeoutError):
        run.wait(timeout=0.05)
    assert run.wait(timeout=30) is rr.RunStatus.COMPLETED
    assert run.done()


def test_logs_follow_yields_lines_while_running(system, scratch):
    gate = scratch / "gate"
    run = rr.function(tasks.wait_for_file, system=system).run(str(gate), run_name="follow")
    lines = run.logs(follow=True, poll=0.01)
    assert next(lines) == "started\n"
    assert run.status is rr.RunStatus.RUNNING  # the line came while the run went on
    gate.touch()
    assert list(lines) == ["saw the file\n"]
    assert run.status is rr.RunStatus.COMPLETED
    assert list(run.logs()) == ["started\n", "saw the file\n"]
    with pytest.raises(ValueError, match="stream"):
        next(run.logs(stream="both"))


def test_context_manager_records_the_block(tmp_path, capsys):
    path = tmp_path / "ctx" / "prep"
    with rr.run(name="prep", path=str(path)) as run:
        print("inside the block")
        print("to stderr", file=sys.stderr)
        assert rr.current_run() is run
    assert rr.current_run() is None
    assert sys.stdout is not None and type(sys.stdout).__name__ != "_Tee"
    assert "inside the block" in capsys.readouterr().out  # still shown to the user
    config = json.loads((path / "config.json").read_text())
    assert config["status"] == "COMPLETED"
    assert config["run_type"] == "context"
    assert config["end_time"] >= config["start_time"]
    assert run.stdout() == "inside the block\n"
    assert run.stderr() == "to stderr\n"
    assert rr.run(path=str(path)).status is rr.RunStatus.COMPLETED


def test_context_manager_records_an_exception_and_restores_streams(tmp_path):
    stdout, stderr = sys.stdout, sys.stderr
    path = tmp_path / "boom"
    with pytest.raises(tasks.CustomError), rr.run(path=str(path)) as run:
        raise tasks.CustomError("in the block")
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert run.status is rr.RunStatus.FAILED
    assert "in the block" in run.config["error_traceback"]
    with pytest.raises(tasks.CustomError):
        run.result()
    # A second block of the same name keeps the first as an attempt.
    with rr.run(path=str(path)):
        pass
    again = rr.run(path=str(path))
    assert again.status is rr.RunStatus.COMPLETED
    assert again.config["attempt"] == 2
    assert [a.status for a in again.attempts()] == [rr.RunStatus.FAILED]


def test_context_manager_never_moves_a_live_block_aside(tmp_path):
    path = tmp_path / "live"
    script = (
        "import sys, time, remoterun as rr\n"
        f"with rr.run(path={str(path)!r}):\n"
        "    print('inside', file=sys.__stdout__, flush=True)\n"
        "    time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "inside"
        with pytest.raises(rr.RunNotFinishedError, match="still RUNNING"), rr.run(path=str(path)):
            pass  # never reached
        assert rr.run(path=str(path)).status is rr.RunStatus.RUNNING
        assert not (path / "attempts").exists()
    finally:
        other.kill()
        other.wait()
    # Its process is gone: the block is lost, and a new one may take the name.
    with rr.run(path=str(path)) as run:
        pass
    assert run.status is rr.RunStatus.COMPLETED
    [lost] = run.attempts()
    assert lost.status is rr.RunStatus.FAILED
    assert "worker lost" in lost.config["error"]


def test_context_manager_on_memory_filesystem():
    with rr.run(path="memory://team/runs/mem-ctx") as run:
        print("kept in memory")
    loaded = rr.run(path="memory://team/runs/mem-ctx")
    assert loaded.status is rr.RunStatus.COMPLETED
    assert loaded.stdout() == "kept in memory\n"
    assert run.url.startswith("memory://") and run.url.endswith("/team/runs/mem-ctx")


def test_context_manager_defaults_to_remoterun_home(remoterun_home):
    with rr.run(name="homed"):
        pass
    assert (remoterun_home / "runs" / "homed" / "config.json").exists()
    assert rr.local().get_run("homed").status is rr.RunStatus.COMPLETED


def test_name_and_path_must_agree(tmp_path):
    with pytest.raises(rr.RemoterunError, match="disagree"):
        rr.run(name="a", path=str(tmp_path / "b"))
    with pytest.raises(rr.RemoterunError, match="name="):
        rr.run()
    with pytest.raises(rr.InvalidRunNameError):
        rr.run(path=str(tmp_path / "bad name"))


def test_status_refreshes_until_terminal(system, scratch):
    gate = scratch / "gate"
    run = rr.function(tasks.wait_for_file, system=system).run(str(gate), run_name="refresh")
    assert run.status is rr.RunStatus.RUNNING
    gate.touch()
    deadline = time.monotonic() + 30
    while run.status is not rr.RunStatus.COMPLETED:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert run.refresh().config["status"] == "COMPLETED"


def test_system_lists_its_runs(system):
    assert system.runs() == []
    fn = rr.function(tasks.add, system=system)
    fn(1, run_name="b-run")
    fn(1, run_name="a-run")
    assert [r.name for r in system.runs()] == ["a-run", "b-run"]  # .locks is not a run


def test_current_run_inside_a_remote_function(system):
    fn = rr.function(tasks.describe_current_run, system=system)
    assert fn() is None  # an unrecorded call is no run
    assert fn(run_name="self-aware") == ("self-aware", "RUNNING", {"args": [], "kwargs": {}})


def test_metrics_tags_and_params_are_kept_in_the_record(system, tmp_path):
    run = rr.function(tasks.log_some_metrics, system=system).run(run_name="measured")
    assert "must be a number" in run.result(timeout=30)
    assert run.metrics == {"loss": [0.5, 0.25], "acc": 0.9}
    assert run.config["metric_steps"] == {"loss": [1, 2]}
    assert run.tags == {"kind": "toy"}
    assert run.params == {"lr": 0.1, "layers": [2, 3]}
    assert run.status is rr.RunStatus.COMPLETED  # the outcome did not overwrite them
    copy = run.to(f"memory://{tmp_path.name}/runs")
    assert copy.metrics == run.metrics and copy.tags == run.tags


def test_metrics_in_a_recorded_block(tmp_path):
    with rr.run(path=str(tmp_path / "block")) as run:
        rr.current_run().log_metric("loss", 1.0)
        rr.current_run().log_metric("loss", 2.0, overwrite=True)
        run.set_tag("note", object)  # not JSON: kept as its str
        with pytest.raises(TypeError, match="must be a number"):
            run.log_metric("loss", True)
    loaded = rr.run(path=str(tmp_path / "block"))
    assert loaded.metrics == {"loss": [2.0]}
    assert loaded.tags == {"note": str(object)}
