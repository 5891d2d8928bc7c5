"""Trust (issue 10): digests before unpickling, signed shared stores, private runs, full
disks and lost workers' leftovers, on this machine and on an SSH host."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import stat
import subprocess
import time
from pathlib import Path

import pytest
import remote_tasks as tasks
from conftest import make_cluster

import remoterun as rr
from remoterun.agent import integrity
from remoterun.folder import fs_of

KEY = "a-team-key-for-the-trust-tests"


def _folder(system, name: str) -> Path:
    return Path(system.root, name)


def _recorded(system, name: str = "kept"):
    fn = rr.function(tasks.make_list, system=system)
    assert fn.get_or_call(5, run_name=name) == [0, 1, 2, 3, 4]
    return fn


# --------------------------------------------------------------------------- digests


def test_every_pickle_has_its_digest_in_the_record(system):
    _recorded(system)
    folder = _folder(system, "kept")
    config = json.loads((folder / "config.json").read_text())
    for filename in ("function.pkl", "inputs.pkl", "result.pkl"):
        data = (folder / filename).read_bytes()
        assert config["digests"][filename] == integrity.digest(data)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flipped", "truncated", "deleted"])
def test_a_damaged_result_is_never_unpickled(system, how):
    fn = _recorded(system)
    _damage(_folder(system, "kept") / "result.pkl", how)
    with pytest.raises(rr.CorruptRunError, match="result.pkl") as info:
        fn.get_or_call(5, run_name="kept")
    assert info.value.filename == "result.pkl"
    assert "Run it again" in str(info.value) and "remoterun rm" in str(info.value)
    with pytest.raises(rr.CorruptRunError):
        system.get_run("kept").result()


def test_damaged_inputs_and_function_are_never_unpickled(system):
    _recorded(system)
    _damage(_folder(system, "kept") / "inputs.pkl", "flipped")
    _damage(_folder(system, "kept") / "function.pkl", "flipped")
    run = system.get_run("kept")
    with pytest.raises(rr.CorruptRunError, match="inputs.pkl"):
        run.inputs()
    with pytest.raises(rr.CorruptRunError, match="function.pkl"):
        run.rerun()


@pytest.mark.parametrize(
    "record", [b"\xff\xfe garbage", b"[1, 2]", b'{"name": "kept", "status": "BANANA"}']
)
def test_an_unreadable_record_says_so_and_running_the_name_again_mends_it(system, record):
    fn = _recorded(system)
    (_folder(system, "kept") / "config.json").write_bytes(record)
    with pytest.raises(rr.CorruptRunError, match="config.json") as info:
        system.get_run("kept")
    assert "kept" in str(info.value)
    with pytest.raises(rr.CorruptRunError, match="config.json"):
        fn.get_or_call(5, run_name="kept")  # never taken for a hit, nor executed unasked
    # Running the name again mends it; the damaged files are kept under attempts/.
    assert fn(5, run_name="kept") == [0, 1, 2, 3, 4]
    assert (_folder(system, "kept") / "attempts" / "1" / "config.json").read_bytes() == record
    assert fn.get_or_call(5, run_name="kept") == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- signatures


class _Planted:
    """A result whose unpickling creates a file: what an attacker would plant."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _plant(store_run: rr.Run, planted_marker: Path) -> None:
    """Replace a stored run's result by a planted one, with a correct digest (anyone
    can compute one), as whoever can write to the bucket could."""
    fs, path = fs_of(store_run.folder.files), store_run.folder.path
    data = pickle.dumps(_Planted(str(planted_marker)))
    config = json.loads(fs.cat_file(f"{path}/config.json"))
    config["digests"]["result.pkl"] = integrity.digest(data)
    fs.pipe_file(f"{path}/result.pkl", data)
    fs.pipe_file(f"{path}/config.json", json.dumps(config).encode())


def test_records_written_with_the_team_key_are_signed(monkeypatch, tmp_path):
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    _recorded(here)
    config = json.loads((tmp_path / "runs" / "kept" / "config.json").read_text())
    assert integrity.signature_problem(config, KEY.encode()) is None
    config["fn_name"] = "other"
    assert "does not match" in integrity.signature_problem(config, KEY.encode())


