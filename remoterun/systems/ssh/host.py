"""SSH clusters: one paramiko connection per host, a persistent agent over exec channels.

The only module that imports paramiko. remoterun's own source and the client's
cloudpickle are installed in ``~/.remoterun/pkg/<version>/`` on each host (once per
version, private to the host's user), and the agent is started from there over an exec
channel, once the host has checked the folder against the package's manifest of SHA-256
digests (else it is installed again); each concurrent call gets its own channel on the
same connection. Run folders are read with SFTP over that same connection.

Host keys are checked against ``~/.ssh/known_hosts`` (and the cluster's own file); an
unknown host is refused with the command that trusts it. No port is opened on any host.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import os
import posixpath
import random
import shlex
import socket
import tarfile
import threading
import time
import urllib.parse
import weakref
from typing import TYPE_CHECKING, Any, Callable, ContextManager, NamedTuple, Sequence

import paramiko
from fsspec.implementations.sftp import SFTPFileSystem

from ...errors import (
    AgentError,
    HostKeyError,
    RunExistsError,
    RunNotFoundError,
    SystemUnavailableError,
)
from ..base import System, share_list
from ..connection import AgentConnection, ConnectionPool

if TYPE_CHECKING:
    from ...run import Run

logger = logging.getLogger(__name__)

PKG_DIR = ".remoterun/pkg"
MIN_PYTHON = (3, 9)
DEFAULT_ROOT = "~/.remoterun/runs"
# A host that failed to connect is left out of placement for this long.
_DOWN_FOR = 30.0
# A wide channel window: at paramiko's default (2 MB) a large argument or result spends
# most of its time waiting for window adjustments.
_WINDOW_SIZE = 32 << 20
_MAX_PACKET = 32 << 10
# Ops that may be sent again after a lost connection: they change nothing twice.
_IDEMPOTENT = frozenset({"ping", "status", "cancel"})
# Pauses between attempts to connect to a server that dropped the connection: the first,
# and the most, before jitter (Endpoint.connect).
_RETRY_FIRST = 0.05
_RETRY_CAP = 1.0


# --------------------------------------------------------------------------- the package


class HostPackage(NamedTuple):
    """What the client installs on hosts: remoterun's and cloudpickle's Python sources."""

    version: str  # names the host's folder, ~/.remoterun/pkg/<version>
    archive: bytes  # tar.gz of the sources and their manifest
    manifest_digest: str  # SHA-256 of the manifest, which holds each file's SHA-256


@functools.lru_cache(maxsize=1)
def package_archive() -> HostPackage:
    """The package to install on hosts, built once per process.

    The version covers every file's path and content, so any change installs anew. The
    archive holds a manifest (``.manifest``, ``sha256sum`` format: ``<digest>  <path>``),
    which the host checks the folder against each time an agent starts.
    """
    import cloudpickle

    import remoterun

    sources = []
    for package in (remoterun, cloudpickle):
        top = os.path.dirname(os.path.abspath(package.__file__))
        base = os.path.dirname(top)
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for filename in sorted(files):
                if filename.endswith(".py"):
                    path = os.path.join(folder, filename)
                    with open(path, "rb") as f:
                        sources.append((os.path.relpath(path, base).replace(os.sep, "/"), f.read()))
    version = hashlib.blake2b(digest_size=10)
    manifest = []
    for name, data in sources:
        version.update(name.encode() + b"\0" + data + b"\0")
        manifest.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    manifest_bytes = "".join(manifest).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name, data in [*sources, (".manifest", manifest_bytes)]:  # read by _HOST_PRELUDE
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600  # the host's folders are private to their owner
            tar.addfile(info, io.BytesIO(data))
    return HostPackage(
        version.hexdigest(), buffer.getvalue(), hashlib.sha256(manifest_bytes).hexdigest()
    )


# The start of every Python program the client runs on a host, before it imports anything
# but os and sys (loaded before any path is searched). The host user's home (the working
# directory, put first on sys.path as '') and PYTHONPATH must not shadow remoterun,
# cloudpickle or the standard library: so the standard library comes first, then the
# rest (PYTHONPATH, site-packages) for the user's functions, and the working directory
# not at all; the package is put before them all once it checks out (_BOOT). ``python
# -I`` would also drop the user's site-packages.
# argv[1] is the package folder (relative to the home folder), argv[2] the manifest's digest.
_HOST_PRELUDE = r"""
import os, sys
pkg, expected = os.path.abspath(sys.argv[1]), sys.argv[2]
stdlib = os.path.dirname(os.__file__)
zipped = os.path.join(os.path.dirname(stdlib), "python%d%d.zip" % sys.version_info[:2])
lib = [p for p in sys.path if p in (stdlib, zipped) or (p.startswith(stdlib + os.sep)
       and os.path.basename(p) not in ("site-packages", "dist-packages"))]
sys.path[:] = lib + [p for p in sys.path if p not in lib and p not in ("", ".", os.getcwd(),
                    pkg)]
import hashlib


