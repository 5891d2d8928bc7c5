"""What only the OpenSSH transport does: the user's ssh_config as ``ssh`` reads it
(Match, Include, ProxyCommand), user and host certificates, and no ssh process left
behind however the client ends.

Against the suite's real sshds on 127.0.0.1, each serving its own Unix user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import remote_tasks as tasks
import servers
from conftest import client_env, make_cluster

import remoterun as rr
from remoterun.systems.ssh.openssh import ssh_binary

pytestmark = pytest.mark.skipif(ssh_binary() is None, reason="no OpenSSH client (ssh)")


def whoami(_item=None) -> str:
    import getpass

    return getpass.getuser()


def _logins(server) -> int:
    return server.log().count(f"Accepted publickey for {server.user} ")


# --------------------------------------------------------------------------- ssh_config


def test_match_and_include_apply_as_ssh_applies_them(ssh_server, tmp_path):
    # The host's port, user, key and known_hosts come only from a Match block in a file
    # that an Include pulls in, and the Match holds only while a file exists.
    flag = tmp_path / "on-the-vpn"
    flag.touch()
    included = tmp_path / "conf.d"
    included.mkdir()
    (included / "lab.conf").write_text(
        f'Match originalhost matched exec "test -f {flag}"\n'
        + "".join(
            line + "\n"
            for line in ssh_server.ssh_config("matched").splitlines()[1:]  # no Host line
        )
    )
    config = tmp_path / "ssh_config"
    # Without the Match, the alias leads to a port nothing listens on.
    config.write_text(
        f"Include {included}/*.conf\n"
        f"Host matched\n    HostName 127.0.0.1\n    Port {servers.free_port()}\n"
    )
    cluster = rr.cluster(
        "matched", ssh_config=str(config), transport="openssh", python=ssh_server.remote_python()
    )
    assert cluster.hosts[0].host_label() == f"{ssh_server.user}@127.0.0.1:{ssh_server.port}"
    assert rr.function(whoami, system=cluster)() == ssh_server.user
    cluster.close()

    flag.unlink()  # the Match no longer holds: the closed port
    cluster = rr.cluster(
        "matched",
        ssh_config=str(config),
        transport="openssh",
        connect_timeout=3,
        python=ssh_server.remote_python(),
    )
    with pytest.raises(rr.SystemUnavailableError, match="Connection refused"):
        rr.function(whoami, system=cluster)()
    cluster.close()


def test_a_proxy_command_hop(ssh_server, tmp_path):
    inner = servers.SshServer(servers.USER_B).start()
    try:
        config = tmp_path / "ssh_config"
        config.write_text(
            ssh_server.ssh_config("jumpbox")
            + inner.ssh_config("inner")
            + f"    ProxyCommand ssh -F {config} -W %h:%p jumpbox\n"
        )
        logins = _logins(ssh_server)
        cluster = rr.cluster(
            "inner", ssh_config=str(config), transport="openssh", python=inner.remote_python()
        )
        assert rr.function(whoami, system=cluster)() == servers.USER_B
        run = rr.function(tasks.add, system=cluster).run(1, run_name="through-the-command")
        assert run.result(timeout=30) == 3
        # The one connection went through the jump host: one login there.
        assert _logins(ssh_server) - logins == 1
        cluster.close()
    finally:
        inner.stop()


# --------------------------------------------------------------------------- certificates


def _keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def cert_host():
    """An sshd with a host certificate that trusts user certificates of one CA; the
    user's certificate key is in no authorized_keys file."""
    server = servers.SshServer(servers.USER_C)
    server._prepare()
    tmp = server.tmpdir
    _keygen("-t", "ed25519", "-N", "", "-C", "ca", "-f", str(tmp / "ca"))
    _keygen("-t", "ed25519", "-N", "", "-C", "cert-user", "-f", str(tmp / "cert_key"))
    _keygen(
        "-s", str(tmp / "ca"), "-I", "user-cert-of-test", "-n", server.user, "-V", "-5m:+1d",
        str(tmp / "cert_key.pub"),
    )  # fmt: skip
    _keygen(
        "-s", str(tmp / "ca"), "-I", "host-cert-of-test", "-h", "-n", "127.0.0.1",
        "-V", "-5m:+1d", str(tmp / "host_key.pub"),
    )  # fmt: skip
    server.extra_config = (
        f"HostCertificate {tmp / 'host_key-cert.pub'}\nTrustedUserCAKeys {tmp / 'ca.pub'}\n"
    )
    server._write_config()
    server.start()
    yield server
    server.stop()


