"""The decorator and every way of calling a RemoteFunction, on every system."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import remote_tasks as tasks

import remoterun as rr


def test_sync_call_returns_value_and_streams_output(system, capsys):
    add = rr.function(tasks.add, system=system)
    assert add(40) == 42
    assert add(1, b=1) == 2
    assert "adding 40 and 2" in capsys.readouterr().out


def test_decorator_forms_are_equivalent(system):
    @rr.function(system=system)
    def double(x):
        return 2 * x

    assert double(4) == 8
    assert rr.function(tasks.add).to(system)(1) == 3
    assert rr.function(tasks.add, system=system)(2) == 4


def test_run_name_is_not_passed_to_the_function(system):
    add = rr.function(tasks.add, system=system)
    assert add(1, run_name="named") == 3  # add() has no run_name parameter


def test_sync_call_without_run_name_writes_no_folder(system):
    rr.function(tasks.add, system=system)(1)
    assert not os.path.exists(system.root) or os.listdir(system.root) == []


def test_recorded_call_writes_the_whole_run_folder(system):
    add = rr.function(tasks.add, system=system)
    assert add(5, run_name="rec") == 7
    folder = os.path.join(system.root, "rec")
    names = set(os.listdir(folder))
    assert {
        "config.json",
        "function.pkl",
        "inputs.pkl",
        "result.pkl",
        "stdout.log",
        "stderr.log",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    config = json.loads(Path(folder, "config.json").read_text())
    for key in (
        "name",
        "status",
        "run_type",
        "fn_name",
        "cmds",
        "start_time",
        "end_time",
        "host",
        "pid",
        "python",
        "remoterun_version",
        "creator",
        "fingerprint",
        "error",
        "error_traceback",
        "upstream",
        "downstream",
        "attempt",
        "tags",
        "metrics",
    ):
        assert key in config, key
    assert config["status"] == "COMPLETED"
    assert config["run_type"] == "function"
    assert config["fn_name"] == "add"
    assert config["end_time"] >= config["start_time"]
    assert "adding 5 and 2" in Path(folder, "stdout.log").read_text()
    run = system.get_run("rec")
    assert run.inputs() == {"args": [5], "kwargs": {}}
    assert run.result() == 7


def test_run_is_async_and_returns_while_running(system, scratch):
    gate = scratch / "gate"
    fn = rr.function(tasks.wait_for_file, system=system)
    run = fn.run(str(gate), run_name="async")
    assert run.status is rr.RunStatus.RUNNING
    with pytest.raises(TimeoutError):
        run.result(timeout=0.2)
    gate.touch()
    assert run.result(timeout=30) == "finished"
    assert run.status is rr.RunStatus.COMPLETED


def test_generated_names_are_unique_and_well_formed(system):
    fn = rr.function(tasks.sleep_for, system=system)
    runs = [fn.run(0) for _ in range(12)]
    names = {r.name for r in runs}
    assert len(names) == 12
    for run in runs:
        assert run.name.startswith("sleep_for-")
        assert run.result(timeout=30) == 0


def test_get_or_call_hit_executes_nothing(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    assert fn.get_or_call(marker, 3, run_name="cached") == 6
    assert fn.get_or_call(marker, 3, run_name="cached") == 6
    assert fn.get_or_call(run_name="cached") == 6  # no arguments: a lookup by name
    assert tasks.executions(marker) == 1


def test_get_or_run_returns_cached_run(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    first = fn.get_or_run(marker, 2, run_name="gr")
    assert first.result(timeout=30) == 4
    second = fn.get_or_run(marker, 2, run_name="gr")
    assert second.status is rr.RunStatus.COMPLETED
    assert second.result() == 4
    assert tasks.executions(marker) == 1


def test_get_or_call_waits_for_a_running_run(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    fn.run(marker, 5, 1.0, run_name="attach")
    start = time.monotonic()
    assert fn.get_or_call(marker, 5, 1.0, run_name="attach") == 10
    assert time.monotonic() - start > 0.3
    assert tasks.executions(marker) == 1


def test_failed_run_executes_again_and_keeps_the_attempt(system, marker):
    fn = rr.function(tasks.fail_then_succeed, system=system)
    with pytest.raises(tasks.CustomError):
        fn.get_or_call(marker, run_name="retry")
    assert fn.get_or_call(marker, run_name="retry") == "second attempt"
    run = system.get_run("retry")
    assert run.config["attempt"] == 2
    (earlier,) = run.attempts()
    assert earlier.config["status"] == "FAILED"
    assert "first attempt fails" in earlier.config["error"]
    assert os.path.exists(os.path.join(system.root, "retry", "attempts", "1", "stderr.log"))


def test_cancelled_run_executes_again(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    run = fn.run(marker, 1, 30, run_name="cancel-then-rerun")
    assert run.cancel(grace=1) is rr.RunStatus.CANCELLED
    with pytest.raises(rr.RunCancelledError):
        run.result()
    assert fn.get_or_call(marker, 1, run_name="cancel-then-rerun") == 2
    assert [a.config["status"] for a in system.get_run("cancel-then-rerun").attempts()] == [
        "CANCELLED"
    ]


def test_mismatched_arguments_raise_naming_the_argument(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    fn.get_or_call(marker, 1, run_name="mm")
    with pytest.raises(rr.CacheMismatchError) as info:
        fn.get_or_call(marker, 2, run_name="mm")
    assert info.value.differences == ("value",)
    assert "value" in str(info.value)
    assert tasks.executions(marker) == 1


def test_mismatch_policies(system, marker):
    ignore = rr.function(tasks.record_call, system=system, on_mismatch="ignore")
    rerun = rr.function(tasks.record_call, system=system, on_mismatch="rerun")
    ignore.get_or_call(marker, 1, run_name="policy")
    assert ignore.get_or_call(marker, 9, run_name="policy") == 2
    assert rerun.get_or_call(marker, 9, run_name="policy") == 18
    assert tasks.executions(marker) == 2
    assert len(system.get_run("policy").attempts()) == 1


def test_keyword_and_positional_arguments_fingerprint_alike(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    fn.get_or_call(marker, 4, run_name="kw")
    assert fn.get_or_call(marker=marker, value=4, run_name="kw") == 8
    assert tasks.executions(marker) == 1


def test_content_cache_derives_the_name(system, marker):
    fn = rr.function(tasks.record_call, system=system, cache=True)
    assert fn.get_or_call(marker, 3) == 6
    assert fn.get_or_call(marker, 3) == 6
    assert fn.get_or_call(marker, 4) == 8
    assert tasks.executions(marker) == 2
    names = sorted(n for n in os.listdir(system.root) if not n.startswith("."))
    assert len(names) == 2
    assert all(re.fullmatch(r"record_call-[0-9a-f]{12}", n) for n in names), names
    with pytest.raises(rr.RemoterunError, match="run_name"):
        rr.function(tasks.record_call, system=system).get_or_call(marker, 3)


def test_sixteen_threads_one_execution(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    results, errors = [], []

    def call() -> None:
        try:
            results.append(fn.get_or_call(marker, 7, 0.3, run_name="threads"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [14] * 16
    assert tasks.executions(marker) == 1


def test_map_keeps_input_order_and_can_return_exceptions(system):
    add = rr.function(tasks.add, system=system)
    assert add.map([1, 2, 3], [10, 20, 30]) == [11, 22, 33]
    fail = rr.function(tasks.fail, system=system)
    results = fail.map(["a", "b"], return_exceptions=True)
    assert [type(r) for r in results] == [tasks.CustomError, tasks.CustomError]
    with pytest.raises(tasks.CustomError):
        fail.map(["c"])


def test_commands_are_recorded(system):
    results = system.run(["echo hello", "echo oops >&2; exit 3"], run_name="cmds")
    assert results == [(0, "hello\n", ""), (3, "", "oops\n")]
    run = system.get_run("cmds")
    assert run.config["run_type"] == "command"
    assert run.config["cmds"] == ["echo hello", "echo oops >&2; exit 3"]
    assert "hello" in run.stdout()
    assert "oops" in run.stderr()
    assert run.result() == results


def test_run_python_lines(system):
    (result,) = system.run_python(["import sys", "print(sys.version_info[0])"], run_name="py")
    assert result == (0, "3\n", "")
    assert system.get_run("py").config["run_type"] == "command"


def test_unrecorded_command(system):
    assert system.run("echo quick") == [(0, "quick\n", "")]


def test_map_in_chunks_keeps_order_and_shows_progress(system, capsys):
    add = rr.function(tasks.add, system=system)
    items = list(range(300))
    assert add.map(items, items, chunk_size=7, progress=True) == [2 * i for i in items]
    assert "300/300" in capsys.readouterr().err


def test_local_cache_hit_is_answered_without_an_agent(tmp_path, marker):
    root = str(tmp_path / "runs")
    rr.function(tasks.record_call, system=rr.LocalSystem(root=root))(marker, 3, run_name="kept")
    # No agent can start with this interpreter: a hit must not need one.
    no_agents = rr.LocalSystem(root=root, python="/nonexistent/python3")
    fn = rr.function(tasks.record_call, system=no_agents)
    assert fn.get_or_call(marker, 3, run_name="kept") == 6
    assert fn.get_or_run(marker, 3, run_name="kept").result() == 6
    with pytest.raises(rr.SystemUnavailableError, match="/nonexistent/python3"):
        fn.get_or_call(marker, 4, run_name="other")  # a miss needs one
    assert tasks.executions(marker) == 1
