"""Bad input and broken runs: clear errors, and nothing lost."""

from __future__ import annotations

import importlib
import json
import linecache
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import remote_tasks as tasks
from conftest import client_env, system_code

import remoterun as rr


def test_remote_exception_comes_back_as_its_own_type(system):
    fn = rr.function(tasks.fail, system=system)
    for kwargs in ({}, {"run_name": "failing"}):
        with pytest.raises(tasks.CustomError, match="broken") as info:
            fn("broken", **kwargs)
        cause = info.value.__cause__
        assert isinstance(cause, rr.RemoteError)
        assert "raise CustomError(message)" in cause.remote_traceback
        assert cause.host
        assert "_worker_main" not in cause.remote_traceback
    assert cause.run_name == "failing"
    assert any(p.endswith("stderr.log") for p in cause.log_paths)


def test_remote_traceback_names_the_file_and_shows_lines_the_host_lacks(
    system, tmp_path, monkeypatch
):
    # A module of the user's own that neither the agent nor the SSH host can read: the
    # file is gone once imported (only this process's linecache still has its lines).
    name = "vanishing_" + uuid.uuid4().hex[:8]
    path = tmp_path / f"{name}.py"
    path.write_text(
        "def explode(x):\n"
        "    total = x * 2\n"
        "    raise RuntimeError(f'exploded at {total}')  # the failing line\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    linecache.getlines(str(path))
    path.unlink()
    fn = rr.function(module.explode, system=system)
    for kwargs in ({}, {"run_name": "vanished"}):
        with pytest.raises(RuntimeError, match="exploded at 4") as info:
            fn(2, **kwargs)
        text = info.value.__cause__.remote_traceback
        assert f'File "{path}", line 3, in explode' in text
        assert "raise RuntimeError(f'exploded at {total}')  # the failing line" in text
        assert "<dynamic-code>" not in text


def test_failed_run_result_raises_and_never_returns_logs(system):
    run = rr.function(tasks.fail, system=system).run("nope", run_name="fails")
    with pytest.raises(tasks.CustomError):
        run.result(timeout=30)
    assert run.status is rr.RunStatus.FAILED
    assert isinstance(run.exception(), tasks.CustomError)
    assert "about to fail" in run.stdout()
    assert "CustomError: nope" in run.stderr()
    config = run.config
    assert config["error"] == "CustomError: nope"
    assert "raise CustomError(message)" in config["error_traceback"]


def test_unpicklable_result_is_a_clear_error(system):
    fn = rr.function(tasks.unpicklable_result, system=system)
    with pytest.raises(rr.SerializationError, match="cannot be pickled"):
        fn()
    with pytest.raises(rr.SerializationError, match="cannot be pickled"):
        fn(run_name="bad-result")
    assert system.get_run("bad-result").status is rr.RunStatus.FAILED


def test_unpicklable_argument_names_it_and_starts_nothing(system):
    fn = rr.function(tasks.record_call, system=system)
    with pytest.raises(rr.SerializationError, match="'value'") as info:
        fn.run("/dev/null", threading.Lock(), run_name="never")
    assert "Nothing was started" in str(info.value)
    assert not os.path.exists(os.path.join(system.root, "never"))
    with pytest.raises(rr.SerializationError, match="'value'"):
        fn("/dev/null", threading.Lock())


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-x", "x" * 129, "a b", "/abs"])
def test_invalid_run_names_are_refused_before_any_io(system, name):
    fn = rr.function(tasks.add, system=system)
    with pytest.raises(rr.InvalidRunNameError, match="invalid run name"):
        fn(1, run_name=name)
    with pytest.raises(rr.InvalidRunNameError):
        fn.get_or_run(1, run_name=name)
    with pytest.raises(rr.InvalidRunNameError):
        system.get_run(name)
    assert not os.path.exists(system.root)


@pytest.mark.parametrize("task", [tasks.kill_self, tasks.hard_exit])
def test_worker_that_dies_is_failed_with_worker_lost(system, task):
    run = rr.function(task, system=system).run(run_name="dies")
    start = time.monotonic()
    with pytest.raises(rr.WorkerLostError, match="worker lost"):
        run.result(timeout=5)
    assert time.monotonic() - start < 5
    assert run.status is rr.RunStatus.FAILED


def test_sys_exit_fails_the_run(system):
    with pytest.raises(SystemExit):
        rr.function(tasks.exit_with, system=system)(4, run_name="exits")
    assert system.get_run("exits").config["error"] == "SystemExit: 4"
    with pytest.raises(SystemExit):
        rr.function(tasks.exit_with, system=system)(5)  # the agent survives it
    assert rr.function(tasks.add, system=system)(1) == 3


def test_sigkill_from_outside_is_found_within_five_seconds(system, scratch):
    run = rr.function(tasks.sleep_for, system=system).run(60, run_name="killed")
    os.kill(run.config["pid"], signal.SIGKILL)
    with pytest.raises(rr.WorkerLostError, match="SIGKILL"):
        run.result(timeout=5)


def test_cancel_stops_the_whole_process_group(system, scratch):
    pidfile = scratch / "child.pid"
    run = rr.function(tasks.spawn_sleeper, system=system).run(str(pidfile), run_name="group")
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child = int(pidfile.read_text())
    assert run.cancel(grace=1) is rr.RunStatus.CANCELLED
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the run's child process survived cancel"
        time.sleep(0.01)
    assert system.get_run("group").config["status"] == "CANCELLED"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # gone, or going as we read
        return False


def test_cancel_of_finished_run_changes_nothing(system):
    fn = rr.function(tasks.add, system=system)
    fn(1, run_name="done")
    run = system.get_run("done")
    assert run.cancel() is rr.RunStatus.COMPLETED
    assert run.result() == 3


def test_starting_a_running_name_again_is_refused(system, scratch):
    fn = rr.function(tasks.wait_for_file, system=system)
    run = fn.run(str(scratch / "gate"), run_name="busy")
    with pytest.raises(rr.RunNotFinishedError, match="already RUNNING"):
        fn.run(str(scratch / "gate"), run_name="busy")
    (scratch / "gate").touch()
    run.result(timeout=30)


def test_read_only_run_root_fails_before_executing(read_only_dir, marker):
    system = rr.LocalSystem(root=str(read_only_dir / "runs"))
    fn = rr.function(tasks.record_call, system=system)
    with pytest.raises(rr.RunStorageError, match="runs"):
        fn.run(marker, 1, run_name="ro")
    with pytest.raises(rr.RunStorageError):
        fn.get_or_call(marker, 1, run_name="ro")
    assert tasks.executions(marker) == 0
    assert fn(marker, 1) == 2  # the unrecorded fast path writes no folder
    system.close()


def test_output_written_to_raw_fds_does_not_corrupt_the_protocol(system, capfd):
    fn = rr.function(tasks.write_to_fds, system=system)
    assert fn() == "result intact"
    out, err = capfd.readouterr()
    assert "raw write to fd 1" in out
    assert "from a child process" in out
    assert "to stderr" in err


def test_async_run_survives_its_client_being_killed(system, scratch):
    gate = scratch / "gate"
    script = (
        "import sys, remoterun as rr, remote_tasks as t\n"
        + system_code(system)
        + f"r = rr.function(t.wait_for_file, system=s).run({str(gate)!r}, run_name='orphan')\n"
        "print(r.name, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env=client_env(),
        text=True,
        start_new_session=True,
    )
    assert client.stdout.readline().strip() == "orphan"
    os.killpg(client.pid, signal.SIGKILL)  # the client and its agent
    client.wait()
    gate.touch()
    run = rr.run(name="orphan", system=system)
    assert run.result(timeout=30) == "finished"


def test_ctrl_c_during_a_call_stops_the_function(system, scratch):
    pidfile = scratch / "pid"
    script = (
        "import time, remoterun as rr, remote_tasks as t\n" + system_code(system) + "try:\n"
        f"    rr.function(t.note_pid_then_sleep, system=s)({str(pidfile)!r})\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "time.sleep(60)\n"  # the client lives on: only the interrupted call must end
    )
    client = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env=client_env(),
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline, "the function never started"
            time.sleep(0.02)
        pid = int(pidfile.read_text())
        client.send_signal(signal.SIGINT)
        assert client.stdout.readline().strip() == "interrupted"
        deadline = time.monotonic() + 5
        while _alive(pid):
            assert time.monotonic() < deadline, "the interrupted call still runs"
            time.sleep(0.02)
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()


def test_recorded_runs_inherit_nothing_from_synchronous_calls(system, scratch):
    clean = rr.function(tasks.observe, system=system).run(run_name="before").result(timeout=30)
    agent_pid = rr.function(tasks.pollute, system=system)(str(scratch))
    # The synchronous call did change the agent's process...
    assert rr.function(tasks.observe, system=system)() == ("leaked", str(scratch), True)
    # ...and the recorded runs started after it see none of it.
    for name in ("after-1", "after-2"):
        run = rr.function(tasks.observe, system=system).run(run_name=name)
        assert run.result(timeout=30) == clean
        assert run.config["pid"] != agent_pid
    assert clean[0] is None and clean[2] is False


def test_worker_lost_is_found_without_the_agent_that_started_it(system, scratch):
    script = (
        "import remoterun as rr, remote_tasks as t\n"
        + system_code(system)
        + "r = rr.function(t.sleep_for, system=s).run(60, run_name='lonely')\n"
        "print(r.config['pid'], flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env=client_env(),
        text=True,
        start_new_session=True,
    )
    pid = int(client.stdout.readline())
    os.killpg(client.pid, signal.SIGKILL)
    client.wait()
    os.kill(pid, signal.SIGKILL)
    run = rr.run(name="lonely", system=system)
    with pytest.raises(rr.WorkerLostError, match="worker lost"):
        run.result(timeout=5)


def test_sixteen_processes_one_execution(system, marker):
    script = (
        "import sys, time, remoterun as rr, remote_tasks as t\n"
        + system_code(system)
        + "fn = rr.function(t.record_call, system=s)\n"
        "s._request({'op': 'ping'})\n"  # start the agent before the barrier
        "start = float(sys.argv[1])\n"
        "time.sleep(max(0, start - time.time()))\n"
        f"run = fn.get_or_run({marker!r}, 21, 0.5, run_name='crowd')\n"
        "print(run.result(timeout=60), flush=True)\n"
    )
    start = time.time() + 3
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(start)],
            stdout=subprocess.PIPE,
            env=client_env(),
            text=True,
        )
        for _ in range(16)
    ]
    outputs = [c.communicate(timeout=120)[0].strip() for c in clients]
    assert [c.returncode for c in clients] == [0] * 16
    assert outputs == ["42"] * 16
    assert tasks.executions(marker) == 1
    config = json.loads(Path(system.root, "crowd", "config.json").read_text())
    assert config["attempt"] == 1