def test_user_and_host_certificates(cert_host, tmp_path):
    ca = " ".join((cert_host.tmpdir / "ca.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority [127.0.0.1]:{cert_host.port} {ca}\n")  # no host key
    cluster = rr.cluster(
        "certified",
        host="127.0.0.1",
        port=cert_host.port,
        user=cert_host.user,
        key=str(cert_host.tmpdir / "cert_key"),  # its -cert.pub beside it is the login
        known_hosts=str(known),
        transport="openssh",
        python=cert_host.remote_python(),
    )
    assert rr.function(whoami, system=cluster)() == cert_host.user
    cluster.close()
    log = cert_host.log()
    assert 'Accepted certificate ID "user-cert-of-test"' in log
    assert "ED25519-CERT" in log

    # A CA that did not sign the host's certificate: the host is refused, nothing runs.
    _keygen("-t", "ed25519", "-N", "", "-f", str(tmp_path / "other_ca"))
    other = " ".join((tmp_path / "other_ca.pub").read_text().split()[:2])
    known.write_text(f"@cert-authority [127.0.0.1]:{cert_host.port} {other}\n")
    cluster = rr.cluster(
        "impostor",
        host="127.0.0.1",
        port=cert_host.port,
        user=cert_host.user,
        key=str(cert_host.tmpdir / "cert_key"),
        known_hosts=str(known),
        transport="openssh",
        python=cert_host.remote_python(),
    )
    with pytest.raises(rr.HostKeyError, match="not in known_hosts"):
        rr.function(whoami, system=cluster)()
    cluster.close()


# --------------------------------------------------------------------------- clean exit


CLIENT = """
import os, sys
import remoterun as rr
import remote_tasks as tasks
how, port, user, key, known_hosts, python, pidfile = sys.argv[1:]
cluster = rr.cluster("leaver", host="127.0.0.1", port=int(port), user=user, key=key,
                     known_hosts=known_hosts, python=python, transport="openssh",
                     root="~/.remoterun/test-leaver")
fn = rr.function(tasks.add, system=cluster)
fn.map(list(range(8)))  # several agents at once
cluster.hosts[0].filesystem().exists(cluster.root)  # and an SFTP session
print("ready", cluster.hosts[0].link.control_path, flush=True)
if how == "exit":
    sys.stdin.readline()
    sys.exit(0)  # no close(): atexit ends them
rr.function(tasks.note_pid_then_sleep, system=cluster)(pidfile, 300)  # interrupted
"""


def _ssh_processes(pid: int) -> list[int]:
    return [child for child in servers.descendants(pid) if _comm(child) == "ssh"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _using(control_path: str) -> list[int]:
    """Live processes whose command line names the control socket."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if control_path.encode() in cmdline and servers.pid_alive(int(entry)):
                found.append(int(entry))
    return found


def _gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if servers.pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if servers.pid_alive(pid)]
    return alive


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "Ctrl-C", "exit"])
def test_no_ssh_process_outlives_the_client(ssh_server, scratch, how):
    pidfile = scratch / "call.pid"
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "exit" if how == "exit" else "call"]
        + [str(ssh_server.port), ssh_server.user, ssh_server.client_key_path]
        + [ssh_server.known_hosts_path, ssh_server.remote_python(), str(pidfile)],
        env=client_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job
    )
    try:
        line = [""]
        while line[:1] != ["ready"]:  # after what the calls printed
            line = client.stdout.readline().split() or [client.stderr.read()]
            assert client.poll() is None, line
        control_path = line[1]
        ssh = _ssh_processes(client.pid)
        assert len(ssh) >= 3  # the master, agents' sessions, the SFTP session
        assert _using(control_path)
        if how == "exit":
            client.stdin.write("\n")
            client.stdin.flush()
        else:
            deadline = time.monotonic() + 30
            while not (pidfile.exists() and pidfile.read_text().strip()):
                assert client.poll() is None and time.monotonic() < deadline, client.stderr.read()
                time.sleep(0.05)
            remote = int(pidfile.read_text())  # the call, on the host
            if how == "SIGKILL":
                client.kill()
            elif how == "SIGTERM":
                client.terminate()
            else:
                os.killpg(client.pid, signal.SIGINT)  # the terminal's Ctrl-C
        client.wait(timeout=30)
        assert _gone(ssh) == [], "an ssh process outlived the client"
        assert _using(control_path) == []
        assert not os.path.exists(control_path) or how == "SIGKILL"
        if how != "exit":
            assert _gone([remote]) == [], "the interrupted call runs on on the host"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_closing_a_cluster_ends_its_ssh_processes(ssh_server):
    cluster = make_cluster(ssh_server, transport="openssh")
    assert rr.function(tasks.add, system=cluster).map([1, 2, 3, 4]) == [3, 4, 5, 6]
    cluster.hosts[0].filesystem().exists(cluster.root)  # the SFTP session too
    control_path = cluster.hosts[0].link.control_path
    ssh = _using(control_path)  # this cluster's, not other tests' clusters left open
    assert len(ssh) >= 3  # the master, agents' sessions, the SFTP session
    master = cluster.hosts[0].link.master
    cluster.close()
    assert master.poll() is not None
    assert _gone(ssh) == []
    assert not os.path.exists(control_path)


def test_sockets_of_dead_masters_are_swept(tmp_path):
    import socket

    from remoterun.systems.ssh.processes import sweep

    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead"))
    dead.close()  # its file stays, nothing listens: a master killed by SIGKILL
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live"))
    live.listen()
    (tmp_path / "other").write_text("not a socket")
    sweep(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live", "other"]
    live.close()