def damage(folder):
    # Why the folder is not the package the client sent, or "" when it is.
    try:
        with open(os.path.join(folder, ".manifest"), "rb") as f:
            manifest = f.read()
    except OSError:
        return "it is missing" if not os.path.isdir(folder) else "its manifest is missing"
    if hashlib.sha256(manifest).hexdigest() != expected:
        return "its manifest was changed"
    listed = {".manifest", ".complete"}
    for line in manifest.decode().splitlines():
        digest, name = line.split("  ", 1)
        listed.add(name)
        try:
            with open(os.path.join(folder, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return name + " was changed"
        except OSError:
            return name + " is missing"
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            name = os.path.relpath(os.path.join(top, name), folder)
            if name not in listed:
                return name + " was added"
    return ""


def private(path):
    # Owner only: what runs here (and a run's secrets) is nobody else's to read or change.
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
"""

# Starts the agent once the package checks out; else says _DAMAGED_MESSAGE and exits, and
# the client installs the package again. No request reaches an agent from a damaged folder.
_BOOT = (
    _HOST_PRELUDE
    + r"""
why = damage(pkg)
if why:
    sys.stderr.write("remoterun: the package is not as installed: %s\n" % why)
    sys.exit(3)
for path in (os.path.dirname(os.path.dirname(pkg)), os.path.dirname(pkg)):
    private(path)
sys.path.insert(0, pkg)
del sys.argv[1:]
import runpy
runpy.run_module("remoterun.agent", run_name="__main__", alter_sys=True)
"""
)
_DAMAGED_MESSAGE = "remoterun: the package is not as installed: "


class _PackageDamaged(Exception):
    """The host's copy of the package is missing, or not what the client installed."""


# Installs the archive read from stdin: extracted next to its final place, checked, then
# renamed there, so that a folder under pkg/<version> is complete. A folder that is
# there but damaged is replaced; one that checks out (another client was first) is kept.
_EXTRACT = (
    _HOST_PRELUDE
    + r"""
import io, shutil, tarfile
os.umask(0o077)
archive = sys.stdin.buffer.read()
for path in (os.path.dirname(os.path.dirname(pkg)), os.path.dirname(pkg)):
    os.makedirs(path, mode=0o700, exist_ok=True)
    private(path)
if damage(pkg):
    tmp = "%s.tmp-%d" % (pkg, os.getpid())
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
    why = damage(tmp)
    if why:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit("the uploaded package does not check out: " + why)
    open(os.path.join(tmp, ".complete"), "w").close()
    old = "%s.old-%d" % (pkg, os.getpid())
    try:
        if os.path.isdir(pkg) and damage(pkg):
            os.rename(pkg, old)
        os.rename(tmp, pkg)
    except OSError:
        pass  # another client was first
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
"""
)


# --------------------------------------------------------------------------- host keys


def _fingerprint(key: paramiko.PKey) -> str:
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown host key with the command that trusts it, or record it when the
    cluster was made with ``trust_new_hosts=True``."""

    def __init__(self, trust_new: bool, save_to: str, host: str, port: int):
        self.trust_new = trust_new
        self.save_to = save_to
        self.host, self.port = host, port

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        fingerprint = _fingerprint(key)
        if not self.trust_new:
            port = f"-p {self.port} " if self.port != 22 else ""
            raise HostKeyError(
                f"{hostname} is not in known_hosts; it offers the {key.get_name()} key "
                f"{fingerprint}. If that is the host's key, trust it with:\n"
                f"  ssh-keyscan {port}{self.host} >> ~/.ssh/known_hosts\n"
                "or create the cluster with trust_new_hosts=True"
            )
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.save_to) or ".", exist_ok=True)
        with open(self.save_to, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        logger.warning(
            "trusted the new host key %s of %s (saved in %s)", fingerprint, hostname, self.save_to
        )


class _AeadFirstTransport(paramiko.Transport):
    """paramiko's transport, preferring AES-GCM: one pass per packet instead of a cipher
    and a separate MAC, which cuts a 10 MB reply from ~57 to ~34 ms here. The same
    ciphers as paramiko's default list, only reordered; a server without GCM falls back."""

    _preferred_ciphers = tuple(
        sorted(paramiko.Transport._preferred_ciphers, key=lambda c: "gcm@openssh.com" not in c)
    )


# --------------------------------------------------------------------------- SFTP


class _SharedSFTPFileSystem(SFTPFileSystem):
    """fsspec's SFTP filesystem over a connection that is already open.

    One SFTP channel, used by one thread at a time: paramiko's SFTPClient is not safe
    for requests from several threads at once (one thread can take another's response
    and leave it waiting forever), and a channel per thread would spend the server's
    sessions per connection (MaxSessions, 10 by default) that agents need.
    """

    def __init__(self, client: paramiko.SSHClient, label: str):
        self._shared_client = client
        self._label = label
        self._one_at_a_time = threading.RLock()
        super().__init__(label, skip_instance_cache=True)

    def _connect(self) -> None:
        self.client = self._shared_client
        self.ftp = self.client.open_sftp()

    def unstrip_protocol(self, name: str) -> str:
        return f"ssh://{self._label}{name if name.startswith('/') else '/' + name}"


def _one_at_a_time(method_name: str) -> Any:
    method = getattr(SFTPFileSystem, method_name)

    @functools.wraps(method)
    def locked(self: _SharedSFTPFileSystem, *args: Any, **kwargs: Any) -> Any:
        with self._one_at_a_time:
            return method(self, *args, **kwargs)

    return locked


# What RunFolder and Run use; each runs whole under the lock (cat_file reads the file).
for _name in (
    "cat_file",
    "pipe_file",
    "ls",
    "info",
    "mv",
    "rm_file",
    "makedirs",
    "mkdir",
    "exists",
    "size",
    "find",
    "get_file",
    "put_file",
    "rm",
    "rmdir",
):
    setattr(_SharedSFTPFileSystem, _name, _one_at_a_time(_name))


class _HostFileSystem:
    """The host's SFTP filesystem as of each call: a Run handle keeps working after its
    cluster reconnects or was closed (it connects again), instead of holding a
    filesystem over a dead connection."""

    protocol = ("sftp", "ssh")

    def __init__(self, host: SSHHost):
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host.filesystem(), name)

    def unstrip_protocol(self, path: str) -> str:  # a run's URL needs no SFTP channel
        return f"ssh://{self._host.host_label()}{path if path.startswith('/') else '/' + path}"

    def __repr__(self) -> str:
        return f"<SFTP of {self._host.host_label()}>"


# Hosts of the clusters this process holds, so that a lineage link to an ssh:// URL finds
# the connection (and its host-key checks) to read it with.
_open_hosts: weakref.WeakValueDictionary[int, SSHHost] = weakref.WeakValueDictionary()


def url_filesystem(url: str, **options: Any) -> tuple[Any, str]:
    """The filesystem and path of an ``ssh://[user@]host[:port]/path`` (or ``sftp://``)
    URL, over remoterun's own connection to that host: its key checked against
    known_hosts and ~/.ssh/config honoured, as for a cluster (fsspec's own SFTP would take
    any host key). ``options``: ``key``, ``known_hosts``, ``trust_new_hosts``,
    ``python`` (the host is prepared as for a cluster, on first use)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host: ssh://[user@]host[:port]/path")
    unknown = set(options) - {"key", "known_hosts", "trust_new_hosts", "python"}
    if unknown:
        raise ValueError(
            f"ssh:// URLs take key=, known_hosts=, trust_new_hosts=, python=; "
            f"not {', '.join(sorted(unknown))}"
        )
    cluster = SSHCluster(
        parts.hostname,
        host=parts.hostname,
        user=parts.username,
        port=parts.port,
        key=options.get("key"),
        known_hosts=options.get("known_hosts"),
        trust_new_hosts=bool(options.get("trust_new_hosts")),
        python=options.get("python") or "python3",
    )
    return _HostFileSystem(cluster.hosts[0]), parts.path or "/"


def open_host(label: str) -> SSHHost | None:
    """A host of a live cluster of this process whose label is ``user@host:port``."""
    for host in list(_open_hosts.values()):
        if host.host_label() == label:
            return host
    return None


# --------------------------------------------------------------------------- one host


def _endpoint_field(name: str) -> Any:
    return property(
        lambda self: getattr(self.endpoint, name),
        lambda self, value: setattr(self.endpoint, name, value),
    )


class SSHHost(System):
    """One host of a cluster: its connection, its agents and its run folders."""

    executes = True

    def __init__(
        self,
        cluster_name: str,
        *,
        alias: str,
        user: str | None,
        key: str | None,
        port: int | None,
        python: str,
        env: dict[str, str],
        setup: Sequence[str],
        known_hosts: str | None,
        trust_new_hosts: bool,
        connect_timeout: float,
        root: str,
        ssh_config: str | None,
        max_sessions: int = 10,
        proxy_jump: str | None = None,
    ):
        if max_sessions < 3:
            raise ValueError(
                "max_sessions must be at least 3 (one for SFTP, one for control, one agent)"
            )
        self.alias = alias
        self.known_hosts = os.path.expanduser(known_hosts) if known_hosts else None
        self.endpoint = _endpoint(alias, user, port, key, ssh_config, self.known_hosts)
        jump = proxy_jump if proxy_jump is not None else self.endpoint.proxy_jump
        # Each hop is resolved like a host (its ~/.ssh/config entry, its keys), now, so a
        # malformed ProxyJump fails when the cluster is made, not at its first call.
        # A hop without an IdentityFile of its own is offered the host's key too.
        self.jumps = [
            _endpoint(hop, hop_user, hop_port, None, ssh_config, self.known_hosts)
            for hop_user, hop, hop_port in _jump_hops(jump)
        ]
        for hop in self.jumps:
            if not hop.config_keys:
                hop.config_keys = [self.endpoint.key] if self.endpoint.key else []
                hop.look_for_keys = True
        self._jump_clients: list[paramiko.SSHClient] = []
        self.python = python
        self.env = dict(env)
        self.setup = list(setup)
        self.trust_new_hosts = trust_new_hosts
        self.connect_timeout = connect_timeout
        self._root_spec = root
        self.name = f"{cluster_name}:{alias}"
        self._client: paramiko.SSHClient | None = None
        self._fs: _SharedSFTPFileSystem | None = None
        self._lock = threading.Lock()
        self._python_abs: str | None = None
        self._install_lock = threading.Lock()
        self._installs = 0  # installs of the package by this client, to install once
        self.facts: dict = {}
        self.down_until = 0.0
        # One session of the connection is SFTP's, one is kept for control (stopping an
        # agent whose call was interrupted); the rest may be agents.
        self.max_sessions = max_sessions
        self._pool = ConnectionPool(
            self._open_agent, max_idle=max_sessions - 2, max_open=max_sessions - 2
        )
        _open_hosts[id(self)] = self

    def __repr__(self) -> str:
        return f"<SSHHost {self.user}@{self.hostname}:{self.port}>"

    # Where the host is and as whom: its endpoint holds them, with how to authenticate.
    hostname = _endpoint_field("hostname")
    user = _endpoint_field("user")
    port = _endpoint_field("port")
    key = _endpoint_field("key")

    def host_label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def pkg_dir(self) -> str:
        """Where the package lives on the host, relative to the home folder."""
        return f"{PKG_DIR}/{package_archive().version}"

    def reads_locally(self, folder: Any) -> bool:
        host = getattr(folder.fs, "_host", None)
        return host is not None and host.host_label() == self.host_label()

    @property
    def busy(self) -> int:
        return self._pool.busy

    @property
    def cpus(self) -> int:
        return int(self.facts.get("cpus") or 1)

    def parallelism(self) -> int:
        if not self.facts:
            self._request({"op": "ping"})
        return min(self.cpus, self.max_sessions - 2)

    # ------------------------------------------------------------------ connecting

    def client(self) -> paramiko.SSHClient:
        """The host's one connection, opened (and the package uploaded) on first use."""
        client = self._client
        if (
            client is not None
            and client.get_transport() is not None
            and client.get_transport().is_active()
        ):
            return client
        with self._lock:
            client = self._client
            if (
                client is None
                or client.get_transport() is None
                or not client.get_transport().is_active()
            ):
                self._pool.close()
                self._fs = None
                client = self._client = self._connect()
        return client

    def _connect(self) -> paramiko.SSHClient:
        self._close_jumps()
        try:
            open_sock = None
            via = ""
            # Each hop is reached through the one before it, the host through the last;
            # each attempt at a hop gets a new channel from the one before.
            for hop, after in zip(self.jumps, self.jumps[1:] + [self.endpoint]):
                jump = hop.connect(self.trust_new_hosts, self.connect_timeout, open_sock, via)
                self._jump_clients.append(jump)
                open_sock = functools.partial(_tunnel, jump, after, hop)
                via = f" (via jump host {hop.label})"
            client = self.endpoint.connect(
                self.trust_new_hosts, self.connect_timeout, open_sock, via
            )
        except (HostKeyError, SystemUnavailableError):
            self._close_jumps()
            self.down_until = time.monotonic() + _DOWN_FOR
            raise
        self.down_until = 0.0
        self._run_setup(client)
        return client

    def _run_setup(self, client: paramiko.SSHClient) -> None:
        """Run the cluster's setup commands once per host; again when the list changes.

        Their output is kept in ``~/.remoterun/setup/<hash>.log`` on the host.
        """
        if not self.setup:
            return
        digest = hashlib.blake2b("\n".join(self.setup).encode(), digest_size=8).hexdigest()
        marker = f".remoterun/setup/{digest}"
        script = " && ".join(f"( {cmd} )" for cmd in self.setup)
        # remoterun's files are the owner's only (umask 077); the commands keep the umask
        # they would have had.
        command = (
            "cd && (umask 077 && mkdir -p .remoterun/setup && chmod 700 .remoterun "
            f".remoterun/setup) && if [ -e {marker}.done ]; then exit 0; fi; "
            f"(umask 077 && : > {marker}.log && chmod 600 {marker}.log) && "
            f"( {script} ) >> {marker}.log 2>&1 && (umask 077 && touch {marker}.done) && exit 0; "
            f"status=$?; tail -c 2000 {marker}.log >&2; exit $status"
        )
        status, _, err = _exec(client, command, timeout=None)
        if status != 0:
            raise SystemUnavailableError(
                f"the setup commands failed on {self.host_label()} (exit {status}; full "
                f"output in ~/{marker}.log there):\n{err.strip()}"
            )

    def _close_jumps(self) -> None:
        jumps, self._jump_clients = self._jump_clients, []
        for jump in reversed(jumps):
            jump.close()

    def _install_package(self, client: paramiko.SSHClient, seen: int) -> None:
        """Install the package on the host (again), unless another thread did since this
        one saw ``seen`` installs: the archive goes in on the extraction's stdin, so it
        never lies on the host's disk."""
        with self._install_lock:
            if self._installs != seen:
                return
            package = package_archive()
            command = (
                f"cd && {self.python} -c {shlex.quote(_EXTRACT)} "
                f"{shlex.quote(self.pkg_dir)} {package.manifest_digest}"
            )
            status, _, err = _exec(client, command, self.connect_timeout, stdin=package.archive)
            if status != 0:
                raise SystemUnavailableError(self._python_failure(status, err))
            self._installs += 1
        logger.debug("installed remoterun %s on %s", package.version, self.host_label())

    def _python_failure(self, status: int, err: str) -> str:
        hint = (
            f"install Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ there, or pass "
            "python='/path/to/python3' to rr.cluster"
        )
        if status == 127 or "not found" in err:
            return f"no Python interpreter {self.python!r} on {self.host_label()}: {hint}"
        return (
            f"the Python interpreter {self.python!r} on {self.host_label()} failed "
            f"(exit {status}): {err.strip()[-800:]}; {hint}"
        )

    # ------------------------------------------------------------------ agents

    def _open_agent(self) -> AgentConnection:
        client = self.client()
        installs = self._installs
        try:
            return self._start_agent(client)
        except _PackageDamaged as exc:
            # Not there yet (a new host or version), or a file of it was changed or
            # deleted: install it again rather than run it, then start the agent anew.
            log = logger.debug if str(exc) == "it is missing" else logger.warning
            log("remoterun in ~/%s on %s: %s; installing it", self.pkg_dir, self.host_label(), exc)
            self._install_package(client, installs)
        try:
            return self._start_agent(client)
        except _PackageDamaged as exc:
            raise SystemUnavailableError(
                f"remoterun in ~/{self.pkg_dir} on {self.host_label()}: {exc}, even after "
                "installing it again; is something on the host changing that folder?"
            ) from None

    def _start_agent(self, client: paramiko.SSHClient) -> AgentConnection:
        transport = client.get_transport()
        assert transport is not None
        python = self._python_abs or self.python
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in self.env.items())
        # The host checks the package against its manifest in this same exec, and the
        # agent's modules come from the package, never from the home folder or PYTHONPATH
        # (_BOOT). PYTHONPATH still names the package for the processes functions start.
        command = (
            f'cd && {exports}PYTHONPATH="$HOME/{self.pkg_dir}${{PYTHONPATH:+:$PYTHONPATH}}" '
            f"exec {python} -u -c {shlex.quote(_BOOT)} {shlex.quote(self.pkg_dir)} "
            f"{package_archive().manifest_digest}"
        )
        try:
            channel = transport.open_session(
                window_size=_WINDOW_SIZE, max_packet_size=_MAX_PACKET, timeout=self.connect_timeout
            )
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SystemUnavailableError(
                f"cannot open a channel to {self.host_label()}: {exc}"
            ) from exc

        def close() -> None:
            channel.close()

        def stop() -> None:
            # sshd sends no signal when a channel closes: a call abandoned mid-way (Ctrl-C)
            # would run on in the agent. The agent leads its process group (sshd made it a
            # session leader): kill the group, with what the call started in it, as the
            # agent does itself when its connection drops. Recorded runs are in sessions
            # of their own.
            pid = conn.facts.get("pid")
            if isinstance(pid, int):
                command = f"kill -KILL -- -{pid} 2>/dev/null || kill -KILL {pid}"
                _exec(client, command, timeout=self.connect_timeout)

        conn = AgentConnection(
            channel.recv,
            channel.sendall,
            close,
            label=self.host_label(),
            alive=lambda: not (channel.closed or channel.eof_received),
            stop=stop,
        )
        try:
            facts = conn.handshake()
        except SystemUnavailableError:
            err = _drain_stderr(channel)
            status = channel.recv_exit_status() if channel.exit_status_ready() else -1
            if _DAMAGED_MESSAGE in err:  # the status is lost when the channel closes first
                raise _PackageDamaged(err.split(_DAMAGED_MESSAGE, 1)[1].strip()) from None
            raise SystemUnavailableError(self._python_failure(status, err)) from None
        version = tuple(int(p) for p in facts["python"].split(".")[:2])
        if version < MIN_PYTHON:
            conn.close()
            raise SystemUnavailableError(
                f"{facts['executable']} on {self.host_label()} is Python {facts['python']}; "
                f"remoterun needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer"
            )
        self.facts = facts
        self._python_abs = shlex.quote(facts["executable"])
        return conn

    def _connection(self) -> ContextManager[AgentConnection]:
        return self._pool.connection()

    def _request(self, op: dict, on_output: Any = None) -> dict:
        try:
            return super()._request(op, on_output)
        except AgentError:
            if op.get("op") not in _IDEMPOTENT:
                raise
            # The connection dropped (sshd restarted, network blip): reconnect, ask again.
            logger.info("lost the agent on %s; reconnecting", self.host_label())
            return super()._request(op, on_output)

    def copy_direct(
        self,
        name: str,
        root: str,
        dst_url: str,
        storage_options: dict,
        overwrite: bool,
        records: bool = True,
    ) -> str | None:
        """Have the host copy its run folder to ``dst_url`` itself (without the records
        unless ``records``: the client writes them, signed); None when it did, else why
        it could not (the client then copies)."""
        op = {
            "op": "copy_out",
            "root": root,
            "name": name,
            "dst": dst_url,
            "storage_options": storage_options,
            "overwrite": overwrite,
            "records": records,
        }
        reply = self.request(op, run_name=name)
        if reply.get("refused") == "RunExistsError":
            raise RunExistsError(reply["why"])
        if reply.get("refused") == "RunNotFoundError":
            raise RunNotFoundError(reply["why"])
        return None if reply["copied"] else reply["why"]

    # ------------------------------------------------------------------ storage

    @property
    def root(self) -> str:
        spec = self._root_spec
        if spec.startswith("~"):
            if not self.facts:
                self._request({"op": "ping"})
            spec = self.facts["home"] + spec[1:]
        elif not spec.startswith("/"):
            if not self.facts:
                self._request({"op": "ping"})
            spec = posixpath.join(self.facts["home"], spec)
        return posixpath.normpath(spec)

    def filesystem(self) -> _SharedSFTPFileSystem:
        client = self.client()
        fs = self._fs
        if fs is None or fs.client is not client:
            with self._lock:
                if self._fs is None or self._fs.client is not client:
                    self._fs = _SharedSFTPFileSystem(client, self.host_label())
                fs = self._fs
        return fs

    def folder(self, name: str, root: str | None = None) -> Any:
        from ...folder import RunFolder, check_run_name

        check_run_name(name)
        return RunFolder(_HostFileSystem(self), f"{(root or self.root).rstrip('/')}/{name}")

    def close(self) -> None:
        self._pool.close()
        with self._lock:
            client, self._client, self._fs = self._client, None, None
        if client is not None:
            client.close()
        self._close_jumps()


