"""Listing runs survives what is not a run: on this machine, on an SSH cluster and on S3,
through ``System.runs()`` and through ``remoterun ls``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import remote_tasks as tasks
from conftest import SSH_PARAMS, client_env, make_cluster, transport_of

import remoterun as rr
from remoterun.systems.storage import StorageSystem

COMMAND = str(Path(sys.executable).parent / "remoterun")

# What a runs root may hold besides runs: name -> (files in it, or None for a plain file),
# and the words of the warning that says why it was skipped.
NOT_RUNS = {
    "notes.txt": (None, "a file, not a run folder"),
    "no-record": ({"stdout.log": b"hello\n"}, "no config.json"),
    "bad-json": ({"config.json": b'{"name": "bad-json", "status": '}, "not valid JSON"),
    "not-utf8": ({"config.json": b"\xff\xfe\x00garbage"}, "not valid JSON"),
    "a-list": ({"config.json": b"[1, 2, 3]"}, "holds list"),
    "other-name": (
        {"config.json": b'{"name": "someone-else", "status": "COMPLETED", "run_type": "x"}'},
        "of the run 'someone-else'",
    ),
    "banana": (
        {"config.json": b'{"name": "banana", "status": "BANANA", "run_type": "function"}'},
        "unknown status 'BANANA'",
    ),
    "foreign": ({"config.json": b'{"status": "COMPLETED"}'}, "no name"),
}


@pytest.fixture(params=["local", *SSH_PARAMS, "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """``(system, what the command line calls it)``, holding one run named ``good``."""
    if request.param == "local":
        system = rr.local()
        rr.function(tasks.add, system=system)(1, run_name="good")
        yield system, "here"
        return
    if request.param in SSH_PARAMS:
        system = make_cluster(
            request.getfixturevalue("ssh_server"),
            name="listing-box",
            transport=transport_of(request.param),
        )
        rr.function(tasks.add, system=system)(1, run_name="good")
        system.save()
        yield system, "listing-box"
        root = system.root
        system.close()
        shutil.rmtree(root, ignore_errors=True)
        return
    url = request.getfixturevalue("s3") + "/runs"
    rr.function(tasks.add).run(1, run_name="good").to(url, wait=True)
    yield StorageSystem(url), url


def plant_not_runs(system) -> None:
    fs, root = system.filesystem(), system.root
    for name, (files, _) in NOT_RUNS.items():
        if files is None:
            fs.pipe_file(f"{root}/{name}", b"hi\n")
            continue
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        for filename, data in files.items():
            fs.pipe_file(f"{root}/{name}/{filename}", data)


def test_runs_skips_what_is_not_a_run_and_says_so(store, caplog):
    system, _ = store
    plant_not_runs(system)
    asked = []
    if system.executes:  # count the requests a listing makes about each run
        for host in getattr(system, "hosts", [system]):
            status = host.status
            host.status = lambda name, _status=status, **kw: (
                asked.append(name) or _status(name, **kw)
            )
    with caplog.at_level(logging.WARNING, logger="remoterun"):
        runs = system.runs()
        listed = {run.name: run.config for run in runs}
    assert list(listed) == ["good"]
    assert listed["good"]["status"] == "COMPLETED"
    assert "good" not in asked  # the record came with the listing, no request per run
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, (_, why) in NOT_RUNS.items():
        said = [w for w in warnings if f"/{name}: " in w]
        assert len(said) == 1 and why in said[0], (name, warnings)
    assert runs[0].result() == 3


def test_ls_lists_the_runs_and_reports_each_skipped_entry(store):
    system, spec = store
    plant_not_runs(system)
    done = subprocess.run(
        [COMMAND, "ls", spec], capture_output=True, text=True, env=client_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()[1:]]
    assert [row[:3] for row in rows] == [["good", "COMPLETED", "add"]]
    assert rows[0][5].endswith("B")  # its size, from the one listing of the root
    notes = done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    assert len(notes) == len(NOT_RUNS), notes
    for name, (_, why) in NOT_RUNS.items():
        assert any(
            line.startswith("remoterun: skipped ") and f"/{name}: " in line and why in line
            for line in notes
        ), (name, notes)


def test_a_missing_root_lists_no_runs_but_a_missing_bucket_is_an_error(s3, tmp_path):
    assert StorageSystem(f"{s3}/not-yet").runs() == []
    assert rr.LocalSystem(root=str(tmp_path / "not-yet")).runs() == []
    with pytest.raises(rr.RunStorageError, match="no bucket 'rr-no-such-bucket'"):
        StorageSystem("s3://rr-no-such-bucket/runs").runs()


def test_a_running_run_is_asked_about_so_a_dead_worker_shows(tmp_path):
    system = rr.LocalSystem(root=str(tmp_path / "runs"))
    rr.function(tasks.add, system=system)(1, run_name="gone")
    folder = system.folder("gone")
    config = json.loads(folder.read_record_bytes())
    # A record that says RUNNING, written by a worker that no longer exists.
    config.update(status="RUNNING", end_time=None, pid=2**22 + 1)
    folder.write_record(config)
    (listed,) = system.runs()
    assert listed.config["status"] == "FAILED"
    assert "worker lost" in listed.config["error"]
    system.close()
