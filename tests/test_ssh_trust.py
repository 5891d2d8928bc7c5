"""What a client may trust of an SSH host: connecting through a busy sshd, the package it
runs from, the files it leaves, and calls that stop when their connection drops.

Against real OpenSSH sshd instances on 127.0.0.1, each serving its own Unix user.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import remote_tasks as tasks
import servers
from conftest import make_cluster

import remoterun as rr
from remoterun.systems.ssh import package_archive


@pytest.fixture(scope="module")
def host():
    """A host of this module's own: its home is changed by the tests."""
    server = servers.SshServer(servers.USER_C).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(host):
    cluster = make_cluster(host)
    yield cluster
    cluster.close()


def _as_host_user(host, path: Path) -> None:
    uid = Path(host.home).stat().st_uid
    os.chown(path, uid, uid)


def whoami(_item=None) -> str:
    import getpass

    return getpass.getuser()


# --------------------------------------------------------------------------- a busy sshd


@pytest.fixture
def busy_host():
    """An sshd that drops every unauthenticated connection past the second."""
    server = servers.SshServer(servers.USER_B, extra_config="MaxStartups 2:100:2").start()
    yield server
    server.stop()


def _hold_startup_slots(server, count: int) -> list[socket.socket]:
    """Unauthenticated connections that take the server's MaxStartups slots."""
    held = []
    for _ in range(count):
        sock = socket.create_connection((server.host, server.port), timeout=5)
        assert sock.recv(64).startswith(b"SSH-")  # accepted: it counts as starting up
        held.append(sock)
    return held


def test_a_crowd_of_clients_connects_through_a_busy_sshd(busy_host):
    clusters = [make_cluster(busy_host, f"crowd-{i}") for i in range(12)]
    held = _hold_startup_slots(busy_host, 2)
    # While the slots are taken, the server drops any new connection at once.
    probe = socket.create_connection((busy_host.host, busy_host.port), timeout=5)
    assert not probe.recv(64).startswith(b"SSH-")
    probe.close()
    results, errors = [], []

    def call(cluster) -> None:
        try:
            results.append(rr.function(whoami, system=cluster)())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(c,)) for c in clusters]
    for t in threads:
        t.start()
    time.sleep(0.5)  # every client has been dropped at least once by now
    for sock in held:
        sock.close()
    for t in threads:
        t.join()
    for c in clusters:
        c.close()
    assert errors == []
    assert results == [servers.USER_B] * 12