def _exec(
    client: paramiko.SSHClient, command: str, timeout: float | None, stdin: bytes = b""
) -> tuple[int, str, str]:
    """Run ``command`` on the host, ``stdin`` as its input; ``(exit status, out, err)``."""
    writer, stdout, stderr = client.exec_command(command, timeout=timeout)
    if stdin:
        writer.write(stdin)
    writer.channel.shutdown_write()
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def _drain_stderr(channel: paramiko.Channel) -> str:
    deadline = time.monotonic() + 2
    parts = []
    while time.monotonic() < deadline:
        if channel.recv_stderr_ready():
            parts.append(channel.recv_stderr(65536))
        elif channel.exit_status_ready():
            while channel.recv_stderr_ready():
                parts.append(channel.recv_stderr(65536))
            break
        else:
            time.sleep(0.01)
    return b"".join(parts).decode(errors="replace")


def _ssh_config(alias: str, path: str | None) -> dict:
    path = os.path.expanduser(path or "~/.ssh/config")
    if not os.path.exists(path):
        return {}
    return paramiko.SSHConfig.from_path(path).lookup(alias)


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def parse_destination(text: str) -> tuple[str | None, str, int | None]:
    """``(user, host, port)`` of ``[user@]host[:port]``, ``[user@][v6addr]:port`` or
    ``ssh://[user@]host[:port]``, as ssh and its ProxyJump option take them."""
    rest = text.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://") :].rstrip("/")
    user, _, rest = rest.rpartition("@")
    port: str | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"cannot read the SSH destination {text!r}")
            port = tail[1:]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    if not host or (port is not None and not port.isdigit()):
        raise ValueError(f"cannot read the SSH destination {text!r}: expected [user@]host[:port]")
    return user or None, host, int(port) if port else None


