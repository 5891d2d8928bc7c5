"""The Ray system against a real two-node Ray cluster on 127.0.0.1 (``ray start``
processes the suite starts; see ray_servers.py): every System capability, exactly-once
execution across driver processes, detached runs, lost workers, and an S3 run root."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed (pip install 'remoterun[ray]')", allow_module_level=True)
# Ray itself is imported only once the cluster's variables are set (auth token, loopback):
# Ray reads them when it is imported.

import remote_tasks as tasks  # noqa: E402
from conftest import TESTS, cancel_an_awaited_sleeper  # noqa: E402

import remoterun as rr  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="session")
def cluster():
    from ray_servers import start_ray_cluster

    assert "ray" not in sys.modules, (
        "ray was imported before the cluster's variables were set (it reads them then): "
        "import it lazily in tests"
    )
    started = start_ray_cluster()
    saved = {k: os.environ.get(k) for k in started.env()}
    os.environ.update(started.env())
    try:
        yield started
    finally:
        import ray

        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        started.stop()


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-runs")


@pytest.fixture
def system(cluster, runs_root):
    return rr.ray(cluster.address, runs=str(runs_root))


def _driver(cluster, runs_root, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a separate driver process (``system`` is the Ray system there)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import remoterun as rr, remote_tasks as tasks
        system = rr.ray({cluster.address!r}, runs={str(runs_root)!r})
        """
    ) + textwrap.dedent(code)
    env = {**os.environ, **cluster.env()}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_sync_call_returns_and_prints_here(system, capfd):
    fn = rr.function(tasks.add, system=system)
    assert fn(1) == 3
    assert fn(2, b=5) == 7
    out = capfd.readouterr().out
    assert "adding 1 and 2" in out and "adding 2 and 5" in out


def test_a_failing_call_raises_the_functions_own_exception(system):
    with pytest.raises(tasks.CustomError, match="boom"):
        rr.function(tasks.fail, system=system)("boom")


def test_run_handles_and_their_folders(system, runs_root):
    name = f"add-{uuid.uuid4().hex[:6]}"
    run = rr.function(tasks.add, system=system).run(4, run_name=name)
    assert run.result(timeout=60) == 6
    assert run.status is rr.RunStatus.COMPLETED
    folder = runs_root / name
    assert {"config.json", "function.pkl", "inputs.pkl", "result.pkl"} <= set(os.listdir(folder))
    assert (folder / "stdout.log").read_text() == "adding 4 and 2\n"
    assert run.stdout() == "adding 4 and 2\n"
    # Reading it needs no Ray: a storage system on the same folder reads it whole.
    assert rr.run(path=str(folder)).result() == 6


def test_get_or_call_executes_once_by_name_and_by_content(system, marker):
    fn = rr.function(tasks.record_call, system=system)
    name = f"cached-{uuid.uuid4().hex[:6]}"
    assert fn.get_or_call(marker, 5, run_name=name) == 10
    assert fn.get_or_call(marker, 5, run_name=name) == 10
    assert tasks.executions(marker) == 1
    cached = rr.function(tasks.record_call, system=system, cache=True)
    assert cached.get_or_call(marker, 7) == 14
    assert cached.get_or_call(marker, 7) == 14
    assert tasks.executions(marker) == 2
    run = cached.get_or_run(marker, 7)
    assert run.status is rr.RunStatus.COMPLETED and tasks.executions(marker) == 2


def test_map_keeps_input_order(system):
    fn = rr.function(tasks.identity, system=system)
    assert fn.map(range(300), progress=False) == list(range(300))


def test_resources_pin_a_function_to_a_node(system):
    where = rr.function(tasks.ray_node, system=system)
    on_a = where.options(resources={"custom": {"node_a": 0.01}})()
    on_b = where.to(system, resources={"custom": {"node_b": 0.01}})()
    assert on_a != on_b
    pinned = rr.function(tasks.ray_node, system=system, resources={"custom": {"node_b": 0.01}})
    run = pinned.run(run_name=f"pinned-{uuid.uuid4().hex[:6]}")
    assert run.result(timeout=60) == on_b


def test_follow_logs_then_cancel_stops_the_task(system, scratch):
    pidfile = scratch / "pid"
    fn = rr.function(tasks.note_pid_then_sleep, system=system)
    run = fn.run(str(pidfile), 120, run_name=f"cancel-{uuid.uuid4().hex[:6]}")
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert run.status is rr.RunStatus.RUNNING
    assert run.cancel() is rr.RunStatus.CANCELLED
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "the task's process survived cancel"
        time.sleep(0.05)
    assert system.get_run(run.name).status is rr.RunStatus.CANCELLED
    with pytest.raises(rr.RunCancelledError):
        run.result()


