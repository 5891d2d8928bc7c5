"""The installed ``remoterun`` command, run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import remote_tasks as tasks
from conftest import client_env, make_cluster

import remoterun as rr

COMMAND = str(Path(sys.executable).parent / "remoterun")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, env=client_env(), timeout=timeout
    )


def test_ls_show_and_logs_here():
    rr.function(tasks.record_call)(os.devnull, 3, run_name="listed")
    with pytest.raises(tasks.CustomError):
        rr.function(tasks.fail)("no luck", run_name="broken")
    done = cli("ls")
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert lines[0] == ["name", "status", "function", "start", "duration", "size"]
    rows = {row[0]: row for row in lines[1:]}
    assert rows["listed"][1:3] == ["COMPLETED", "record_call"]
    assert rows["broken"][1] == "FAILED"
    assert rows["listed"][5].endswith("B")
    shown = cli("show", "listed")
    assert shown.returncode == 0 and "status    COMPLETED" in shown.stdout
    as_json = json.loads(cli("show", "listed", "--json").stdout)
    assert as_json["name"] == "listed" and as_json["fn_name"] == "record_call"
    assert cli("logs", "listed").stdout == "executing with 3\n"
    failed = cli("show", "broken")
    assert failed.returncode == 1 and "no luck" in failed.stdout


def test_not_found_and_usage_errors_have_their_exit_codes():
    missing = cli("show", "nothing-here")
    assert missing.returncode == 1
    assert "no run named 'nothing-here'" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert cli("show").returncode == 2  # RUN is required
    unknown = cli("ls", "nosuchcluster")
    assert unknown.returncode == 2 and "cluster.save()" in unknown.stderr
    bad_name = cli("show", "../etc")
    assert bad_name.returncode == 1 and "Traceback" not in bad_name.stderr


def test_logs_follow_then_cancel(scratch):
    gate = scratch / "gate"
    run = rr.function(tasks.wait_for_file).run(str(gate), run_name="followed")
    follower = subprocess.Popen(
        [COMMAND, "logs", "-f", "followed"], stdout=subprocess.PIPE, text=True, env=client_env()
    )
    assert follower.stdout.readline() == "started\n"  # while the run is going
    gate.touch()
    rest, _ = follower.communicate(timeout=30)
    assert rest == "saw the file\n" and follower.returncode == 0
    assert run.result() == "finished"

    sleeper = rr.function(tasks.sleep_for).run(60, run_name="stopped")
    done = cli("cancel", "stopped")
    assert done.returncode == 0 and "CANCELLED" in done.stdout
    assert sleeper.status is rr.RunStatus.CANCELLED


def test_cp_to_s3_and_back_and_rm(s3, tmp_path):
    rr.function(tasks.add)(1, run_name="travel")
    up = cli("cp", "travel", f"{s3}/runs")
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"{s3}/runs/travel"
    listed = cli("ls", f"{s3}/runs")
    assert "travel\tCOMPLETED" in listed.stdout
    down = cli("cp", f"{s3}/runs/travel", str(tmp_path / "back"))
    assert down.returncode == 0, down.stderr
    assert rr.run(path=str(tmp_path / "back" / "travel")).result() == 3
    again = cli("cp", "travel", f"{s3}/runs")  # the same run: brought up to date
    assert again.returncode == 0
    assert cli("rm", "-s", f"{s3}/runs", "travel").returncode == 0
    assert cli("show", f"{s3}/runs/travel").returncode == 1


def test_saved_cluster_by_name(ssh_server):
    cluster = make_cluster(ssh_server, name="saved-box", env={"API_TOKEN": "hush", "MODE": "x"})
    rr.function(tasks.add, system=cluster)(2, run_name="remote-one")
    path = cluster.save()
    saved = json.loads(Path(path).read_text())
    assert saved["env"] == {"MODE": "x"}  # a secret-looking variable is not written
    assert saved["key"] == str(ssh_server.client_key_path)
    cluster.close()
    loaded = rr.cluster("saved-box")
    assert loaded.get_run("remote-one").result() == 4
    loaded.close()
    listed = cli("ls", "saved-box")
    assert listed.returncode == 0 and "remote-one\tCOMPLETED" in listed.stdout
    answered = cli("clusters")
    assert "saved-box" in answered.stdout and "answers" in answered.stdout
    assert cli("cp", "-s", "saved-box", "remote-one", "here").returncode == 0
    assert rr.local().get_run("remote-one").result() == 4


def test_graph_of_a_pipeline_block(remoterun_home):
    make = rr.function(tasks.make_list, cache=True)
    add_up = rr.function(tasks.total, cache=True)
    with rr.run(name="pipeline"):
        add_up.get_or_call(make.get_or_run(3))
    done = cli("graph", "pipeline")
    assert done.returncode == 0, done.stderr
    assert "pipeline [context, COMPLETED]" in done.stdout
    assert "pipeline --produced--> make_list-" in done.stdout
    assert "--used by--> total-" in done.stdout
    dot = cli("graph", "pipeline", "--dot")
    assert dot.stdout.startswith("digraph runs {") and dot.stdout.count(" -> ") == 3
