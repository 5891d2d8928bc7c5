"""Fixtures: an isolated REMOTERUN_HOME for every test, and the systems every contract
test runs against (parametrised, so one test body serves each system)."""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

import remoterun as rr

TESTS = Path(__file__).resolve().parent

# Every SSH test runs over both transports: the ssh binary's and paramiko's.
SSH_TRANSPORTS = ("paramiko", "openssh")
# As parameters of tests that also run elsewhere ("local", "s3", ...).
SSH_PARAMS = tuple(f"ssh-{transport}" for transport in SSH_TRANSPORTS)
# Modules whose every test is about SSH (their hosts are fixtures of their own).
_SSH_MODULES = {"test_ssh", "test_ssh_trust"}


def transport_of(param: str) -> str:
    """The transport of an ``ssh-<transport>`` parameter."""
    return param.split("-", 1)[1]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that use the suite's sshd run once per transport (``ssh_transport``)."""
    module = metafunc.module.__name__.rpartition(".")[2]
    if module == "test_openssh":  # its tests choose the transport themselves
        return
    if "ssh_server" in metafunc.fixturenames or module in _SSH_MODULES:
        metafunc.parametrize("ssh_transport", SSH_TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def ssh_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The transport of the test's clusters (and of the clients it starts), when the test
    is run once per transport; as ``$REMOTERUN_SSH_TRANSPORT``."""
    transport = getattr(request, "param", None)
    if transport is not None:
        _needs_transport(transport)
        monkeypatch.setenv("REMOTERUN_SSH_TRANSPORT", transport)
    return transport


def _needs_transport(transport: str | None) -> None:
    if transport == "openssh" and shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client (ssh): apt-get install openssh-client")


@pytest.fixture(autouse=True)
def remoterun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "remoterun-home"
    monkeypatch.setenv("REMOTERUN_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def ssh_server():
    """A real sshd on 127.0.0.1 serving a separate Unix user (a "remote host")."""
    from servers import USER_A, ServerUnavailable, SshServer, ensure_openssh_server

    try:
        ensure_openssh_server()
        server = SshServer(USER_A, extra_config="MaxStartups 100:30:200").start()
    except ServerUnavailable as exc:
        pytest.skip(f"no SSH test host: {exc}")
    yield server
    server.stop()


async def cancel_an_awaited_sleeper(system, pidfile: Path) -> int:
    """Await a call of ``note_pid_then_sleep`` on ``system``, cancel the awaiting task once
    the call has written its pid, and return that pid (the process that must stop)."""
    import remote_tasks as tasks

    sleeper = rr.function(tasks.note_pid_then_sleep, system=system)
    task = asyncio.ensure_future(sleeper.acall(str(pidfile)))
    while not (pidfile.exists() and pidfile.read_text()):
        assert not task.done(), task
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return int(pidfile.read_text())


def make_cluster(server, name: str = "test", **options):
    """A cluster on a test sshd, its keys and known_hosts from the server."""
    _needs_transport(options.get("transport"))
    options.setdefault("root", f"~/.remoterun/test-runs/{uuid.uuid4().hex[:12]}")
    options.setdefault("python", server.remote_python())
    return rr.cluster(
        name,
        host=server.host,
        port=server.port,
        user=server.user,
        key=str(server.client_key_path),
        known_hosts=str(server.known_hosts_path),
        **options,
    )


@pytest.fixture(params=["local", *SSH_PARAMS])
def system(request: pytest.FixtureRequest, tmp_path: Path):
    """Every executing system (SSH over each transport), each with its own empty run
    root."""
    if request.param == "local":
        system_ = rr.LocalSystem(root=str(tmp_path / "runs"))
    else:
        transport = transport_of(request.param)
        system_ = make_cluster(request.getfixturevalue("ssh_server"), transport=transport)
    yield system_
    if request.param != "local":
        root = system_.root
        system_.close()
        shutil.rmtree(root, ignore_errors=True)
    else:
        system_.close()


@pytest.fixture
def scratch():
    """A folder every host's user can write to (pytest's own tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="rr-scratch-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def marker(scratch: Path) -> str:
    """A file the remote functions append to once per execution."""
    return str(scratch / "executions.txt")


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


def system_code(system) -> str:
    """Python source that rebuilds ``system`` in another process, as ``s``."""
    data = base64.b64encode(pickle.dumps(system)).decode()
    return f"import base64, pickle; s = pickle.loads(base64.b64decode({data!r}))\n"


def client_env() -> dict[str, str]:
    """Environment for a separate client process that imports the test task module."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server process on 127.0.0.1, for the whole session."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from servers import MotoS3Server

    server = MotoS3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<new bucket>`` on the moto server, reached through the usual AWS variables."""
    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"rr-{uuid.uuid4().hex[:12]}"
    moto_server.filesystem().mkdir(bucket)
    return f"s3://{bucket}"