def test_hits_during_re_executions_never_mix_attempts(system):
    """A cache hit read while the same name is re-executed returns a consistent outcome."""
    fn = rr.function(tasks.identity, system=system)
    fn(1, run_name="churn")
    stop = time.monotonic() + 2
    seen: list[object] = []

    def churn() -> None:
        i = 0
        while time.monotonic() < stop:
            fn(i % 2 + 1, run_name="churn")  # archives the attempt, records another
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        while time.monotonic() < stop:
            try:
                seen.append(fn.get_or_call(1, run_name="churn"))
            except rr.CacheMismatchError:
                seen.append("mismatch")  # the recorded attempt was made from 2: right
    finally:
        thread.join()
    assert seen and set(seen) <= {1, "mismatch"}


def test_recorded_call_returns_when_the_worker_dies_leaving_a_child(system):
    start = time.monotonic()
    with pytest.raises(rr.WorkerLostError, match="exited with code 3"):
        rr.function(tasks.forks_then_dies, system=system)(run_name="orphaned-child")
    assert time.monotonic() - start < 5


def test_map_reports_an_argument_the_host_cannot_load(system):
    fn = rr.function(tasks.identity, system=system)
    (result,) = fn.map([tasks.LoadsBadly()], return_exceptions=True)
    assert isinstance(result, rr.RemoteError)
    assert "could not be loaded on this host" in str(result)
    with pytest.raises(rr.RemoteError, match="could not be loaded"):
        fn.map([tasks.LoadsBadly()])
