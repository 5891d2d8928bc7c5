"""The public surface: complete, sorted, and light to import."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import remoterun as rr
from remoterun import errors


def test_all_is_sorted_and_resolves():
    assert rr.__all__ == sorted(rr.__all__)
    for name in rr.__all__:
        assert getattr(rr, name) is not None, name


def test_every_exception_is_public():
    classes = {
        n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, BaseException)
    }
    assert classes <= set(rr.__all__)


def test_exception_tree():
    assert issubclass(rr.RemoteError, rr.RunFailedError)
    assert issubclass(rr.RunCancelledError, rr.RunFailedError)
    assert issubclass(rr.WorkerLostError, rr.RemoteError)
    assert issubclass(rr.InvalidRunNameError, ValueError)
    for name in rr.__all__:
        obj = getattr(rr, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, rr.RemoterunError), name


def _modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_import_remoterun_loads_no_heavy_dependency():
    loaded = _modules_after("import remoterun")
    heavy = [
        m
        for m in loaded
        if m.split(".")[0]
        in {"paramiko", "s3fs", "botocore", "boto3", "fsspec", "cloudpickle", "click", "rich"}
    ]
    assert heavy == []


def test_agent_imports_only_stdlib_and_cloudpickle():
    loaded = _modules_after(
        "import remoterun.agent.__main__, remoterun.agent.server, remoterun.agent.worker"
    )
    allowed = set(sys.stdlib_module_names) | {"cloudpickle", "remoterun", "_distutils_hack"}
    foreign = [
        m
        for m in loaded
        if m.split(".")[0] not in allowed and not m.startswith("_") and m != "__main__"
    ]
    assert foreign == []


def test_submodules_do_not_shadow_public_functions():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import remoterun as rr; rr.RemoteFunction; rr.Run; "
            "import remoterun.function, remoterun.run; print(callable(rr.function), "
            "callable(rr.run), type(rr.function).__name__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["True", "True", "function"]
