"""Prove that the test servers in ``servers.py`` are real and isolated."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import servers
from servers import (
    MotoS3Server,
    ServerUnavailable,
    SshServer,
    descendants,
    ensure_openssh_server,
    pid_alive,
    port_open,
)

try:
    import paramiko
except ImportError:  # SSH tests skip; the moto tests don't need it
    paramiko = None

USER_A, USER_B, USER_C = servers.USER_A, servers.USER_B, servers.USER_C


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def sshd_available() -> None:
    """Skip unless sshd exists (installed if root) and separate users can be served."""
    if paramiko is None:
        pytest.skip("paramiko not installed")
    try:
        ensure_openssh_server()
    except ServerUnavailable as exc:
        pytest.skip(f"sshd unavailable: {exc}")
    if os.geteuid() != 0:
        pytest.skip("separate SSH test users need root (useradd, sshd privilege separation)")


@pytest.fixture(scope="module")
def host_a(sshd_available: None) -> Iterator[SshServer]:
    with SshServer(USER_A) as server:
        yield server


@pytest.fixture(scope="module")
def host_b(sshd_available: None) -> Iterator[SshServer]:
    with SshServer(USER_B) as server:
        yield server


@pytest.fixture
def host_c(sshd_available: None) -> Iterator[SshServer]:
    """A function-scoped host that tests may kill and restart."""
    with SshServer(USER_C) as server:
        yield server


def test_two_hosts_are_two_users(host_a: SshServer, host_b: SshServer) -> None:
    assert host_a.port != host_b.port
    assert host_a.host_key_public != host_b.host_key_public
    outputs = {}
    for server in (host_a, host_b):
        client = server.connect()
        try:
            _, stdout, _ = client.exec_command("whoami; echo $HOME", timeout=10)
            outputs[server.user] = stdout.read().decode().split()
        finally:
            client.close()
    assert outputs[USER_A] == [USER_A, host_a.home]
    assert outputs[USER_B] == [USER_B, host_b.home]
    assert host_a.home != host_b.home


def test_homes_are_isolated(host_a: SshServer, host_b: SshServer) -> None:
    name = f"marker-{uuid.uuid4().hex}"
    assert host_a.run(f"echo hello > ~/{name}")[0] == 0
    try:
        assert host_a.run(f"cat ~/{name}")[1] == "hello\n"
        assert os.stat(os.path.join(host_a.home, name)).st_uid != os.stat(host_b.home).st_uid
        assert host_b.run(f"test -e ~/{name}")[0] != 0
        # not even by absolute path: useradd homes are private (mode 700)
        assert host_b.run(f"test -e {host_a.home}/{name}")[0] != 0
    finally:
        host_a.run(f"rm -f ~/{name}")


def test_unknown_host_key_is_rejected(host_a: SshServer, host_b: SshServer, tmp_path) -> None:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(
            host_a.host,
            host_a.port,
            username=host_a.user,
            key_filename=host_a.client_key_path,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    client.close()
    # host B's key recorded for host A's address: a changed key is refused too
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{host_a.host}]:{host_a.port} {host_b.host_key_public}\n")
    client = paramiko.SSHClient()
    client.load_host_keys(str(wrong))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            host_a.host,
            host_a.port,
            username=host_a.user,
            key_filename=host_a.client_key_path,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    client.close()


def test_wrong_client_key_is_rejected(host_a: SshServer, host_b: SshServer) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        host_a.connect(key_filename=host_b.client_key_path).close()


def test_sftp_and_openssh_client(host_a: SshServer) -> None:
    client = host_a.connect()
    try:
        with client.open_sftp() as sftp, sftp.open("sftp-probe.txt", "w") as fh:
            fh.write("via sftp")
    finally:
        client.close()
    assert host_a.run("cat ~/sftp-probe.txt && rm ~/sftp-probe.txt")[1] == "via sftp"
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH client (ssh) not installed")
    result = subprocess.run(
        [*host_a.ssh_args(), "whoami"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"{USER_A}\n"), result.stderr


def test_remote_python(host_a: SshServer) -> None:
    python = host_a.remote_python()
    assert not python.startswith("/root/")
    status, out, _ = host_a.run(
        f"{python} -c 'import sys, getpass; print(sys.version_info[0], getpass.getuser())'"
    )
    assert (status, out) == (0, f"3 {USER_A}\n")
    # the pyenv interpreter running these tests lives under /root (mode 700)
    ours = os.path.realpath(sys.executable)
    if ours.startswith("/root/"):
        assert host_a.run(f"{ours} -V")[0] != 0


def test_kill_and_restart(host_c: SshServer) -> None:
    port, key, old_pid = host_c.port, host_c.host_key_public, host_c.pid
    client = host_c.connect()
    assert client.exec_command("true", timeout=10)[1].channel.recv_exit_status() == 0
    host_c.kill()
    assert not host_c.running and not pid_alive(old_pid)
    assert not port_open(port)
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        _, stdout, _ = client.exec_command("true", timeout=5)
        stdout.channel.recv_exit_status()
    client.close()
    with pytest.raises((paramiko.SSHException, OSError)):
        host_c.connect(timeout=3)
    host_c.restart()
    assert (host_c.port, host_c.host_key_public) == (port, key)
    assert host_c.pid != old_pid
    assert host_c.run("whoami")[1] == f"{USER_C}\n"


def test_kill_listener_only_keeps_sessions(host_c: SshServer) -> None:
    client = host_c.connect()
    try:
        host_c.kill(sessions=False)
        with pytest.raises((paramiko.SSHException, OSError)):
            host_c.connect(timeout=3)
        _, stdout, _ = client.exec_command("whoami", timeout=10)
        assert stdout.read().decode() == f"{USER_C}\n"
    finally:
        client.close()
    host_c.start()
    assert host_c.run("true")[0] == 0


def test_stop_ends_sessions_and_user_processes(sshd_available: None) -> None:
    server = SshServer(USER_C).start()
    try:
        client = server.connect()
        client.exec_command("sleep 300")
        # a job detached from the session (new session, parent exits)
        server.run("setsid nohup sleep 301 >/dev/null 2>&1 < /dev/null &")
        listener = server.pid
        assert listener is not None
        deadline = time.monotonic() + 5
        while not any(_cmdline(p).startswith("sleep 300") for p in server.user_pids()):
            assert time.monotonic() < deadline, "remote 'sleep 300' never started"
            time.sleep(0.05)
        tree = descendants(listener)
        assert tree and server.user_pids()
    finally:
        server.stop()
    client.close()
    assert not pid_alive(listener)
    assert not [p for p in tree if pid_alive(p)]
    assert server.user_pids() == []
    assert server.tmpdir is None


def test_clear_home(host_c: SshServer) -> None:
    host_c.run("mkdir -p ~/junk/deep && touch ~/junk/deep/x ~/.hidden")
    host_c.clear_home()
    status, out, _ = host_c.run("ls -A ~")
    assert status == 0
    assert "junk" not in out.split() and ".hidden" not in out.split()
    assert ".bashrc" in out.split()  # /etc/skel restored
    assert os.stat(host_c.home).st_mode & 0o777 == 0o700


# ---------------------------------------------------------------- moto S3


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3Server]:
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    try:
        server = MotoS3Server().start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


def test_s3fs_roundtrip(moto_s3: MotoS3Server) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **moto_s3.storage_options())
    fs.mkdir("rr-bucket")
    fs.pipe("rr-bucket/dir/data.bin", b"\x00hello\xff")
    assert fs.cat("rr-bucket/dir/data.bin") == b"\x00hello\xff"
    assert fs.ls("rr-bucket/dir") == ["rr-bucket/dir/data.bin"]
    # a second, independent client sees the same server state
    assert moto_s3.filesystem().cat("rr-bucket/dir/data.bin") == b"\x00hello\xff"


def test_moto_reset(moto_s3: MotoS3Server) -> None:
    fs = moto_s3.filesystem()
    fs.mkdir("rr-reset")
    assert fs.exists("rr-reset")
    moto_s3.reset()
    fs.invalidate_cache()
    assert not fs.exists("rr-reset")
    assert fs.ls("") == []


def test_moto_stop() -> None:
    pytest.importorskip("moto")
    server = MotoS3Server().start()
    pid, port = server.pid, server.port
    assert pid is not None and port_open(port)
    server.stop()
    assert not pid_alive(pid) and not port_open(port)
