"""What only SSH clusters do: host keys, logins, the bootstrap, several hosts, failures.

Every test talks to real OpenSSH sshd instances on 127.0.0.1, each serving its own Unix
user, so each "host" has its own home and run root.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest
import remote_tasks as tasks
import servers
from conftest import make_cluster

import remoterun as rr


def whoami(_item=None) -> str:
    import getpass

    return getpass.getuser()


@pytest.fixture(scope="module")
def second_server(ssh_server):
    from servers import SshServer

    server = SshServer(servers.USER_B, extra_config="MaxStartups 100:30:200").start()
    yield server
    server.stop()


@pytest.fixture
def cluster(ssh_server):
    cluster = make_cluster(ssh_server)
    yield cluster
    cluster.close()


def _options(server) -> dict:
    return dict(
        host=server.host,
        port=server.port,
        user=server.user,
        key=str(server.client_key_path),
        python=server.remote_python(),
    )


# --------------------------------------------------------------------------- host keys


def test_unknown_host_key_is_refused_with_the_command_to_trust_it(ssh_server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cluster = rr.cluster("strict", known_hosts=str(empty), **_options(ssh_server))
    with pytest.raises(rr.HostKeyError) as info:
        rr.function(tasks.add, system=cluster)(1)
    message = str(info.value)
    assert f"ssh-keyscan -p {ssh_server.port} 127.0.0.1 >> ~/.ssh/known_hosts" in message
    assert "SHA256:" in message
    assert "trust_new_hosts=True" in message
    assert empty.read_text() == ""


def _key_recorded(known: Path, port: int) -> bool:
    """Whether ``known`` holds an ed25519 key of 127.0.0.1:``port``, found by ssh-keygen
    hashed (HashKnownHosts, Debian's default for ssh) or not."""
    found = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{port}", "-f", str(known)],
        capture_output=True,
        text=True,
    )
    return found.returncode == 0 and " ssh-ed25519 " in found.stdout


