"""Run folders: names, atomic writes, and fsspec backends."""

from __future__ import annotations

import pickle
import re
import threading

import fsspec
import pytest

import remoterun as rr
from remoterun.agent import layout
from remoterun.agent.runfolder import RunArgument, RunFolder
from remoterun.folder import check_run_name, files_of


@pytest.mark.parametrize("name", ["a", "exp1", "A.b_c-d", "9" * 128, "x..y"])
def test_valid_names(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "../x", "a/b", "/a", ".hidden", "_x", "x" * 129, "a b", "a\n", None, 3]
)
def test_invalid_names(name):
    with pytest.raises(rr.InvalidRunNameError, match="invalid run name"):
        check_run_name(name)


def test_generated_names_are_unique_within_a_second():
    names = {layout.generate_run_name("<lambda>") for _ in range(2000)}
    assert len(names) == 2000
    for name in names:
        assert re.fullmatch(r"lambda-\d{8}-\d{6}-[0-9a-f]{6}", name)
        check_run_name(name)


@pytest.mark.parametrize("url", ["file", "memory"])
def test_atomic_writes_leave_no_temporary_files(tmp_path, url):
    fs = fsspec.filesystem(url)
    root = str(tmp_path) if url == "file" else f"/atomic-{tmp_path.name}"
    folder = RunFolder(files_of(fs), f"{root}/run1")
    folder.create()
    folder.write_record({"status": "RUNNING"})
    folder.write_result(b"x" * 100_000, {})
    folder.write_record({"status": "COMPLETED"})
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(folder.path, detail=False)) == [
        "config.json",
        "result.pkl",
    ]
    assert folder.read_record() == {"status": "COMPLETED"}


def test_reader_never_sees_a_partial_file(tmp_path):
    folder = RunFolder(files_of(fsspec.filesystem("file")), str(tmp_path / "run2"))
    folder.create()
    big = [b"a" * 4_000_000, b"b" * 4_000_000]
    folder.write_log("stdout", big[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            folder.write_log("stdout", big[i % 2])
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            assert folder.read_log("stdout") in big
    finally:
        stop.set()
        thread.join()


def test_write_into_a_missing_folder_is_a_storage_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    folder = RunFolder(files_of(fsspec.filesystem("file")), str(tmp_path / "file" / "run"))
    with pytest.raises(rr.RunStorageError, match="cannot"):
        folder.create()
    with pytest.raises(rr.RunStorageError, match="cannot write"):
        folder.write_record_bytes(b"{}")


def test_unknown_protocol_names_what_to_install():
    with pytest.raises(rr.MissingExtraError, match="nosuchproto"):
        rr.StorageSystem("nosuchproto://bucket/runs")


def test_storage_system_cannot_execute(tmp_path):
    store = rr.StorageSystem(str(tmp_path / "store"))
    fn = rr.function(lambda: 1, system=store)
    with pytest.raises(rr.SystemUnavailableError, match="only stores runs"):
        fn()


def test_inputs_recorded_before_runfolder_held_run_arguments_still_load():
    # A run passed as an argument was pickled as remoterun.agent.layout.RunArgument.
    old = b"cremoterun.agent.layout\nRunArgument\n(S'/runs/a'\nI2\nS'file:///runs/a'\ntR."
    loaded = pickle.loads(old)
    assert isinstance(loaded, RunArgument)
    assert (loaded.path, loaded.attempt, loaded.url) == ("/runs/a", 2, "file:///runs/a")


def test_commands_travel_by_reference_not_as_code():
    # A code object loads only on the Python version that made it: hosts of another
    # version must find run_commands by name, in the package they were sent.
    from remoterun.agent.commands import run_commands
    from remoterun.function import RemoteFunction

    data, _ = RemoteFunction(run_commands, run_type="command")._pickle_function()
    assert b"remoterun.agent.commands" in data and len(data) < 200
    assert pickle.loads(data) is run_commands
