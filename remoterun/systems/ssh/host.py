"""One host of an SSH cluster: its link (a paramiko connection, or the OpenSSH client's
master connection), the package installed and agents started over sessions of that link,
and its run folders read over SFTP on it."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shlex
import threading
import time
from typing import Any, ContextManager, Sequence

from ... import registry
from ...agent import pickling
from ...agent.protocol import Op, exact_reader
from ...agent.runfolder import RunFolder
from ...errors import (
    AgentError,
    HostKeyError,
    RunExistsError,
    RunNotFoundError,
    SystemUnavailableError,
)
from ...folder import FsspecFiles, check_run_name, copy_out
from ...version import __version__
from ..base import System
from ..connection import AgentConnection, ConnectionPool
from .link import TRANSPORTS, Link, ParamikoLink
from .package import (
    MIN_PYTHON,
    boot_command,
    boot_install,
    package_archive,
    package_damage,
    package_dir,
    upload_package,
)
from .sftp import _HostFileSystem, _SharedSFTPFileSystem

logger = logging.getLogger(__name__)

# A host that failed to connect is left out of placement for this long.
_DOWN_FOR = 30.0
# Ops that may be sent again after a lost connection: they change nothing twice.
_IDEMPOTENT = frozenset({Op.PING, Op.STATUS, Op.CANCEL})


class _PackageDamaged(Exception):
    """The host's copy of the package is missing, or not what the client installed."""


def default_transport() -> str:
    """``$REMOTERUN_SSH_TRANSPORT`` when set, else "paramiko".

    The OpenSSH transport is not the default yet: issue 13 made it the default only if
    it met every goal of its bench rows (``bench/run.py --only ssh.transport``), and two
    are missed: a synchronous call (×2.0–2.3 of a raw ssh pipe echo, against ≤ ×1.3)
    and a 10 MB reply (×0.90–0.95 of paramiko's, against ≤ ×0.75)."""
    return os.environ.get("REMOTERUN_SSH_TRANSPORT", "").strip().lower() or "paramiko"