def test_a_jump_host_connection_is_retried_too(busy_host, ssh_server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(
        Path(ssh_server.known_hosts_path).read_text() + Path(busy_host.known_hosts_path).read_text()
    )
    config = tmp_path / "ssh_config"
    config.write_text(
        ssh_server.ssh_config("jumpbox").replace(ssh_server.known_hosts_path, str(known))
        + busy_host.ssh_config("busy").replace(busy_host.known_hosts_path, str(known))
        + "    ProxyJump jumpbox\n"
    )
    cluster = rr.cluster("busy", ssh_config=str(config), python=busy_host.remote_python())
    held = _hold_startup_slots(busy_host, 2)
    threading.Timer(0.5, lambda: [s.close() for s in held]).start()
    assert rr.function(whoami, system=cluster)() == servers.USER_B
    cluster.close()


def test_a_failed_login_is_not_retried(busy_host, tmp_path):
    import subprocess

    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    cluster = rr.cluster(
        "stranger",
        host=busy_host.host,
        port=busy_host.port,
        user=busy_host.user,
        key=str(tmp_path / "k"),
        known_hosts=str(busy_host.known_hosts_path),
    )
    before = busy_host.log().count("Connection from")
    with pytest.raises(rr.SystemUnavailableError, match="authentication"):
        rr.function(whoami, system=cluster)()
    assert busy_host.log().count("Connection from") - before == 1
    cluster.close()


# --------------------------------------------------------------------------- the package


def _pkg(host) -> Path:
    return Path(host.home, ".remoterun", "pkg", package_archive().version)


def _install(host) -> None:
    """Have the package installed, and every process that imports from it gone."""
    cluster = make_cluster(host)
    assert rr.function(tasks.add, system=cluster)(1) == 3
    cluster.close()
    deadline = time.monotonic() + 10
    while host.user_pids():  # the agent's fork server outlives it by a moment
        assert time.monotonic() < deadline, "the host's processes do not exit"
        time.sleep(0.02)


def test_an_edited_package_file_is_installed_again_and_never_runs(host, scratch):
    _install(host)
    edited = _pkg(host) / "remoterun" / "agent" / "__init__.py"
    original = edited.read_bytes()
    ran = scratch / "edited-code-ran"
    edited.write_bytes(f"open({str(ran)!r}, 'w').close()\n".encode() + original)
    second = make_cluster(host)
    assert rr.function(tasks.add, system=second)(2) == 4
    second.close()
    assert not ran.exists()
    assert edited.read_bytes() == original


def test_a_deleted_package_file_is_installed_again(host):
    _install(host)
    deleted = _pkg(host) / "remoterun" / "agent" / "protocol.py"
    deleted.unlink()
    second = make_cluster(host)
    assert rr.function(tasks.add, system=second)(2) == 4
    second.close()
    assert deleted.exists()


def test_an_added_module_in_the_package_is_refused(host, scratch):
    _install(host)
    ran = scratch / "added-module-ran"
    added = _pkg(host) / "json.py"  # first on the agent's path: it would shadow the stdlib
    added.write_text(f"open({str(ran)!r}, 'w').close()\nfrom json import *\n")
    second = make_cluster(host)
    assert rr.function(tasks.add, system=second)(2) == 4
    second.close()
    assert not added.exists()
    assert not ran.exists()


def umask_of_the_agent() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_new_host_gets_the_package_in_its_first_agents_own_session(host):
    # The first agent's boot finds no package, takes it in-band and installs it private
    # (umask 077), then runs the agent with the session's own umask: the same as an agent
    # of a host that had the package already.
    status, _, err = host.run("rm -rf ~/.remoterun/pkg")
    assert status == 0, err
    cluster = make_cluster(host)
    fresh = rr.function(umask_of_the_agent, system=cluster)()
    cluster.close()
    assert (_pkg(host) / ".complete").exists()
    assert oct(_pkg(host).stat().st_mode & 0o777) == oct(0o700)
    assert not [p for p in _pkg(host).parent.iterdir() if ".tmp" in p.name]
    cluster = make_cluster(host)
    assert rr.function(umask_of_the_agent, system=cluster)() == fresh
    cluster.close()


def import_probe() -> str:
    import rrprobe  # from the PYTHONPATH the cluster's env sets

    return rrprobe.VALUE


def test_modules_in_the_home_folder_or_pythonpath_do_not_shadow_the_agents(host, tmp_path):
    shadow_dir = Path(host.home, "shadowing")
    shadow_dir.mkdir(exist_ok=True)
    _as_host_user(host, shadow_dir)
    planted = []
    for folder in (Path(host.home), shadow_dir):
        for name in ("cloudpickle.py", "json.py"):
            path = folder / name
            path.write_text(f"raise RuntimeError('the shadowing {path} was imported')\n")
            _as_host_user(host, path)
            planted.append(path)
    probe = shadow_dir / "rrprobe.py"
    probe.write_text("VALUE = 'found on PYTHONPATH'\n")
    _as_host_user(host, probe)
    try:
        cluster = make_cluster(host, env={"PYTHONPATH": str(shadow_dir)})
        assert rr.function(tasks.add, system=cluster)(1) == 3
        # Recorded runs start from the agent's fork server, a new interpreter.
        run = rr.function(tasks.add, system=cluster).run(2, run_name="unshadowed")
        assert run.result(timeout=30) == 4
        # The user's PYTHONPATH still serves the functions.
        assert rr.function(import_probe, system=cluster)() == "found on PYTHONPATH"
        cluster.close()
    finally:
        for path in planted:
            path.unlink()
        shutil.rmtree(shadow_dir, ignore_errors=True)


def test_remoterun_files_on_the_host_are_private(host):
    top = Path(host.home, ".remoterun")
    if top.exists():
        top.chmod(0o755)  # as an older remoterun left it
    for folder in ("pkg", "setup"):
        shutil.rmtree(top / folder, ignore_errors=True)
    cluster = make_cluster(host, setup=[f"echo private-{os.getpid()}"])
    rr.function(tasks.add, system=cluster)(1)
    cluster.close()
    pkg = _pkg(host)
    for folder in (top, top / "pkg", pkg, pkg / "remoterun", top / "setup"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = [pkg / ".manifest", pkg / "remoterun" / "agent" / "__main__.py"]
    files += list((top / "setup").iterdir())
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# --------------------------------------------------------------------------- lost connections


def tick_forever(marker: str, pidfile: str) -> None:
    """Append to ``marker`` every 20 ms, with a child process in the caller's group."""
    import subprocess

    child = subprocess.Popen(["sleep", "300"])
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    while True:
        with open(marker, "a") as f:
            f.write(".")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    return servers.pid_alive(pid)


def _drop_client_socket(cluster, agent_pid: int) -> None:
    link = cluster.hosts[0].link
    if link.transport == "openssh":
        link.master.kill()  # the ssh process that holds the connection
    else:
        link.client.get_transport().sock.shutdown(socket.SHUT_RDWR)


def _kill_sshd_session(cluster, agent_pid: int) -> None:
    stat_line = Path(f"/proc/{agent_pid}/stat").read_text()
    session = int(stat_line.rsplit(")", 1)[1].split()[1])  # the sshd serving the agent
    assert Path(f"/proc/{session}/comm").read_text().strip() == "sshd"
    os.kill(session, signal.SIGKILL)


@pytest.mark.parametrize("drop", [_drop_client_socket, _kill_sshd_session])
def test_a_synchronous_call_stops_when_its_connection_drops(host, scratch, drop):
    cluster = make_cluster(host)
    gate = scratch / "gate"
    recorded = rr.function(tasks.wait_for_file, system=cluster).run(str(gate), run_name="kept")
    marker, pidfile = scratch / "ticks", scratch / "pids"
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            rr.function(tick_forever, system=cluster)(str(marker), str(pidfile))
        except BaseException as exc:  # what the caller sees
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.02)
    agent_pid, child_pid = map(int, pidfile.read_text().split())
    drop(cluster, agent_pid)
    deadline = time.monotonic() + 2
    while _alive(agent_pid) or _alive(child_pid):
        assert time.monotonic() < deadline, "the call runs on after its connection dropped"
        time.sleep(0.02)
    size = marker.stat().st_size
    time.sleep(0.2)
    assert marker.stat().st_size == size
    caller.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], rr.SystemUnavailableError)
    # The recorded run, detached, is not stopped with it.
    gate.touch()
    assert recorded.result(timeout=30) == "finished"
    cluster.close()
