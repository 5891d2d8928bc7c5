"""Moving runs: run.to() between this machine, SSH clusters, S3 and any fsspec URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import remote_tasks as tasks
from conftest import SSH_PARAMS, client_env, make_cluster, transport_of

import remoterun as rr
from remoterun import folder as folder_module


def _make_run(system, marker: str) -> rr.Run:
    """A run with one earlier (failed) attempt, output and a result."""
    fn = rr.function(tasks.fail_then_succeed, system=system)
    with pytest.raises(tasks.CustomError):
        fn(marker, run_name="trip")
    assert fn.get_or_call(marker, run_name="trip") == "second attempt"
    return system.get_run("trip")


def _same_run(copy: rr.Run, original: rr.Run) -> None:
    assert copy.url != original.url
    assert copy.config == original.config
    assert copy.result() == "second attempt"
    assert copy.inputs() == original.inputs()
    assert copy.stdout() == original.stdout()
    assert [a.status for a in copy.attempts()] == [rr.RunStatus.FAILED]
    with pytest.raises(tasks.CustomError, match="first attempt fails"):
        copy.attempts()[0].result()


@pytest.mark.parametrize("where", ["here", "s3", "memory", *SSH_PARAMS])
def test_copy_from_every_system_to_every_place(system, marker, where, request, tmp_path):
    original = _make_run(system, marker)
    if where == "here":
        copy = original.to("here")
        assert copy.url.startswith("file://")
    elif where == "s3":
        bucket = request.getfixturevalue("s3")
        copy = original.to("s3", path=f"{bucket[5:]}/team/trip")
        assert copy.url == f"{bucket}/team/trip"
        # Loaded from S3 alone, with no system at all.
        loaded = rr.run(path=f"{bucket}/team/trip")
        assert loaded.status is rr.RunStatus.COMPLETED
        _same_run(loaded, original)
        assert "".join(loaded.logs()) == original.stdout()
    elif where == "memory":
        copy = original.to(f"memory://{tmp_path.name}/runs")
        assert copy.url.endswith(f"{tmp_path.name}/runs/trip")
    else:
        other = make_cluster(request.getfixturevalue("ssh_server"), transport=transport_of(where))
        copy = original.to(other)
        assert copy.url.startswith("ssh://")
        assert other.get_run("trip").result() == "second attempt"
        request.addfinalizer(other.close)
    _same_run(copy, original)


@pytest.mark.parametrize("to", ["here", *SSH_PARAMS])
def test_copy_from_s3_to_executing_systems(s3, marker, to, request):
    original = _make_run(rr.local(), marker)
    in_s3 = original.to(f"{s3}/runs/trip")
    assert in_s3.url == f"{s3}/runs/trip"
    if to == "here":
        target = rr.LocalSystem(root=str(request.getfixturevalue("tmp_path") / "elsewhere"))
    else:
        target = make_cluster(request.getfixturevalue("ssh_server"), transport=transport_of(to))
        request.addfinalizer(target.close)
    copy = rr.run(path=f"{s3}/runs/trip").to(target)
    _same_run(copy, original)
    # The copy is a cache hit where it landed: nothing executes again.
    fn = rr.function(tasks.fail_then_succeed, system=target)
    assert fn.get_or_call(marker, run_name="trip") == "second attempt"
    assert tasks.executions(marker) == 2


def test_a_running_run_is_copied_only_when_waited_for(system, scratch):
    gate = scratch / "gate"
    run = rr.function(tasks.wait_for_file, system=system).run(str(gate), run_name="busy")
    with pytest.raises(rr.RunNotFinishedError, match="wait=True"):
        run.to("here")
    gate.touch()
    copy = run.to("here", wait=True)
    assert copy.result() == "finished"


def test_another_run_of_the_name_is_kept_unless_overwrite(tmp_path):
    here = rr.local()
    other = rr.LocalSystem(root=str(tmp_path / "other"))
    rr.function(tasks.add, system=here)(1, run_name="same")
    rr.function(tasks.add, system=other)(5, run_name="same")
    with pytest.raises(rr.RunExistsError, match="overwrite=True"):
        other.get_run("same").to(here)
    assert here.get_run("same").result() == 3
    copied = other.get_run("same").to(here, overwrite=True)
    assert copied.result() == 7
    # Copying the same run again brings it up to date and is not refused.
    assert other.get_run("same").to(here).result() == 7


def test_an_interrupted_copy_never_looks_like_a_run(tmp_path, monkeypatch):
    run_ = rr.function(tasks.add)(1, run_name="half")
    del run_
    copied: list[str] = []
    real_copy = folder_module._copy_file

    def copy_then_fail(src_fs, src, dst_fs, dst, **options):
        if copied:
            raise OSError("disk full")
        copied.append(dst)
        return real_copy(src_fs, src, dst_fs, dst, **options)

    monkeypatch.setattr(folder_module, "_copy_file", copy_then_fail)
    target = tmp_path / "dest"
    with pytest.raises(rr.RunStorageError, match="disk full"):
        rr.local().get_run("half").to(str(target))
    assert len(copied) == 1 and Path(copied[0]).exists()  # a file did arrive...
    assert not (target / "half" / "config.json").exists()  # ...but no record
    with pytest.raises(rr.RunNotFoundError):
        rr.run(path=str(target / "half")).result(timeout=1)
    monkeypatch.setattr(folder_module, "_copy_file", real_copy)
    assert rr.local().get_run("half").to(str(target)).result() == 3


def test_bad_destinations_say_what_to_do(s3):
    rr.function(tasks.add)(1, run_name="lost")
    run = rr.local().get_run("lost")
    with pytest.raises(rr.MissingExtraError, match="nosuch"):
        run.to("nosuch://bucket/lost")
    with pytest.raises(rr.RunStorageError, match="no-such-bucket-rr"):
        run.to("s3://no-such-bucket-rr/runs/lost")
    with pytest.raises(rr.RemoterunError, match="path="):
        run.to("s3")
    with pytest.raises(rr.RemoterunError, match="last part must be the run's name"):
        run.to("here", path=str(Path(os.environ["REMOTERUN_HOME"]) / "x" / "other"))


def test_copy_keeps_the_record_byte_for_byte(tmp_path):
    rr.function(tasks.add)(1, run_name="exact")
    original = rr.local().get_run("exact")
    copy = original.to(str(tmp_path / "exact"))
    src = Path(original.folder.path, "config.json").read_bytes()
    assert (tmp_path / "exact" / "config.json").read_bytes() == src
    assert json.loads(src)["status"] == "COMPLETED"
    assert copy.url == f"file://{tmp_path}/exact"


def test_a_host_that_reaches_s3_copies_without_the_client(
    ssh_server, moto_server, s3, marker, caplog, tmp_path
):
    import sysconfig

    # The host's Python with fsspec and s3fs: this machine's packages, which the test
    # user may read (the interpreter of this venv lives where that user may not).
    cluster = make_cluster(
        ssh_server,
        python="/usr/bin/python3",
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"]},
    )
    try:
        original = _make_run(cluster, marker)
        with caplog.at_level("DEBUG", logger="remoterun"):
            copy = original.to(f"{s3}/direct/trip", storage_options=moto_server.storage_options())
        assert "copied trip to" in caplog.text and "itself" in caplog.text
        assert "through this process" not in caplog.text  # no bytes through the client
        _same_run(copy, original)
        # Another run of the name there is refused from the host as it is from here.
        options = moto_server.storage_options()
        rr.function(tasks.add, system=rr.LocalSystem(root=str(tmp_path / "o")))(1, run_name="trip")
        rr.LocalSystem(root=str(tmp_path / "o")).get_run("trip").to(f"{s3}/taken/trip")
        with pytest.raises(rr.RunExistsError, match="overwrite=True"):
            original.to(f"{s3}/taken/trip", storage_options=options)
    finally:
        cluster.close()


def test_a_host_without_s3fs_has_the_client_copy(ssh_server, s3, marker, caplog):
    cluster = make_cluster(ssh_server)  # a bare Python: no fsspec there
    try:
        original = _make_run(cluster, marker)
        with caplog.at_level("DEBUG", logger="remoterun"):
            copy = original.to(f"{s3}/streamed/trip")
        assert "streaming through this client" in caplog.text
        assert "ModuleNotFoundError" in caplog.text
        _same_run(copy, original)
    finally:
        cluster.close()


def test_no_credentials_names_the_bucket_and_the_profile(moto_server, tmp_path):
    env = client_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    env.update(
        REMOTERUN_HOME=str(tmp_path / "home"),
        AWS_ENDPOINT_URL=moto_server.endpoint_url,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",  # never ask an instance metadata address
        AWS_PROFILE="team",
    )
    code = (
        "import remoterun as rr, remote_tasks as t\n"
        "rr.function(t.add)(1, run_name='nocred')\n"
        "try:\n"
        "    rr.local().get_run('nocred').to('s3://locked-bucket/runs')\n"
        "except rr.RunStorageError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "s3://locked-bucket/runs/nocred" in done.stdout, done.stderr
    assert "profile" in done.stdout and "team" in done.stdout