def _jump_hops(spec: str | None) -> list[tuple[str | None, str, int | None]]:
    """The hops of a ProxyJump value: comma-separated destinations, first hop first."""
    if not spec or spec.strip().lower() == "none":
        return []
    return [parse_destination(hop) for hop in spec.split(",")]


class _Endpoint:
    """Where and as whom to connect: a host or a jump host, resolved with ~/.ssh/config
    (HostName, User, Port, IdentityFile, UserKnownHostsFile, ProxyJump)."""

    def __init__(
        self,
        alias: str,
        user: str | None,
        port: int | None,
        key: str | None,
        config: dict,
        known_hosts: str | None,
    ):
        self.hostname = config.get("hostname", alias)
        self.user = user or config.get("user") or _local_user()
        self.port = int(port or config.get("port") or 22)
        self.key = os.path.expanduser(key) if key else None
        identity = config.get("identityfile") or []
        self.config_keys = [os.path.expanduser(k) for k in identity] if not key else []
        self.look_for_keys = self.key is None and not self.config_keys
        self.proxy_jump: str | None = config.get("proxyjump")
        files = [known_hosts] if known_hosts else []
        files += [os.path.expanduser(f) for f in str(config.get("userknownhostsfile", "")).split()]
        self.known_hosts = [f for f in files if f != "/dev/null"]

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def connect(
        self,
        trust_new: bool,
        timeout: float,
        open_sock: Callable[[], Any] | None = None,
        via: str = "",
    ) -> paramiko.SSHClient:
        """An authenticated connection, the host key checked; errors say how to fix them.

        ``open_sock`` opens the stream to connect over (a jump host's channel), else a TCP
        connection is made. A connection the server drops before authentication (a busy
        sshd past its MaxStartups) is tried again, after a pause that doubles up to
        _RETRY_CAP, jittered so that clients dropped together do not all come back
        together, for as long as ``timeout`` allows. A refused connection, a failed login
        and a host key error are not tried again.
        """
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            sock = open_sock() if open_sock is not None else None
            try:
                return self._connect_once(trust_new, deadline - time.monotonic(), sock, via)
            except _DroppedError as exc:
                ceiling = min(_RETRY_CAP, _RETRY_FIRST * 2**attempt)
                pause = ceiling / 2 + random.uniform(0, ceiling / 2)
                if time.monotonic() + pause >= deadline:
                    raise SystemUnavailableError(
                        f"cannot reach {self.label}{via}: {exc} ({attempt + 1} attempts in "
                        f"{timeout:g} s: the server drops new connections; if it is busy, "
                        "raise connect_timeout, or its MaxStartups in sshd_config)"
                    ) from None
                logger.debug(
                    "%s%s dropped the connection (%s); again in %.2f s", self.label, via, exc, pause
                )
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _connect_once(
        self, trust_new: bool, timeout: float, sock: Any, via: str
    ) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        for path in self.known_hosts:
            if os.path.exists(path):
                client.load_host_keys(path)
        save_to = (self.known_hosts or [os.path.expanduser("~/.ssh/known_hosts")])[0]
        client.set_missing_host_key_policy(
            _HostKeyPolicy(trust_new, save_to, self.hostname, self.port)
        )
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.user,
                key_filename=self.key or (self.config_keys or None),
                look_for_keys=self.look_for_keys,
                allow_agent=True,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                sock=sock,
                transport_factory=_AeadFirstTransport,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"the host key of {self.hostname}:{self.port}{via} has CHANGED: it offers "
                f"{_fingerprint(exc.key)}, known_hosts has {_fingerprint(exc.expected_key)}. "
                "This may be an attack; if the host was really reinstalled, remove the old key "
                f"with: ssh-keygen -R '[{self.hostname}]:{self.port}'"
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SystemUnavailableError(
                f"authentication as {self.user!r} on {self.hostname}:{self.port}{via} failed "
                f"({exc}); check user= and key= (or the IdentityFile in ~/.ssh/config)"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            if _dropped(exc):
                raise _DroppedError(str(exc) or type(exc).__name__) from None
            raise SystemUnavailableError(f"cannot reach {self.label}{via}: {exc}") from None
        transport = client.get_transport()
        assert transport is not None
        if isinstance(transport.sock, socket.socket):  # not a jump host's channel
            # Frames are small and latency-bound: never wait for Nagle's algorithm.
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_keepalive(30)
        return client


class _DroppedError(Exception):
    """The server closed or reset a connection before it was authenticated."""


def _dropped(exc: BaseException) -> bool:
    """Whether a failed attempt to connect is one a busy server makes: closed or reset
    during the handshake (sshd past its MaxStartups closes new connections at once), not
    refused (nothing listens) nor timed out (the time is spent)."""
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError)):
        return True
    return isinstance(exc, paramiko.SSHException) and (
        "Error reading SSH protocol banner" in str(exc)
        and "timed out" not in str(exc)
        or isinstance(exc.__cause__ or exc.__context__, (ConnectionResetError, EOFError))
    )