def test_share_without_a_key_is_refused_naming_the_fix(s3, marker, monkeypatch):
    monkeypatch.delenv("REMOTERUN_SIGNING_KEY", raising=False)
    fn = rr.function(tasks.record_call, share=f"{s3}/team")
    with pytest.raises(rr.SigningKeyError, match="remoterun keygen") as info:
        fn.get_or_call(marker, 1, run_name="prep")
    assert "REMOTERUN_SIGNING_KEY" in str(info.value)
    assert tasks.executions(marker) == 0
    # A team that trusts everyone who can write the bucket says so.
    trusting = rr.function(tasks.record_call, share=f"{s3}/team", share_trust="writers")
    assert trusting.get_or_call(marker, 1, run_name="prep") == 2


@pytest.mark.parametrize("forgery", ["unsigned", "other key", "tampered"])
def test_a_planted_shared_run_is_never_unpickled(s3, tmp_path, monkeypatch, forgery):
    store = f"{s3}/team"
    planted_marker = tmp_path / "planted-code-ran"
    alice = rr.LocalSystem(root=str(tmp_path / "alice"))
    bob = rr.LocalSystem(root=str(tmp_path / "bob"))
    fn = rr.function(tasks.make_list, share=store)
    if forgery != "unsigned":
        monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY if forgery == "tampered" else "x" * 20)
    else:
        monkeypatch.setenv("REMOTERUN_SHARE_TRUST", "writers")
    fn.to(alice).get_or_call(5, run_name="prep")  # published to the store
    monkeypatch.delenv("REMOTERUN_SHARE_TRUST", raising=False)
    stored = rr.run(path=f"{store}/prep")
    _plant(stored, planted_marker)  # "tampered": signed by the team, then changed
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    with pytest.raises(rr.UntrustedRunError) as info:
        fn.to(bob).get_or_call(5, run_name="prep")
    assert f"{store}/prep" in str(info.value)
    with pytest.raises(rr.UntrustedRunError):
        rr.run(path=f"{store}/prep").result()
    assert not planted_marker.exists()
    assert not (tmp_path / "bob" / "prep").exists()


def test_a_shared_run_of_another_function_is_not_a_hit(s3, tmp_path, monkeypatch, marker):
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    store = f"{s3}/team"
    alice = rr.LocalSystem(root=str(tmp_path / "alice"))
    rr.function(tasks.record_call, system=alice, share=store).get_or_call(
        marker, 1, run_name="step"
    )
    assert tasks.executions(marker) == 1
    # Same name, same arguments, another function: executed, not taken from the store.
    other = rr.function(tasks.record_call_again, share=store)
    bob = rr.LocalSystem(root=str(tmp_path / "bob"))
    assert other.to(bob).get_or_call(marker, 1, run_name="step") == ("again", 2)
    assert tasks.executions(marker) == 2