def test_logs_follow_yields_lines_as_they_come(system):
    run = rr.function(tasks.print_slowly, system=system).run(
        3, 0.3, run_name=f"slow-{uuid.uuid4().hex[:6]}"
    )
    lines = list(run.logs(follow=True, poll=0.05))
    assert lines == ["line 0\n", "line 1\n", "line 2\n"]
    assert run.result() == 3


def test_a_killed_worker_is_a_lost_run_never_retried(system, scratch, marker):
    pidfile = scratch / "pid"
    fn = rr.function(tasks.count_then_sleep, system=system)
    run = fn.run(marker, str(pidfile), run_name=f"killed-{uuid.uuid4().hex[:6]}")
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(int(pidfile.read_text()), 9)
    with pytest.raises(rr.WorkerLostError, match="worker lost"):
        run.result(timeout=60)
    assert run.status is rr.RunStatus.FAILED
    time.sleep(2)  # Ray would have retried by now
    assert tasks.executions(marker) == 1


def test_current_run_metrics_and_lineage_inside_a_task(system):
    run = rr.function(tasks.log_some_metrics, system=system).run(
        run_name=f"metrics-{uuid.uuid4().hex[:6]}"
    )
    assert "must be a number" in run.result(timeout=60)
    assert run.metrics["loss"] == [0.5, 0.25] and run.metrics["acc"] == 0.9
    assert run.tags == {"kind": "toy"}
    parent = rr.function(tasks.start_child_on, system=system).run(
        system, run_name=f"parent-{uuid.uuid4().hex[:6]}"
    )
    child_name = parent.result(timeout=60)
    assert [c.name for c in parent.children()] == [child_name]


def test_commands_run_on_the_cluster(system, capfd):
    results = system.run(["echo hello from ray"])
    assert results[0][0] == 0 and "hello from ray" in results[0][1]


def test_runs_move_and_are_read_without_ray(system, tmp_path):
    run = rr.function(tasks.add, system=system).run(10, run_name=f"move-{uuid.uuid4().hex[:6]}")
    run.wait(timeout=60)
    here = run.to("here")
    assert here.result() == 12
    listed = subprocess.run(
        [sys.executable, "-m", "remoterun.cli", "ls", str(Path(run.url.split("://", 1)[1]).parent)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    )
    assert listed.returncode == 0, listed.stderr
    assert run.name in listed.stdout and "COMPLETED" in listed.stdout
    folder = run.url.split("://", 1)[1]
    for command, expected in (("show", "COMPLETED"), ("logs", "adding 10 and 2")):
        shown = subprocess.run(
            [sys.executable, "-m", "remoterun.cli", command, folder],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        )
        assert shown.returncode == 0, shown.stderr
        assert expected in shown.stdout


def test_racing_drivers_execute_a_name_once(cluster, runs_root, marker):
    name = f"race-{uuid.uuid4().hex[:6]}"
    fn = "rr.function(tasks.record_call, system=system)"
    code = f"print({fn}.get_or_call({marker!r}, 3, 1.0, run_name={name!r}))"
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", _script(cluster, runs_root, code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **cluster.env()},
        )
        for _ in range(3)
    ]
    outs = [d.communicate(timeout=180) for d in drivers]
    for (out, err), d in zip(outs, drivers):
        assert d.returncode == 0, err
        assert out.strip().splitlines()[-1] == "6"
    assert tasks.executions(marker) == 1


def test_a_run_outlives_the_driver_that_started_it(cluster, runs_root, system, scratch):
    gate = scratch / "gate"
    name = f"detached-{uuid.uuid4().hex[:6]}"
    started = _driver(
        cluster,
        runs_root,
        "fn = rr.function(tasks.wait_for_file, system=system)\n"
        f"run = fn.run({str(gate)!r}, 120, run_name={name!r})\n"
        "print(run.status)\n",
    )
    assert started.returncode == 0, started.stderr
    assert "RUNNING" in started.stdout
    gate.touch()  # the driver is gone; the run goes on and finishes
    assert system.get_run(name).wait(timeout=60) is rr.RunStatus.COMPLETED