def _endpoint(
    alias: str,
    user: str | None,
    port: int | None,
    key: str | None,
    ssh_config: str | None,
    known_hosts: str | None,
) -> _Endpoint:
    return _Endpoint(alias, user, port, key, _ssh_config(alias, ssh_config), known_hosts)


def _tunnel(jump: paramiko.SSHClient, target: _Endpoint, hop: _Endpoint) -> paramiko.Channel:
    """A direct-tcpip channel from the jump host ``hop`` to ``target`` (the next hop or
    the host itself); like ``ssh -J``, it opens no port anywhere."""
    transport = jump.get_transport()
    assert transport is not None
    try:
        return transport.open_channel("direct-tcpip", (target.hostname, target.port), ("", 0))
    except (paramiko.SSHException, OSError) as exc:
        jump.close()
        raise SystemUnavailableError(
            f"the jump host {hop.label} cannot forward to {target.hostname}:{target.port} "
            f"({exc}); it needs AllowTcpForwarding in its sshd_config"
        ) from None


# --------------------------------------------------------------------------- clusters


class SSHCluster(System):
    """One or more SSH hosts that run functions and hold run folders.

    Unrecorded calls go to the least-loaded host. A recorded run of a given name always
    lives on the same host (rendezvous hashing of the name over the hosts), so that every
    client asking for that name asks the host that decides it; ``get_run`` also looks on
    the other hosts, for runs recorded before the host list changed.
    """

    executes = True

    def __init__(
        self,
        name: str,
        *,
        host: str | None = None,
        hosts: Sequence[str | dict] | None = None,
        user: str | None = None,
        key: str | None = None,
        port: int | None = None,
        python: str = "python3",
        setup: Sequence[str] = (),
        env: dict[str, str] | None = None,
        known_hosts: str | None = None,
        trust_new_hosts: bool = False,
        connect_timeout: float = 10.0,
        root: str = DEFAULT_ROOT,
        ssh_config: str | None = None,
        max_sessions: int = 10,
        proxy_jump: str | None = None,
        share: Any = None,
    ):
        """An SSH cluster of one host (``host=``, default: ``name`` as an ~/.ssh/config alias)
        or several (``hosts=[...]``: aliases, ``"user@host:port"`` strings, or dicts that
        override options per host). Nothing connects until the first use.

        Args:
            user, key, port: override what ~/.ssh/config says (default user: yours).
            python: the interpreter on the hosts, resolved once to its absolute path.
            setup: shell commands run once per host (again when the list changes).
            env: environment variables for the agents and the runs they start.
            known_hosts: a known_hosts file checked besides ~/.ssh/known_hosts.
            trust_new_hosts: record unknown host keys instead of refusing them (never changed
                ones).
            root: where run folders live on each host.
            max_sessions: channels opened at once on each host's connection (sshd's
                MaxSessions, 10 by default); calls past it wait for a free one.
            proxy_jump: reach the hosts through jump hosts, as ssh's ``-J``:
                ``"[user@]jump[:port]"``, several comma-separated, first hop first;
                ``"none"`` ignores a ProxyJump from ~/.ssh/config. Each hop's own
                ~/.ssh/config entry and known_hosts apply.
            ssh_config: the ssh_config file to read instead of ~/.ssh/config.
            share: shared stores (folder URLs) for every function run here: see
                ``rr.function(share=...)``.
        """
        if host and hosts:
            raise ValueError("give host= or hosts=, not both")
        aliases = list(hosts) if hosts else [host or name]
        if not aliases:
            raise ValueError("a cluster needs at least one host")
        self.name = name
        self.setup = list(setup)
        common = dict(
            user=user,
            key=key,
            port=port,
            python=python,
            env=dict(env or {}),
            setup=self.setup,
            known_hosts=known_hosts,
            trust_new_hosts=trust_new_hosts,
            connect_timeout=connect_timeout,
            root=root,
            ssh_config=ssh_config,
            max_sessions=max_sessions,
            proxy_jump=proxy_jump,
        )
        self.share = share_list(share)
        self._options = dict(
            common,
            host=host,
            hosts=list(hosts) if hosts else None,
            share=[list(p) for p in self.share],
        )
        self.hosts = [SSHHost(name, **_host_options(entry, common)) for entry in aliases]

    def __reduce__(self) -> tuple:
        return (_rebuild_cluster, (self.name, self._options))

    def save(self) -> str:
        """Keep this cluster's definition in ``$REMOTERUN_HOME/clusters/<name>.json`` (key
        file paths, never keys), so that ``rr.cluster(name)`` and the ``remoterun`` command
        find it; return the file's path."""
        from .. import save_cluster

        return save_cluster(self.name, self._options)

    def __repr__(self) -> str:
        return f"<SSHCluster {self.name!r} hosts={[h.host_label() for h in self.hosts]}>"

    # ------------------------------------------------------------------ placement

    def placement(self, run_name: str | None) -> SSHHost:
        """The host for a run of that name, or the least-loaded host for None."""
        if len(self.hosts) == 1:
            return self.hosts[0]
        if run_name is not None:
            return max(self.hosts, key=lambda h: _rendezvous(h.host_label(), run_name))
        now = time.monotonic()
        up = [h for h in self.hosts if h.down_until <= now] or self.hosts
        return min(up, key=lambda h: (h.busy / h.cpus, h.busy))

    def _connection(self) -> ContextManager[AgentConnection]:
        return _FailoverConnection(self)

    def parallelism(self) -> int:
        """The cores of the hosts that answer (a host that does not is left out)."""
        total = 0
        for host in self.hosts:
            if host.down_until > time.monotonic():
                continue
            try:
                total += host.parallelism()
            except SystemUnavailableError as exc:
                logger.warning("leaving %s out: %s", host.host_label(), exc)
                host.down_until = time.monotonic() + _DOWN_FOR
        if total == 0:
            raise SystemUnavailableError(f"no host of cluster {self.name!r} answers")
        return total

    @property
    def root(self) -> str:
        return self.hosts[0].root

    def filesystem(self) -> _SharedSFTPFileSystem:
        return self.hosts[0].filesystem()

    def folder(self, name: str, root: str | None = None) -> Any:
        return self.placement(name).folder(name, root)

    def status(self, name: str, *, root: str | None = None, want_outcome: bool = False) -> dict:
        return self.placement(name).status(name, root=root, want_outcome=want_outcome)

    def cancel(self, name: str, *, root: str | None = None, grace: float = 3.0) -> dict | None:
        return self.placement(name).cancel(name, root=root, grace=grace)

    def get_run(self, name: str) -> Run:
        from ...errors import RunNotFoundError

        first = self.placement(name)
        for host in [first] + [h for h in self.hosts if h is not first]:
            try:
                return host.get_run(name)
            except RunNotFoundError:
                continue
        raise RunNotFoundError(f"no run named {name!r} on any host of cluster {self.name!r}")

    def runs(self) -> list[Run]:
        return [run for host in self.hosts for run in host.runs()]

    def close(self) -> None:
        for host in self.hosts:
            host.close()


