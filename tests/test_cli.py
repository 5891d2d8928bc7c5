"""The installed ``remoterun`` command, run as a subprocess."""

from __future__ import annotations

import importlib.util
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


def test_ls_limit_reads_the_first_names_only(remoterun_home):
    for i in range(4):
        rr.function(tasks.add)(i, run_name=f"lim-{i}")
    runs = remoterun_home / "runs"
    # a damaged record past the limit is never read, so it is not reported either
    (runs / "lim-9").mkdir()
    (runs / "lim-9" / "config.json").write_text("{not json")
    listed = cli("ls", "--limit", "2", "--no-size")
    assert listed.returncode == 0
    names = [line.split("\t")[0] for line in listed.stdout.splitlines()[1:]]
    assert names == ["lim-0", "lim-1"] and listed.stderr == ""
    everything = cli("ls", "--no-size")
    assert "lim-3" in everything.stdout and "lim-9" in everything.stderr
    assert cli("ls", "--limit", "0").returncode == 2


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


def one_line_error(done: subprocess.CompletedProcess, code: int = 1) -> str:
    """The command's error, checked to be one line on stderr (never a traceback)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 or (code == 2 and lines[-1].startswith("Error: ")), done.stderr
    return lines[-1]


def plant(folder: Path, record: object) -> Path:
    folder.mkdir(parents=True)
    text = record if isinstance(record, str) else json.dumps(record)
    (folder / "config.json").write_text(text)
    (folder / "precious.txt").write_text("keep me")
    return folder


def test_rm_removes_only_what_is_plainly_a_run(remoterun_home, tmp_path):
    runs = remoterun_home / "runs"
    rr.function(tasks.add)(1, run_name="real")
    # Folders that are not runs, though their config.json looks a bit like a record.
    not_runs = {
        "says-completed": ({"status": "COMPLETED"}, "no name, run_type field"),
        "any-json": ({"hello": "world"}, "no name, status, run_type field"),
        "other-name": (
            {"name": "real", "status": "COMPLETED", "run_type": "function"},
            "of the run 'real', not 'other-name'",
        ),
        "banana": (
            {"name": "banana", "status": "BANANA", "run_type": "function"},
            "unknown status 'BANANA'",
        ),
        "a-list": ([1, 2], "holds list"),
        "bad-json": ('{"name": "bad-json", ', "not valid JSON"),
    }
    for name, (record, _) in not_runs.items():
        plant(runs / name, record)
    outside = plant(tmp_path / "project", {"name": "project", "status": "COMPLETED"})
    (runs / "notes.txt").write_text("hi\n")
    (runs / "no-record").mkdir()
    for name, (_, why) in not_runs.items():
        for args in (["rm", name], ["rm", "--force", name], ["rm", str(runs / name)]):
            line = one_line_error(cli(*args))
            assert f"{name} is not a run: " in line and why in line, (args, line)
            assert line.endswith("nothing was removed")
        assert (runs / name / "precious.txt").exists()
        shown = one_line_error(cli("show", name))
        assert why in shown
    assert "it is a file" in one_line_error(cli("rm", "--force", "notes.txt"))
    assert (runs / "notes.txt").read_text() == "hi\n"
    assert "no config.json" in one_line_error(cli("rm", "--force", str(runs / "no-record")))
    assert (runs / "no-record").is_dir()
    assert "not a run" in one_line_error(cli("rm", "--force", str(outside)))
    assert (outside / "precious.txt").exists()
    assert "no run" in one_line_error(cli("rm", "nothing-here"))
    done = cli("rm", "real")
    assert done.returncode == 0 and not (runs / "real").exists()
    left = sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
    assert left == sorted([*not_runs, "notes.txt", "no-record"])


def test_rm_force_overrides_running_only(scratch):
    gate = scratch / "gate"
    run = rr.function(tasks.wait_for_file).run(str(gate), run_name="busy")
    refused = one_line_error(cli("rm", "busy"))
    assert "is RUNNING" in refused and "--force" in refused
    assert run.folder.files.exists(run.folder.path)
    gate.touch()
    run.wait(timeout=30)
    done = cli("rm", "--force", "busy")
    assert done.returncode == 0 and not run.folder.files.exists(run.folder.path)


def test_bad_urls_and_stores_give_one_line_and_an_exit_code(s3, tmp_path):
    from servers import free_port

    closed = free_port()  # nothing listens there
    unknown = one_line_error(cli("ls", "nosuch://x/y"), code=2)
    assert "'nosuch' is not a protocol" in unknown
    assert "Connection refused" in one_line_error(cli("ls", f"ftp://127.0.0.1:{closed}/runs"))
    assert f"port {closed}" in one_line_error(cli("ls", f"ssh://127.0.0.1:{closed}/runs"))
    assert "cannot open" in one_line_error(cli("show", f"ftp://127.0.0.1:{closed}/runs/x"))
    if importlib.util.find_spec("gcsfs") is None:  # a protocol whose package is missing
        assert "gcsfs" in one_line_error(cli("ls", "gs://bucket/runs"))
    missing = one_line_error(cli("ls", "s3://rr-no-such-bucket/runs"))
    assert "no bucket 'rr-no-such-bucket'" in missing
    rr.function(tasks.add)(1, run_name="stored")
    assert cli("cp", "stored", f"{s3}/runs").returncode == 0


def test_s3_without_credentials_gives_one_line(s3, tmp_path):
    rr.function(tasks.add).run(1, run_name="stored").to(f"{s3}/runs", wait=True)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    env = client_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(key, None)
    # The endpoint stays the moto server's; no credentials anywhere, and botocore must
    # not ask an instance-metadata address for some.
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_CONFIG_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
    )
    for args in (
        ["ls", f"{s3}/runs"],
        ["show", "stored", "-s", f"{s3}/runs"],
        ["logs", f"{s3}/runs/stored"],
        ["rm", "-s", f"{s3}/runs", "stored"],
    ):
        done = subprocess.run([COMMAND, *args], capture_output=True, text=True, env=env)
        line = one_line_error(done)
        assert "credentials" in line.lower() or "access" in line.lower(), (args, line)
    assert cli("show", "stored", "-s", f"{s3}/runs").returncode == 0  # still there


def test_every_run_command_takes_an_object_store_as_system(s3, tmp_path):
    store = f"{s3}/runs"
    rr.function(tasks.record_call).run(os.devnull, 5, run_name="kept").to(store, wait=True)
    shown = cli("show", "kept", "-s", store)
    assert shown.returncode == 0, shown.stderr
    assert f"url       {store}/kept" in shown.stdout
    assert cli("logs", "kept", "-s", store).stdout == "executing with 5\n"
    assert cli("graph", "kept", "-s", store).stdout.startswith("kept [record_call, COMPLETED]")
    copied = cli("cp", "-s", store, "kept", str(tmp_path / "copies"))
    assert copied.returncode == 0, copied.stderr
    assert rr.run(path=str(tmp_path / "copies" / "kept")).status is rr.RunStatus.COMPLETED
    refused = one_line_error(cli("cancel", "kept", "-s", store))
    assert "only stores runs" in refused and store in refused
    assert cli("rm", "-s", store, "kept").returncode == 0
    assert "no run named 'kept'" in one_line_error(cli("show", "kept", "-s", store))


def test_keygen_writes_a_private_key_that_signing_uses(remoterun_home, monkeypatch):
    from remoterun.agent import integrity

    monkeypatch.delenv(integrity.KEY_ENV, raising=False)
    done = cli("keygen")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == remoterun_home / "signing.key"
    assert "share this file with your team" in done.stderr and "never commit" in done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    key = path.read_text().strip()
    assert integrity.signing_key() == key.encode()
    again = one_line_error(cli("keygen"))
    assert str(path) in again and "--force" in again
    assert path.read_text().strip() == key  # not overwritten
    replaced = cli("keygen", "--force")
    assert replaced.returncode == 0 and path.read_text().strip() != key
    assert path.stat().st_mode & 0o777 == 0o600
    elsewhere = remoterun_home / "team" / "key"
    assert cli("keygen", "--path", str(elsewhere)).returncode == 0
    assert elsewhere.stat().st_mode & 0o777 == 0o600
