"""Fixtures: an isolated REMOTERUN_HOME for every test, and the systems every contract
test runs against (parametrised, so one test body serves each system)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import remoterun as rr

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def remoterun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "remoterun-home"
    monkeypatch.setenv("REMOTERUN_HOME", str(home))
    return home


@pytest.fixture(params=["local"])
def system(request: pytest.FixtureRequest, tmp_path: Path):
    """Every executing system, each with its own empty run root."""
    if request.param == "local":
        sys_ = rr.LocalSystem(root=str(tmp_path / "runs"))
    yield sys_
    sys_.close()


@pytest.fixture
def marker(tmp_path: Path) -> str:
    """A file the remote functions append to once per execution."""
    return str(tmp_path / "executions.txt")


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder no process can write to: a read-only tmpfs as root, else mode 0555."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs as root: {result.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
            shutil.rmtree(path, ignore_errors=True)


def client_env() -> dict[str, str]:
    """Environment for a separate client process that imports the test task module."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env