def test_an_s3_run_root(cluster, moto_server, s3):
    system = rr.ray(
        cluster.address, runs=f"{s3}/ray-runs", storage_options=moto_server.storage_options()
    )
    fn = rr.function(tasks.add, system=system)
    run = fn.run(20, run_name="on-s3")
    assert run.result(timeout=60) == 22
    assert run.stdout() == "adding 20 and 2\n"
    assert fn.get_or_call(20, run_name="on-s3") == 22
    assert (
        rr.run(path=f"{s3}/ray-runs/on-s3", storage_options=moto_server.storage_options()).result()
        == 22
    )


def test_a_ray_run_moves_to_s3_and_is_read_there(system, moto_server, s3):
    run = rr.function(tasks.add, system=system).run(30, run_name=f"to-s3-{uuid.uuid4().hex[:6]}")
    assert run.result(timeout=60) == 32
    options = moto_server.storage_options()
    copy = run.to(f"{s3}/copies", storage_options=options)
    assert copy.url == f"{s3}/copies/{run.name}"
    assert rr.run(path=copy.url, storage_options=options).result() == 32


def _script(cluster, runs_root, code: str) -> str:
    return (
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import remoterun as rr, remote_tasks as tasks\n"
        f"system = rr.ray({cluster.address!r}, runs={str(runs_root)!r})\n" + code + "\n"
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_without_an_address_a_local_ray_is_started(tmp_path):
    # In a process of its own: Ray allows one cluster per driver process.
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import remoterun as rr, remote_tasks as tasks\n"
        f"system = rr.ray(runs={str(tmp_path / 'runs')!r})\n"
        "print(rr.function(tasks.add, system=system)(1))\n"
        "import ray\n"
        "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # Ray writes ~/.ray: not the user's
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["3", "['127.0.0.1']"]


def test_a_slow_calls_output_is_printed_as_it_comes(system, monkeypatch):
    # A line printed, then a pause: the line is here before the call returns.
    seen: list[tuple[float, str]] = []

    class Recorder:
        def write(self, text: str) -> None:
            seen.append((time.monotonic(), text))

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    started = time.monotonic()
    assert rr.function(tasks.print_slowly, system=system)(2, 1.0) == 2
    ended = time.monotonic()
    monkeypatch.undo()
    assert "".join(text for _, text in seen) == "line 0\nline 1\n"
    assert seen[0][0] - started < ended - started - 0.5, "the first line came only at the end"


def test_ctrl_c_during_a_call_stops_the_task(cluster, runs_root, scratch):
    pidfile = scratch / "pid"
    code = (
        "import time\n"
        "try:\n"
        f"    rr.function(tasks.note_pid_then_sleep, system=system)({str(pidfile)!r}, 120)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "time.sleep(60)\n"  # the driver lives on: only the call must end
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", _script(cluster, runs_root, code)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **cluster.env()},
    )
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        driver.send_signal(2)  # SIGINT, as Ctrl-C
        assert driver.stdout.readline().strip() == "interrupted"
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, "the task went on after Ctrl-C"
            time.sleep(0.05)
    finally:
        driver.kill()
        driver.wait()


# Last in this module: it takes the second node down for the rest of the session.
def test_a_lost_node_fails_its_run_as_worker_lost(cluster, system, scratch):
    pidfile = scratch / "pid"
    on_b = rr.function(
        tasks.note_pid_then_sleep, system=system, resources={"custom": {"node_b": 0.01}}
    )
    run = on_b.run(str(pidfile), 120, run_name=f"node-{uuid.uuid4().hex[:6]}")
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    cluster.kill_worker_node()
    with pytest.raises(rr.WorkerLostError, match="worker lost"):
        run.result(timeout=90)
    assert system.get_run(run.name).status is rr.RunStatus.FAILED


def test_large_arguments_and_awaited_calls(system):
    data = os.urandom(1 << 20) * 3  # past the size that travels beside the pickle
    length = rr.function(tasks.length, system=system)
    assert length(data) == len(data)
    assert asyncio.run(length.acall(data)) == len(data)
    assert asyncio.run(rr.function(tasks.async_add, system=system).acall(1)) == 3


def test_cancelling_an_awaited_call_cancels_its_task(system, scratch):
    pid = asyncio.run(asyncio.wait_for(cancel_an_awaited_sleeper(system, scratch / "pid"), 120))
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "the cancelled call's task still runs"
        time.sleep(0.05)