def test_a_signed_copy_reads_back_and_a_changed_one_does_not(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    _recorded(here)
    copy = here.get_run("kept").to(f"{s3}/runs")
    assert rr.run(path=copy.url).result() == [0, 1, 2, 3, 4]
    fs, path = fs_of(copy.folder.files), copy.folder.path
    config = json.loads(fs.cat_file(f"{path}/config.json"))
    config["tags"] = {"changed": True}
    fs.pipe_file(f"{path}/config.json", json.dumps(config).encode())
    with pytest.raises(rr.UntrustedRunError):
        rr.run(path=copy.url).result()
    with pytest.raises(rr.UntrustedRunError):
        rr.run(path=copy.url).to(str(tmp_path / "elsewhere"))


# --------------------------------------------------------------------------- permissions


def test_runs_and_locks_are_private_to_their_owner(system):
    _recorded(system)
    root = Path(system.root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in [root / "kept", *(root / "kept").iterdir(), *(root / ".locks").iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


# --------------------------------------------------------------------------- lost workers


def test_a_lost_worker_leaves_no_process_behind(system, scratch):
    pidfile = scratch / "child.pid"
    run = rr.function(tasks.spawn_sleeper, system=system).run(str(pidfile), run_name="leaver")
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    os.kill(run.config["pid"], 9)  # the worker only: its child lives on in its group
    assert run.wait(timeout=20) is rr.RunStatus.FAILED
    assert "worker lost" in run.config["error"]
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the lost worker's child still runs"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# --------------------------------------------------------------------------- full disks


@pytest.fixture
def small_disk(scratch):
    """A 2 MB tmpfs every test host's user can write to."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = scratch / "small"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=1777", "tmpfs", str(path)], check=True
    )
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_result_that_does_not_fit_fails_the_run_saying_why(system, small_disk, request):
    fn = rr.function(tasks.big_bytes, system=system)
    target = _on_root(system, small_disk, request)
    with pytest.raises(rr.RunStorageError, match="no space left on device") as info:
        fn.to(target)(3 << 20, run_name="huge")
    assert str(small_disk) in str(info.value)
    run = target.get_run("huge")
    assert run.status is rr.RunStatus.FAILED
    assert "no space left on device" in run.config["error"]
    assert not (small_disk / "runs" / "huge" / "result.pkl").exists()
    assert not [p for p in (small_disk / "runs" / "huge").iterdir() if p.name.endswith(".tmp")]
    # The name can be run again once it fits.
    assert len(fn.to(target)(1000, run_name="huge")) == 1000


def test_an_argument_that_does_not_fit_is_refused_before_the_name_is_claimed(
    system, small_disk, request
):
    target = _on_root(system, small_disk, request)
    fn = rr.function(tasks.length, system=target)
    assert fn(b"x" * 10, run_name="arg") == 10
    with pytest.raises(rr.RunStorageError, match="no space left on device|do not fit"):
        fn(b"x" * (3 << 20), run_name="arg")
    run = target.get_run("arg")  # the earlier attempt is still the run of that name
    assert run.status is rr.RunStatus.COMPLETED and run.result() == 10
    assert run.attempts() == []


def _on_root(system, disk: Path, request):
    if isinstance(system, rr.LocalSystem):
        return rr.LocalSystem(root=str(disk / "runs"))
    target = make_cluster(request.getfixturevalue("ssh_server"), root=str(disk / "runs"))
    request.addfinalizer(target.close)
    return target


# --------------------------------------------------------------------------- review cases


def test_a_recycled_pid_is_never_killed_as_a_lost_workers_session():
    from remoterun.agent import procs as worker

    stranger = subprocess.Popen(["setsid", "sleep", "30"])
    try:
        time.sleep(0.2)
        pid = int(subprocess.check_output(["pgrep", "-n", "-f", "^sleep 30$"]).decode())
        recorded = worker.process_start_time(pid) - 1  # the "worker" had this pid before
        lost = {"host": worker.HOSTNAME, "pgid": pid, "pid": pid, "proc_start": recorded}
        worker.kill_leftovers(lost)
        time.sleep(0.2)
        assert _alive(pid)
    finally:
        stranger.kill()
        subprocess.run(["pkill", "-f", "^sleep 30$"], check=False)


def test_a_copy_or_a_tag_never_signs_a_planted_run(s3, tmp_path, monkeypatch):
    store = f"{s3}/team"
    monkeypatch.setenv("REMOTERUN_SHARE_TRUST", "writers")
    rr.function(tasks.make_list, share=store).to(
        rr.LocalSystem(root=str(tmp_path / "alice"))
    ).get_or_call(5, run_name="prep")  # published unsigned
    planted_marker = tmp_path / "planted-code-ran"
    _plant(rr.run(path=f"{store}/prep"), planted_marker)
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    with pytest.raises(rr.UntrustedRunError):
        rr.run(path=f"{store}/prep").to(str(tmp_path / "laundered"))
    with pytest.raises(rr.UntrustedRunError):
        rr.run(path=f"{store}/prep").set_tag("looks", "fine")
    config = json.loads(rr.run(path=f"{store}/prep").folder.read_record_bytes())
    assert "signature" not in config
    assert not planted_marker.exists()


def test_attempts_and_arguments_of_a_run_loaded_by_url_are_checked(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    fn = rr.function(tasks.fail_then_succeed, system=here)
    marker = str(tmp_path / "calls")
    with pytest.raises(tasks.CustomError):
        fn(marker, run_name="twice")
    fn(marker, run_name="twice")
    copy = here.get_run("twice").to(str(tmp_path / "copies"))
    planted_marker = tmp_path / "planted-code-ran"
    attempt = tmp_path / "copies" / "twice" / "attempts" / "1"
    data = pickle.dumps(_Planted(str(planted_marker)))
    (attempt / "error.pkl").write_bytes(data)
    record = json.loads((attempt / "config.json").read_text())
    record["digests"]["error.pkl"] = integrity.digest(data)
    (attempt / "config.json").write_text(json.dumps(record))  # no longer signed
    loaded = rr.run(path=copy.url)
    with pytest.raises(rr.UntrustedRunError):
        loaded.attempts()[0].exception()
    assert not planted_marker.exists()


def test_records_with_int_keys_stay_verifiable(monkeypatch, tmp_path):
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    _recorded(here)
    run = here.get_run("kept")
    run.log_params({"layers": {1: 64, 10: 32, 2: 16}})
    assert rr.run(path=run.url).result() == [0, 1, 2, 3, 4]


def test_runs_recorded_before_digests_still_load_from_own_stores(system):
    fn = _recorded(system)
    path = _folder(system, "kept") / "config.json"
    record = json.loads(path.read_text())
    del record["digests"]
    path.write_text(json.dumps(record))
    assert fn.get_or_call(5, run_name="kept") == [0, 1, 2, 3, 4]
    assert system.get_run("kept").inputs() == {"args": [5], "kwargs": {}}


def test_a_handle_read_before_a_re_execution_is_not_called_damaged(system):
    fn = rr.function(tasks.add, system=system)
    fn(1, run_name="again")
    earlier = system.get_run("again")
    assert earlier.wait() is rr.RunStatus.COMPLETED
    fn(10, run_name="again")
    assert earlier.result() == 12  # the handle follows the name's current attempt


def test_a_removed_runs_root_is_made_again(tmp_path):
    import shutil

    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    fn = rr.function(tasks.add, system=here)
    assert fn(1, run_name="first") == 3
    shutil.rmtree(tmp_path / "runs")
    assert fn(2, run_name="second") == 4


def test_only_a_functions_own_lines_travel_not_the_rest_of_its_file(tmp_path, monkeypatch):
    import importlib

    name = "secretive_" + os.urandom(4).hex()
    (tmp_path / f"{name}.py").write_text(
        'API_TOKEN = "sk-live-do-not-ship"\n\n\ndef shout(x):\n    return x.upper()\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    assert rr.function(module.shout, system=here)("hi", run_name="loud") == "HI"
    function_pkl = (tmp_path / "runs" / "loud" / "function.pkl").read_bytes()
    assert b"return x.upper()" in function_pkl
    assert b"sk-live-do-not-ship" not in function_pkl


def test_a_host_copies_to_s3_itself_and_this_machine_signs_the_record(
    ssh_server, moto_server, s3, caplog, monkeypatch
):
    import sysconfig

    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", KEY)  # this machine's only: not the host's
    cluster = make_cluster(
        ssh_server,
        python="/usr/bin/python3",
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"]},  # fsspec and s3fs there
    )
    try:
        _recorded(cluster)
        with caplog.at_level("DEBUG", logger="remoterun"):
            copy = cluster.get_run("kept").to(
                f"{s3}/signed/kept", storage_options=moto_server.storage_options()
            )
        assert "itself" in caplog.text and "through this process" not in caplog.text
        config = json.loads(copy.folder.read_record_bytes())
        assert integrity.signature_problem(config, KEY.encode()) is None
        assert rr.run(path=copy.url).result() == [0, 1, 2, 3, 4]
    finally:
        cluster.close()


def test_ssh_urls_check_the_host_key(ssh_server):
    cluster = make_cluster(ssh_server)
    try:
        _recorded(cluster)
        url = cluster.get_run("kept").url
        assert url.startswith("ssh://")
        with pytest.raises(rr.HostKeyError, match="known_hosts"):
            rr.run(path=url).status  # noqa: B018 - reading it connects
        trusted = rr.run(
            path=url,
            storage_options={
                "key": str(ssh_server.client_key_path),
                "known_hosts": str(ssh_server.known_hosts_path),
                "python": ssh_server.remote_python(),
            },
        )
        assert trusted.status is rr.RunStatus.COMPLETED
    finally:
        cluster.close()