def _rendezvous(host: str, run_name: str) -> bytes:
    return hashlib.blake2b(f"{host}\0{run_name}".encode(), digest_size=8).digest()


class _FailoverConnection:
    """A connection to the least-loaded host that can be reached; a host that cannot is
    skipped (and left out of placement for a while) when others remain."""

    def __init__(self, cluster: SSHCluster):
        self.cluster = cluster
        self._inner: Any = None

    def __enter__(self) -> AgentConnection:
        errors = []
        for _ in range(len(self.cluster.hosts)):
            host = self.cluster.placement(None)
            try:
                self._inner = host._connection()
                return self._inner.__enter__()
            except SystemUnavailableError as exc:
                errors.append(exc)
                host.down_until = time.monotonic() + _DOWN_FOR
                if len(self.cluster.hosts) == 1:
                    raise
        raise errors[-1]

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)


def _host_options(entry: str | dict, common: dict) -> dict:
    """Options of one host: ``"alias"``, ``"user@host:port"``, or a dict that overrides the
    cluster's options (``{"host": ..., "port": ..., "user": ..., "key": ...}``)."""
    options = dict(common)
    if isinstance(entry, dict):
        entry = dict(entry)
        alias = entry.pop("host")
        unknown = set(entry) - set(common)
        if unknown:
            raise ValueError(f"unknown host options {sorted(unknown)} for {alias!r}")
        options.update(entry)
    else:
        user, alias, port = parse_destination(entry)
        if user:
            options["user"] = user
        if port:
            options["port"] = port
    options["alias"] = alias
    return options


def _rebuild_cluster(name: str, options: dict) -> SSHCluster:
    return SSHCluster(name, **options)


# Pickles name the rebuild function in the package, as before the module became one: a
# cluster's pickle, and so the fingerprint of an argument that holds a cluster, keep
# their bytes.
_rebuild_cluster.__module__ = "remoterun.systems.ssh"