def make_link(transport: str | None, **options: Any) -> Link:
    """The link of ``transport`` ("openssh" or "paramiko"; None: the default)."""
    transport = transport or default_transport()
    if transport == "paramiko":
        return ParamikoLink(**options)
    if transport == "openssh":
        from .openssh import OpenSSHLink

        return OpenSSHLink(**options)
    raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")


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
        transport: str | None = None,
    ):
        if max_sessions < 3:
            raise ValueError(
                "max_sessions must be at least 3 (one for SFTP, one for control, one agent)"
            )
        self.alias = alias
        self.known_hosts = os.path.expanduser(known_hosts) if known_hosts else None
        self.link = make_link(
            transport,
            alias=alias,
            user=user,
            port=port,
            key=key,
            ssh_config=ssh_config,
            known_hosts=self.known_hosts,
            trust_new_hosts=trust_new_hosts,
            connect_timeout=connect_timeout,
            proxy_jump=proxy_jump,
        )
        self.transport = self.link.transport
        self.python = python
        self.env = dict(env)
        self.setup = list(setup)
        self.trust_new_hosts = trust_new_hosts
        self.connect_timeout = connect_timeout
        self._root_spec = root
        self.name = f"{cluster_name}:{alias}"
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
        registry.add_open_host(self)  # lineage reads ssh:// links through it

    def __repr__(self) -> str:
        return f"<SSHHost {self.user}@{self.hostname}:{self.port}>"

    # Where the host is and as whom, as the link resolves them with the ssh config; the
    # user, port and key given can be changed (for the next connection).
    hostname = property(lambda self: self.link.hostname)
    user = property(lambda self: self.link.user, lambda self, v: self.link.override("user", v))
    port = property(lambda self: self.link.port, lambda self, v: self.link.override("port", v))
    key = property(None, lambda self, value: self.link.override("key", value))

    def host_label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def pkg_dir(self) -> str:
        """Where the package lives on the host, relative to the home folder."""
        return package_dir()

    def reads_locally(self, folder: Any) -> bool:
        host = getattr(getattr(folder.files, "fs", None), "_host", None)
        return host is not None and host.host_label() == self.host_label()

    @property
    def busy(self) -> int:
        return self._pool.busy

    @property
    def cpus(self) -> int:
        return int(self.facts.get("cpus") or 1)

    def parallelism(self) -> int:
        if not self.facts:
            self._request({"op": Op.PING})
        return min(self.cpus, self.max_sessions - 2)

    # ------------------------------------------------------------------ connecting

    def connected(self) -> Link:
        """The host's one link, opened (and the setup commands run) on first use, and
        again after it dropped."""
        link = self.link
        if link.is_open():
            return link
        with self._lock:
            if not link.is_open():
                self._pool.close()
                self._close_fs()
                try:
                    link.open()
                except (HostKeyError, SystemUnavailableError):
                    self.down_until = time.monotonic() + _DOWN_FOR
                    raise
                self.down_until = 0.0
                try:
                    self._run_setup(link)
                except BaseException:
                    link.close()  # the next use connects and tries the setup again
                    raise
        return link

    def _close_fs(self) -> None:
        fs, self._fs = self._fs, None
        if fs is not None and getattr(fs, "ftp", None) is not None:
            try:
                fs.ftp.close()
            except Exception:  # noqa: BLE001 - a dead connection's channel: best effort
                pass

    def _run_setup(self, link: Link) -> None:
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
        status, _, err = link.exec(command, timeout=None)
        if status != 0:
            raise SystemUnavailableError(
                f"the setup commands failed on {self.host_label()} (exit {status}; full "
                f"output in ~/{marker}.log there):\n{err.strip()}"
            )

    def _install_package(self, link: Link, seen: int) -> None:
        """Install the package on the host (again), unless another thread did since this
        one saw ``seen`` installs: the archive goes in on the extraction's stdin, so it
        never lies on the host's disk."""
        with self._install_lock:
            if self._installs != seen:
                return
            status, err = upload_package(link.exec, self.python, self.connect_timeout)
            if status != 0:
                raise SystemUnavailableError(self._python_failure(status, err))
            self._installs += 1
        logger.debug("installed remoterun %s on %s", package_archive().version, self.host_label())

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
        link = self.connected()
        installs = self._installs
        try:
            # Until an agent has started here (facts), agents boot able to take the
            # package in their own session.
            return self._start_agent(link, install=not self.facts)
        except _PackageDamaged as exc:
            # Not there yet (a new host or version), or a file of it was changed or
            # deleted: install it again rather than run it, then start the agent anew.
            log = logger.debug if str(exc) == "it is missing" else logger.warning
            log("remoterun in ~/%s on %s: %s; installing it", self.pkg_dir, self.host_label(), exc)
            self._install_package(link, installs)
        try:
            return self._start_agent(link)
        except _PackageDamaged as exc:
            raise SystemUnavailableError(
                f"remoterun in ~/{self.pkg_dir} on {self.host_label()}: {exc}, even after "
                "installing it again; is something on the host changing that folder?"
            ) from None

    def _start_agent(self, link: Link, install: bool = False) -> AgentConnection:
        """An agent on a new stream. With ``install``, its boot asks for the package when
        the host's is missing or damaged, and installs it in the same session."""
        stream = link.start(boot_command(self._python_abs or self.python, self.env, install))

        def stop() -> None:
            # sshd sends no signal when a channel closes: a call abandoned mid-way (Ctrl-C)
            # would run on in the agent. The agent leads its process group (sshd made it a
            # session leader): kill the group, with what the call started in it, as the
            # agent does itself when its connection drops. Recorded runs are in sessions
            # of their own.
            pid = conn.facts.get("pid")
            if isinstance(pid, int):
                command = f"kill -KILL -- -{pid} 2>/dev/null || kill -KILL {pid}"
                link.exec(command, timeout=self.connect_timeout)

        conn = AgentConnection(
            stream.read,
            stream.write,
            stream.close,
            label=self.host_label(),
            alive=stream.alive,
            stop=stop,
        )
        try:
            if install:
                self._install_in_band(stream)
            facts = conn.handshake()
        except SystemUnavailableError:
            status, err = stream.failure()
            conn.close()
            damage = package_damage(err)
            if damage is not None:  # the status is lost when the channel closes first
                raise _PackageDamaged(damage) from None
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

    def _install_in_band(self, stream: Any) -> None:
        """The boot's question answered: the package sent when the host asks for it."""
        try:
            why = boot_install(exact_reader(stream.read), stream.write)
        except (EOFError, OSError) as exc:  # the boot ended: its error output says why
            raise SystemUnavailableError(str(exc)) from None
        if why:
            with self._install_lock:
                self._installs += 1
            log = logger.debug if why == "it is missing" else logger.warning
            log(
                "remoterun in ~/%s on %s: %s; installed it",
                self.pkg_dir,
                self.host_label(),
                why,
            )

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
        function = pickling.dumps(copy_out)  # by reference: the host has remoterun
        inputs = pickling.dumps(
            {"args": [root, name, dst_url, storage_options, overwrite, records], "kwargs": {}}
        )
        op = {"op": Op.CALL, "fn_key": "copy_out:" + __version__, "inputs": inputs}
        reply, _, error = self.call(op, function)
        if isinstance(error, (RunExistsError, RunNotFoundError)):
            raise error  # as the client's own copy would
        if error is not None:  # the host could not even load it: the client copies
            return f"{type(error).__name__}: {error}"
        return pickling.loads(reply["result"])

    # ------------------------------------------------------------------ storage

    @property
    def root(self) -> str:
        spec = self._root_spec
        if spec.startswith("~"):
            if not self.facts:
                self._request({"op": Op.PING})
            spec = self.facts["home"] + spec[1:]
        elif not spec.startswith("/"):
            if not self.facts:
                self._request({"op": Op.PING})
            spec = posixpath.join(self.facts["home"], spec)
        return posixpath.normpath(spec)

    def filesystem(self) -> _SharedSFTPFileSystem:
        link = self.connected()
        fs = self._fs
        if fs is None or fs.generation != link.generation:
            with self._lock:
                if self._fs is None or self._fs.generation != link.generation:
                    self._fs = _SharedSFTPFileSystem(
                        link.open_sftp, self.host_label(), link.generation
                    )
                fs = self._fs
        return fs

    def folder(self, name: str, root: str | None = None) -> Any:
        check_run_name(name)
        files = FsspecFiles(_HostFileSystem(self))
        return RunFolder(files, f"{(root or self.root).rstrip('/')}/{name}")

    def close(self) -> None:
        self._pool.close()
        with self._lock:  # not while another thread connects
            self._close_fs()
            self.link.close()