def test_trust_new_hosts_records_the_key(ssh_server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    trusting = rr.cluster(
        "trusting", known_hosts=str(known), trust_new_hosts=True, **_options(ssh_server)
    )
    assert rr.function(tasks.add, system=trusting)(1) == 3
    trusting.close()
    assert _key_recorded(known, ssh_server.port)
    strict = rr.cluster("strict", known_hosts=str(known), **_options(ssh_server))
    assert rr.function(tasks.add, system=strict)(2) == 4
    strict.close()


def test_changed_host_key_is_refused_even_when_trusting(ssh_server, tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    other_key = (tmp_path / "k.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{ssh_server.port} {' '.join(other_key)}\n")
    cluster = rr.cluster(
        "changed", known_hosts=str(known), trust_new_hosts=True, **_options(ssh_server)
    )
    with pytest.raises(rr.HostKeyError, match="CHANGED") as info:
        rr.function(tasks.add, system=cluster)(1)
    assert "ssh-keygen -R" in str(info.value)


# --------------------------------------------------------------------------- logins


def test_wrong_user_names_the_host_and_the_user(ssh_server):
    cluster = make_cluster(ssh_server)
    cluster.hosts[0].user = "nosuchuser"
    with pytest.raises(rr.SystemUnavailableError, match="'nosuchuser' on 127.0.0.1"):
        rr.function(tasks.add, system=cluster)(1)


def test_wrong_key_is_an_authentication_error(ssh_server, tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    cluster = make_cluster(ssh_server)
    cluster.hosts[0].key = str(tmp_path / "k")
    with pytest.raises(rr.SystemUnavailableError, match=f"authentication as '{servers.USER_A}'"):
        rr.function(tasks.add, system=cluster)(1)


def test_refused_port_fails_fast(ssh_server):
    from servers import free_port

    cluster = make_cluster(ssh_server, connect_timeout=3)
    cluster.hosts[0].port = free_port()
    start = time.monotonic()
    with pytest.raises(rr.SystemUnavailableError, match="cannot reach"):
        rr.function(tasks.add, system=cluster)(1)
    assert time.monotonic() - start < 3


def test_ssh_config_alias(ssh_server, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(ssh_server.ssh_config("testbox"))
    cluster = rr.cluster(
        "testbox",
        ssh_config=str(config),
        known_hosts=str(ssh_server.known_hosts_path),
        python=ssh_server.remote_python(),
    )
    assert rr.function(whoami, system=cluster)() == servers.USER_A
    cluster.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("box", (None, "box", None)),
        ("me@box:2222", ("me", "box", 2222)),
        ("ssh://me@box:2222", ("me", "box", 2222)),
        ("me@[::1]:2200", ("me", "::1", 2200)),
        ("::1", (None, "::1", None)),
        ("a@b@box", ("a@b", "box", None)),
    ],
)
def test_ssh_destinations_are_read_as_ssh_reads_them(text, expected):
    from remoterun.systems.ssh import parse_destination

    assert parse_destination(text) == expected


@pytest.mark.parametrize("text", ["", "me@", "box:port", "[::1]x"])
def test_malformed_destinations_are_refused(text):
    from remoterun.systems.ssh import parse_destination

    with pytest.raises(ValueError, match="SSH destination"):
        parse_destination(text)


def _jump_config(tmp_path, jump_server, inner_server, proxy_jump: str) -> str:
    config = tmp_path / "ssh_config"
    known = tmp_path / "known_hosts"
    known.write_text(
        Path(jump_server.known_hosts_path).read_text()
        + Path(inner_server.known_hosts_path).read_text()
    )
    config.write_text(
        jump_server.ssh_config("jumpbox").replace(jump_server.known_hosts_path, str(known))
        + inner_server.ssh_config("inner").replace(inner_server.known_hosts_path, str(known))
        + f"    ProxyJump {proxy_jump}\n"
    )
    return str(config)


@pytest.mark.parametrize("proxy_jump", ["jumpbox", "jumpbox,jumpbox"])
def test_proxy_jump_from_ssh_config(ssh_server, second_server, tmp_path, proxy_jump):
    config = _jump_config(tmp_path, ssh_server, second_server, proxy_jump)
    logins = _logins(ssh_server)
    cluster = rr.cluster("inner", ssh_config=config, python=second_server.remote_python())
    assert rr.function(whoami, system=cluster)() == servers.USER_B
    host = cluster.hosts[0]
    # One login on the jump host per hop, for the host's one connection.
    assert _logins(ssh_server) - logins == proxy_jump.count(",") + 1
    if host.transport == "paramiko":
        # The host's connection runs inside a channel of the (last) jump host's connection.
        jump_transport = host.link._jump_clients[-1].get_transport()
        assert isinstance(host.link.client.get_transport().sock, paramiko.Channel)
        assert host.link.client.get_transport().sock.get_transport() is jump_transport
    else:
        master = host.link.master
        hops = [pid for pid in servers.descendants(master.pid) if _is_ssh(pid)]
        assert len(hops) == proxy_jump.count(",") + 1  # ssh -W, one per hop
    run = rr.function(whoami, system=cluster).run(run_name="through-the-jump")
    assert run.result(timeout=30) == servers.USER_B
    cluster.close()
    # Closing the cluster closes its jump hosts.
    if host.transport == "paramiko":
        assert not jump_transport.is_active()
    else:
        assert master.poll() is not None
        deadline = time.monotonic() + 5
        while any(servers.pid_alive(pid) for pid in hops):
            assert time.monotonic() < deadline, "a jump host's ssh outlived the cluster"
            time.sleep(0.05)


def _logins(server) -> int:
    return server.log().count(f"Accepted publickey for {server.user} ")


def _is_ssh(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "ssh"
    except OSError:
        return False


def test_proxy_jump_argument_with_user_and_port(ssh_server, second_server, tmp_path):
    config = _jump_config(tmp_path, ssh_server, second_server, "none")
    logins = _logins(ssh_server)
    cluster = rr.cluster(
        "inner",
        ssh_config=config,
        python=second_server.remote_python(),
        proxy_jump=f"{servers.USER_A}@jumpbox:{ssh_server.port}",
    )
    assert rr.function(whoami, system=cluster)() == servers.USER_B
    assert _logins(ssh_server) - logins == 1  # as USER_A, on the jump host
    cluster.close()


@pytest.mark.parametrize("hops", [1, 2])
def test_a_jump_host_is_checked_against_the_clusters_known_hosts(
    ssh_server, second_server, tmp_path, hops
):
    # No ssh_config: the jump host's key can only come from the cluster's known_hosts,
    # and one key logs in on both hosts.
    authorized = Path(second_server.tmpdir) / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + ssh_server.client_key_public + "\n")
    known = tmp_path / "known_hosts"
    known.write_text(second_server.known_hosts_line + "\n")  # the host's key only
    options = dict(
        host="127.0.0.1",
        port=second_server.port,
        user=second_server.user,
        key=ssh_server.client_key_path,
        known_hosts=str(known),
        proxy_jump=",".join([f"{ssh_server.user}@127.0.0.1:{ssh_server.port}"] * hops),
        python=second_server.remote_python(),
        connect_timeout=5,
    )
    try:
        strict = rr.cluster("jumped", **options)
        with pytest.raises(rr.HostKeyError):
            rr.function(whoami, system=strict)()
        strict.close()
        trusting = rr.cluster("jumped", trust_new_hosts=True, **options)
        assert rr.function(whoami, system=trusting)() == servers.USER_B
        trusting.close()
        # The jump host's key went into the cluster's file, and is known from then on.
        assert _key_recorded(known, ssh_server.port)
        again = rr.cluster("jumped", **options)
        assert rr.function(whoami, system=again)() == servers.USER_B
        again.close()
    finally:
        authorized.write_text(original)


def test_unreachable_jump_host_is_named(ssh_server, second_server, tmp_path):
    config = _jump_config(tmp_path, ssh_server, second_server, "none")
    cluster = rr.cluster(
        "inner",
        ssh_config=config,
        python=second_server.remote_python(),
        proxy_jump=f"{servers.USER_A}@127.0.0.1:{servers.free_port()}",
        connect_timeout=2,
    )
    with pytest.raises(rr.SystemUnavailableError, match=f"cannot reach {servers.USER_A}@127.0.0.1"):
        rr.function(whoami, system=cluster)()
    cluster.close()


# --------------------------------------------------------------------------- bootstrap


def test_package_is_uploaded_once_per_version(ssh_server):
    from remoterun.systems.ssh import package_archive

    version = package_archive().version
    pkg = Path(ssh_server.home, ".remoterun", "pkg", version)
    first = make_cluster(ssh_server)
    rr.function(tasks.add, system=first)(1)
    marker = pkg / ".complete"
    assert marker.exists()
    assert (pkg / "remoterun" / "agent" / "__main__.py").exists()
    assert (pkg / "cloudpickle").is_dir()  # the host's Python has no cloudpickle of its own
    before = marker.stat().st_mtime_ns
    second = make_cluster(ssh_server)
    rr.function(tasks.add, system=second)(1)
    assert marker.stat().st_mtime_ns == before
    assert not [p for p in pkg.parent.iterdir() if ".tmp" in p.name or p.suffix == ".gz"]
    first.close()
    second.close()


def test_missing_interpreter_names_host_and_interpreter(ssh_server):
    cluster = make_cluster(ssh_server, python="/nonexistent/python3")
    with pytest.raises(rr.SystemUnavailableError, match="/nonexistent/python3") as info:
        rr.function(tasks.add, system=cluster)(1)
    assert f"{servers.USER_A}@127.0.0.1" in str(info.value)
    assert "python=" in str(info.value)


def test_setup_runs_once_per_host_and_again_when_changed(ssh_server):
    # A counter of its own: a setup list the host ran already (for the other transport's
    # run of this test) is not run again.
    counter = Path(ssh_server.home, f"setup-count-{os.getpid()}-{time.monotonic_ns()}")
    command = f"echo ran >> {counter}"
    for _ in range(2):
        cluster = make_cluster(ssh_server, setup=[command])
        rr.function(tasks.add, system=cluster)(1)
        cluster.close()
    assert counter.read_text() == "ran\n"
    changed = make_cluster(ssh_server, setup=[command, "echo second"])
    rr.function(tasks.add, system=changed)(1)
    changed.close()
    assert counter.read_text() == "ran\nran\n"
    counter.unlink()
    failing = make_cluster(ssh_server, setup=["echo broken >&2; exit 7"])
    with pytest.raises(rr.SystemUnavailableError, match="setup commands failed") as info:
        rr.function(tasks.add, system=failing)(1)
    assert "broken" in str(info.value)


def test_a_failed_setup_is_tried_again_before_the_next_call(ssh_server):
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    first, done = Path(ssh_server.home, f"setup-tried-{tag}"), Path(ssh_server.home, f"set-{tag}")
    # Fails the first time it runs, succeeds the second.
    command = f"if [ -e {first} ]; then touch {done}; else touch {first}; exit 1; fi"
    cluster = make_cluster(ssh_server, setup=[command])
    with pytest.raises(rr.SystemUnavailableError, match="setup commands failed"):
        rr.function(tasks.add, system=cluster)(1)
    assert rr.function(tasks.add, system=cluster)(1) == 3
    assert done.exists()  # the setup ran again, and this time it worked
    cluster.close()
    first.unlink()
    done.unlink()


def test_runs_live_on_the_host(cluster, ssh_server, remoterun_home):
    rr.function(tasks.add, system=cluster)(1, run_name="on-host")
    assert cluster.root.startswith(ssh_server.home + "/")
    config = Path(cluster.root, "on-host", "config.json")
    assert config.exists()
    assert pwd.getpwuid(config.stat().st_uid).pw_name == servers.USER_A
    assert not (remoterun_home / "runs" / "on-host").exists()
    run = cluster.get_run("on-host")
    assert run.url.startswith(
        f"ssh://{servers.USER_A}@127.0.0.1:{ssh_server.port}/home/{servers.USER_A}/"
    )
    assert run.result() == 3


def test_module_missing_on_the_host_says_so(cluster):
    from fsspec.utils import stringify_path  # installed here, not on the host

    with pytest.raises(rr.RemoteError, match="could not be loaded on this host") as info:
        rr.function(stringify_path, system=cluster)("x")
    assert "fsspec" in str(info.value)


# --------------------------------------------------------------------------- failures


def test_killed_agent_is_replaced_on_the_next_call(cluster):
    fn = rr.function(tasks.add, system=cluster)
    assert fn(1) == 3
    pid = cluster.hosts[0].facts["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert fn(2) == 4
    except rr.AgentError as exc:
        # The client may not have heard of the death yet, and a synchronous call is not
        # retried (the function may have been what killed its agent): it fails clearly,
        # and the next call gets a new agent.
        assert "lost the agent" in str(exc)
        assert fn(2) == 4
    assert cluster.hosts[0].facts["pid"] != pid


def test_detached_run_survives_sshd_dying(ssh_server, scratch):
    cluster = make_cluster(ssh_server)
    gate = scratch / "gate"
    run = rr.function(tasks.wait_for_file, system=cluster).run(str(gate), run_name="survivor")
    # Kill sshd itself, the listener and every per-connection sshd: the connection drops
    # and the agent sees its channel close. The run is in a session of its own.
    sshd_pids = [ssh_server.pid] + [p for p in _descendants(ssh_server.pid) if _comm(p) == "sshd"]
    for pid in sshd_pids:
        os.kill(pid, signal.SIGKILL)
    gate.touch()
    time.sleep(0.2)
    ssh_server.restart()
    assert run.result(timeout=30) == "finished"
    assert cluster.get_run("survivor").status is rr.RunStatus.COMPLETED
    cluster.close()


def _descendants(pid: int) -> list[int]:
    from servers import descendants

    return descendants(pid)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- several hosts


def _two_hosts(ssh_server, second_server, tmp_path, **options):
    known = tmp_path / "known_hosts"
    known.write_text(
        Path(ssh_server.known_hosts_path).read_text()
        + Path(second_server.known_hosts_path).read_text()
    )
    hosts = [
        {"host": s.host, "port": s.port, "user": s.user, "key": str(s.client_key_path)}
        for s in (ssh_server, second_server)
    ]
    return rr.cluster(
        "pool", hosts=hosts, known_hosts=str(known), python=ssh_server.remote_python(), **options
    )


def test_map_uses_every_host(ssh_server, second_server, tmp_path):
    pool = _two_hosts(ssh_server, second_server, tmp_path)
    users = rr.function(tasks.sleep_then_whoami, system=pool).map(range(16))
    assert set(users) == {servers.USER_A, servers.USER_B}
    pool.close()


def test_named_runs_have_one_home_host(ssh_server, second_server, tmp_path):
    pool = _two_hosts(ssh_server, second_server, tmp_path)
    fn = rr.function(tasks.add, system=pool)
    for i in range(24):
        fn(i, run_name=f"placed-{i}")
    homes = {pool.get_run(f"placed-{i}").url.split("/home/")[1].split("/")[0] for i in range(24)}
    assert homes == {servers.USER_A, servers.USER_B}  # spread over both hosts, found on each
    for i in range(24):
        assert fn.get_or_call(i, run_name=f"placed-{i}") == i + 2
    pool.close()


def test_a_dead_host_does_not_stop_the_others(ssh_server, second_server, tmp_path):
    from servers import free_port

    pool = _two_hosts(ssh_server, second_server, tmp_path, connect_timeout=2)
    pool.hosts[1].port = free_port()
    results = rr.function(whoami, system=pool).map(range(8))
    assert set(results) == {servers.USER_A}
    pool.close()


@pytest.fixture(scope="module")
def default_sshd(ssh_server):
    """An sshd with Debian's defaults, MaxSessions 10 included."""
    from servers import SshServer

    server = SshServer(servers.USER_C).start()
    yield server
    server.stop()


def test_many_threads_fit_in_the_default_max_sessions(default_sshd):
    cluster = make_cluster(default_sshd)
    fn = rr.function(tasks.sleep_then_whoami, system=cluster)
    fn(run_name="shared-log")
    results, errors = [], []

    def call() -> None:
        try:
            results.append(fn())
            results.append(cluster.get_run("shared-log").stdout())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results.count(servers.USER_C) == 16
    assert len(cluster.hosts[0]._pool._idle) <= 8
    cluster.close()


def test_a_run_handle_outlives_its_cluster_closing(cluster):
    run = rr.function(tasks.add, system=cluster).run(1, run_name="kept-handle")
    assert run.result(timeout=30) == 3
    cluster.close()
    assert run.refresh().stdout() == "adding 1 and 2\n"
    assert run.folder.read_result() is not None
