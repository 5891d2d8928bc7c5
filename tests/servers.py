"""Real (not mocked) test servers: an OpenSSH ``sshd`` per fake host, and moto S3.

Both bind to 127.0.0.1 on a free port, run as separate processes that the
objects own, and are stopped by ``stop()`` (or by leaving the ``with`` block).

``SshServer``
    One instance is one "host": its own sshd process, port, ed25519 host key,
    known_hosts file, client key pair and Unix user (so its own home dir).
    Logging in as a user other than the current one needs root (the user is
    created with ``useradd`` when missing); without root only the current
    user can be served.

``MotoS3Server``
    ``python -m moto.server -H 127.0.0.1 -p PORT`` in a child process, with
    ``storage_options()`` for ``s3fs.S3FileSystem(**opts)``.  Nothing global
    (``os.environ``) is changed; ``env()`` lists the variables a test may set
    itself (e.g. with ``monkeypatch.setenv``) for code that reads them.

Python for remote users: the pyenv interpreter lives under ``/root`` (mode
700), so other users cannot run it, nor any virtualenv made from it.  Use
``SshServer.remote_python()``; on the Debian 12 image it is Debian's
``/usr/bin/python3`` (3.11, stdlib only).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import paramiko
    import s3fs

SSHD = "/usr/sbin/sshd"
LOCALHOST = "127.0.0.1"
#: Interpreters tried, in order, by ``SshServer.remote_python()``.
REMOTE_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "python3")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
#: The Unix users that play the suite's hosts. A stopping server kills every process of
#: its user, so two suites running at once on one machine need their own users:
#: ``RR_TEST_USER_PREFIX=rrtestx pytest ...``.
USER_PREFIX = os.environ.get("RR_TEST_USER_PREFIX") or "rrtest"
USER_A, USER_B, USER_C = (f"{USER_PREFIX}_{x}" for x in "abc")


class ServerUnavailable(RuntimeError):
    """A test server cannot be provided on this machine (tests should skip)."""


# --------------------------------------------------------------------------
# small process / network helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    """Return True if a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ppid_map() -> dict[int, list[int]]:
    """Map parent pid -> child pids for all live processes (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Return all live descendant pids of ``pid`` (children first)."""
    children = _ppid_map()
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def terminate_pids(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever survives ``timeout`` seconds."""
    _signal(pids, signal.SIGTERM)
    left = _wait_gone(pids, timeout)
    if left:
        _signal(left, signal.SIGKILL)
        _wait_gone(left, timeout)


def _stop_popen(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig`` to our child ``proc`` and reap it (SIGKILL after timeout)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# --------------------------------------------------------------------------
# OpenSSH
# --------------------------------------------------------------------------


def ensure_openssh_server(timeout: float = 900.0) -> str:
    """Return the sshd path, installing Debian's openssh-server if root.

    Raises ServerUnavailable (with install instructions) when sshd is missing
    and cannot be installed.
    """
    if os.access(SSHD, os.X_OK):
        return SSHD
    hint = "install it with: sudo apt-get install openssh-server"
    if os.geteuid() != 0:
        raise ServerUnavailable(f"{SSHD} not found and not root; {hint}")
    if shutil.which("apt-get") is None:
        raise ServerUnavailable(f"{SSHD} not found and no apt-get; {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "openssh-server"]

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    result = run(install)
    if result.returncode != 0:  # most often a stale/missing package list
        run(["apt-get", "update", "-q"])
        result = run(install)
    if result.returncode != 0 or not os.access(SSHD, os.X_OK):
        tail = (result.stdout + result.stderr)[-2000:]
        raise ServerUnavailable(f"could not install openssh-server; {hint}\n{tail}")
    return SSHD


def openssh_version(sshd: str = SSHD) -> tuple[int, int]:
    """Return sshd's (major, minor) version, e.g. (9, 2)."""
    out = subprocess.run([sshd, "-V"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _shadow_field(name: str) -> str | None:
    """Return the password field of ``name`` in /etc/shadow (root only)."""
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == name and len(parts) > 1:
                return parts[1]
    except OSError:
        return None
    return None


def ensure_user(name: str) -> pwd.struct_passwd:
    """Return user ``name``, creating it (root only) so sshd accepts key logins.

    ``useradd`` leaves the account locked (``!`` in /etc/shadow) and sshd
    without PAM refuses locked accounts even for public keys, so a freshly
    locked password field is replaced by ``*`` (no password, not locked).
    A separate user's home is made private (0700), as on a real other host.
    """
    if not _USER_RE.match(name):
        raise ValueError(f"invalid user name {name!r}")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            raise ServerUnavailable(f"user {name!r} is missing; creating it needs root") from None
        subprocess.run(
            ["useradd", "-m", "-s", "/bin/bash", name],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pw = pwd.getpwnam(name)
    if os.geteuid() == 0 and pw.pw_uid != 0:
        field = _shadow_field(name)
        if field in ("!", "!!", "!*"):
            subprocess.run(
                ["usermod", "-p", "*", name], check=True, capture_output=True, timeout=60
            )
        elif field is not None and field.startswith("!"):
            raise ServerUnavailable(f"user {name!r} has a locked password; sshd would refuse it")
    if not os.path.isdir(pw.pw_dir):
        raise ServerUnavailable(f"home directory {pw.pw_dir} of {name!r} does not exist")
    if os.geteuid() == 0 and pw.pw_uid not in (0, os.getuid()):
        os.chmod(pw.pw_dir, 0o700)  # useradd on Debian 12 makes it 0755
    return pw


class SshServer:
    """A private OpenSSH sshd on 127.0.0.1 serving one Unix user (one "host").

    Files live in a temp dir (``tmpdir``): sshd_config, host key, client key
    pair, authorized_keys, known_hosts, pid file and ``sshd.log``.

    Process handling: ``stop()`` sends SIGTERM (then SIGKILL) to the listening
    sshd *and* to every descendant it has (the per-connection sshd processes
    and the user's shells/commands, which sshd puts in their own sessions, so
    a process-group kill would miss them), so open connections drop.  When the
    served user is a separate user (not root, not the current user), any
    process still owned by that user (e.g. a job the test daemonised with
    nohup/setsid) is killed as well: do not share one such user between two
    live instances.  The user and its home dir persist (see ``clear_home()``).
    """

    host: str = LOCALHOST

    def __init__(
        self,
        user: str | None = None,
        *,
        port: int | None = None,
        log_level: str = "VERBOSE",
        start_timeout: float = 10.0,
        extra_config: str = "",
    ) -> None:
        """Prepare (not start) a server for ``user`` (default: current user)."""
        current = pwd.getpwuid(os.getuid()).pw_name
        self.user: str = user or current
        self.port: int = port or free_port()
        self._fixed_port = port is not None
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.extra_config = extra_config
        self.home: str = ""
        self.tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._orphans: list[int] = []  # sessions left alive by kill(sessions=False)
        self._python: str | None = None
        if self.user != current and os.geteuid() != 0:
            raise ServerUnavailable(
                f"serving user {self.user!r} needs root (current user: {current})"
            )

    # -- paths ---------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if self.tmpdir is None:
            raise RuntimeError("SshServer not started")
        return self.tmpdir / name

    @property
    def client_key_path(self) -> str:
        """Private client key (ed25519, OpenSSH format, mode 600)."""
        return str(self._path("client_key"))

    @property
    def client_key_public(self) -> str:
        """The client public key line (as in authorized_keys)."""
        return self._path("client_key.pub").read_text().strip()

    @property
    def host_key_public(self) -> str:
        """``"ssh-ed25519 AAAA..."``: the host key as used in known_hosts."""
        return " ".join(self._path("host_key.pub").read_text().split()[:2])

    @property
    def known_hosts_line(self) -> str:
        """``"[127.0.0.1]:PORT ssh-ed25519 AAAA..."``."""
        return f"[{self.host}]:{self.port} {self.host_key_public}"

    @property
    def known_hosts_path(self) -> str:
        """A known_hosts file holding only this server's key."""
        return str(self._path("known_hosts"))

    @property
    def config_path(self) -> str:
        return str(self._path("sshd_config"))

    @property
    def log_path(self) -> str:
        return str(self._path("sshd.log"))

    @property
    def pid(self) -> int | None:
        """Pid of the listening sshd, or None when not running."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Contents of the sshd log (sshd runs with ``-e``)."""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    # -- setup -----------------------------------------------------------------
    def _prepare(self) -> None:
        ensure_openssh_server()
        pw = ensure_user(self.user)
        self.home = pw.pw_dir
        self._uid = pw.pw_uid
        tmp = Path(tempfile.mkdtemp(prefix="remoterun-sshd-"))
        self.tmpdir = tmp
        # sshd reads authorized_keys with the user's uid: let it traverse.
        tmp.chmod(0o711)
        for name in ("host_key", "client_key"):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"{name}@remoterun-test",
                    "-f",
                    str(tmp / name),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        auth = tmp / "authorized_keys"
        auth.write_text(self.client_key_public + "\n")
        auth.chmod(0o644)
        if os.geteuid() == 0:
            # privilege separation directory; missing without systemd/init.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._write_config()

    def _write_config(self) -> None:
        tmp = self._path("")
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {tmp / 'host_key'}",
            f"PidFile {tmp / 'sshd.pid'}",
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
            f"AllowUsers {self.user}",
            "UsePAM no",
            # authorized_keys sits under /tmp (world-writable): StrictModes
            # would reject it.
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding yes",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "LoginGraceTime 30",
            "Subsystem sftp internal-sftp",
            f"LogLevel {self.log_level}",
        ]
        if openssh_version() >= (9, 8):
            lines.append("PerSourcePenalties no")  # don't ban 127.0.0.1 after kills
        # sshd takes a keyword's first value: extra_config's replace the defaults above.
        extra = {line.split()[0].lower() for line in self.extra_config.splitlines() if line.split()}
        lines = [line for line in lines if line.split()[0].lower() not in extra]
        text = "\n".join(lines) + "\n" + self.extra_config + "\n"
        self._path("sshd_config").write_text(text)
        self._path("known_hosts").write_text(self.known_hosts_line + "\n")

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> Self:
        """Start sshd; return once a real paramiko key login succeeds."""
        if self.running:
            return self
        if self.tmpdir is None:
            self._prepare()
        for attempt in range(3):
            try:
                self._spawn_and_wait()
                return self
            except RuntimeError:
                in_use = "Address already in use" in self.log()
                if not in_use or self._fixed_port or attempt == 2:
                    raise
                self.port = free_port()  # lost a race for the port
                self._write_config()
        return self

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                last_error = RuntimeError(f"sshd exited with {self._proc.returncode}")
                break
            if port_open(self.port):
                try:
                    self.connect(timeout=max(0.5, deadline - time.monotonic())).close()
                    return
                except Exception as exc:  # noqa: BLE001 - retried until deadline
                    last_error = exc
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"sshd on {self.host}:{self.port} not ready in {self.start_timeout}s "
            f"({last_error!r}); log {self.log_path}:\n{self.log()}"
        )

    def kill(self, sessions: bool = True) -> None:
        """SIGKILL sshd, simulating it dying; keys, port and files are kept.

        With ``sessions`` (default) its per-connection children die too, so
        open connections drop; otherwise they survive and only new
        connections are refused.
        """
        if self._proc is None:
            return
        kids = descendants(self._proc.pid) if self.running else []
        _stop_popen(self._proc, signal.SIGKILL, 5.0)
        if sessions:
            _signal(kids, signal.SIGKILL)
            _wait_gone(kids, 5.0)
        else:
            self._orphans.extend(kids)
        self._proc = None

    def restart(self) -> Self:
        """Kill (if running) and start again on the same port with the same keys."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Stop sshd and all its sessions, then remove the temp dir. Idempotent."""
        if self._proc is not None:
            # sessions first, so the still-living listener reaps them (else
            # they linger as zombies until PID 1 gets round to them)
            kids = descendants(self._proc.pid) if self.running else []
            direct = _ppid_map().get(self._proc.pid, [])
            terminate_pids(kids)
            deadline = time.monotonic() + 1.0
            while any(os.path.exists(f"/proc/{p}") for p in direct) and time.monotonic() < deadline:
                time.sleep(0.01)
            _stop_popen(self._proc, signal.SIGTERM, 5.0)
            self._proc = None
        terminate_pids([p for p in self._orphans if pid_alive(p)])
        self._orphans = []
        if self.tmpdir is not None and self._separate_user():
            terminate_pids(self.user_pids())
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- user ------------------------------------------------------------------
    def _separate_user(self) -> bool:
        uid = pwd.getpwnam(self.user).pw_uid
        return uid not in (0, os.getuid())

    def user_pids(self) -> list[int]:
        """Pids of live processes whose effective uid is the served user."""
        uid = pwd.getpwnam(self.user).pw_uid
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid and pid_alive(int(entry)):
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def clear_home(self) -> None:
        """Empty the user's home and restore /etc/skel (separate users only)."""
        pw = pwd.getpwnam(self.user)
        if not self._separate_user() or os.stat(pw.pw_dir).st_uid != pw.pw_uid:
            raise RuntimeError(f"refusing to clear the home of {self.user!r}")
        for old in os.scandir(pw.pw_dir):
            if old.is_dir(follow_symlinks=False):
                shutil.rmtree(old.path)
            else:
                os.unlink(old.path)
        skel = Path("/etc/skel")
        for entry in skel.iterdir() if skel.is_dir() else []:
            target = os.path.join(pw.pw_dir, entry.name)
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, target, symlinks=True)
            else:
                shutil.copy2(entry, target, follow_symlinks=False)
        for root, dirs, files in os.walk(pw.pw_dir):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, pw.pw_uid, pw.pw_gid)

    # -- clients ---------------------------------------------------------------
    def connect(self, timeout: float = 10.0, **kwargs: Any) -> paramiko.SSHClient:
        """Return a paramiko client logged in with strict host key checking."""
        import paramiko

        client = paramiko.SSHClient()
        client.load_host_keys(self.known_hosts_path)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        options: dict[str, Any] = {
            "username": self.user,
            "key_filename": self.client_key_path,
            "look_for_keys": False,
            "allow_agent": False,
            "timeout": timeout,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        }
        options.update(kwargs)
        try:
            client.connect(self.host, self.port, **options)
        except BaseException:
            client.close()
            raise
        return client

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """Run ``command`` over a fresh connection: (exit status, stdout, stderr)."""
        client = self.connect(timeout=timeout)
        try:
            _, stdout, stderr = client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            return stdout.channel.recv_exit_status(), out, err
        finally:
            client.close()

    def remote_python(self) -> str:
        """Absolute path of a Python 3 the served user can run (cached)."""
        if self._python is None:
            probe = (
                "; ".join(
                    f"{p} -c 'import sys; print(sys.executable)' 2>/dev/null && exit 0"
                    for p in REMOTE_PYTHON_CANDIDATES
                )
                + "; exit 1"
            )
            status, out, err = self.run(probe)
            if status != 0 or not out.strip():
                raise ServerUnavailable(f"no python3 usable by {self.user!r}: {err}")
            self._python = out.strip().splitlines()[-1]
        return self._python

    def ssh_args(self) -> list[str]:
        """argv prefix for the OpenSSH client (append a remote command)."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            self.client_key_path,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_path}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            f"{self.user}@{self.host}",
        ]

    def ssh_config(self, alias: str) -> str:
        """A ``Host alias`` block for an ssh_config file (OpenSSH or paramiko)."""
        return (
            f"Host {alias}\n"
            f"    HostName {self.host}\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.client_key_path}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts_path}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    BatchMode yes\n"
        )


# --------------------------------------------------------------------------
# moto S3
# --------------------------------------------------------------------------


class MotoS3Server:
    """``python -m moto.server`` in a child process on 127.0.0.1:PORT.

    Env variables a test may set itself for code that reads them (nothing is
    set here): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
    AWS_ENDPOINT_URL (botocore >= 1.31) and NO_PROXY -- see ``env()``.
    """

    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(
        self,
        *,
        port: int | None = None,
        python: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        """Prepare (not start); ``python`` must have ``moto[server]``."""
        self.host = LOCALHOST
        self.port = port or free_port()
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        # Never route 127.0.0.1 through an HTTP(S)_PROXY from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def log_path(self) -> str:
        if self.tmpdir is None:
            raise RuntimeError("MotoS3Server not started")
        return str(self.tmpdir / "moto.log")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    def _request(self, path: str, method: str = "GET", timeout: float = 5.0) -> int:
        req = urllib.request.Request(
            self.endpoint_url + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def start(self) -> Self:
        """Start moto and wait until ``/moto-api/data.json`` answers."""
        if self.running:
            return self
        if self.python == sys.executable:
            import importlib.util

            for mod in ("moto", "flask", "flask_cors"):
                if importlib.util.find_spec(mod) is None:
                    raise ServerUnavailable(f"{mod} missing: pip install 'moto[server]'")
        if self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="remoterun-moto-"))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.python, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            if port_open(self.port):
                try:
                    if self._request("/moto-api/data.json") == 200:
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop(keep_log=True)
        raise RuntimeError(
            f"moto_server on {self.endpoint_url} not ready in {self.start_timeout}s; "
            f"log:\n{self.log()}"
        )

    def stop(self, keep_log: bool = False) -> None:
        """Terminate the moto process (SIGKILL after 5 s). Idempotent."""
        if self._proc is not None:
            kids = descendants(self._proc.pid) if self.running else []
            _stop_popen(self._proc, signal.SIGTERM, 5.0)
            terminate_pids(kids)
            self._proc = None
        if self.tmpdir is not None and not keep_log:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def reset(self) -> None:
        """Drop all moto state (buckets, objects) via ``POST /moto-api/reset``."""
        status = self._request("/moto-api/reset", method="POST")
        if status != 200:
            raise RuntimeError(f"moto reset failed: HTTP {status}")

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem(**opts)`` / fsspec."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            # no region_name: s3fs would send it as LocationConstraint on
            # mkdir, which S3 (and moto) reject for us-east-1
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def env(self) -> dict[str, str]:
        """Environment a test may set for code that reads AWS settings from env."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "NO_PROXY": f"{self.host},localhost",
        }

    def filesystem(self) -> s3fs.S3FileSystem:
        """A fresh (uncached) S3FileSystem on this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
