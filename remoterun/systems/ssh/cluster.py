"""SSH clusters: hosts behind one System, a recorded run placed on its host by the run's
name (rendezvous hashing), calls failing over between hosts; their definitions saved and
rebuilt (pickles too), and ssh:// URLs opened as a cluster of one host."""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

from ...errors import RunNotFoundError, SystemUnavailableError
from ...registry import share_list
from ..base import System
from ..connection import AgentConnection
from ..saved import save_cluster
from .endpoint import parse_destination
from .host import _DOWN_FOR, SSHHost
from .sftp import _HostFileSystem, _SharedSFTPFileSystem

if TYPE_CHECKING:
    from ...run import Run

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.remoterun/runs"


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
        transport: str | None = None,
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
            transport: "openssh" drives the ``ssh`` binary over one master connection
                per host, so the whole ssh_config applies (Match, Include,
                certificates, ProxyCommand, GSSAPI, FIDO keys) and bulk data moves
                faster; "paramiko" speaks SSH in this process. Default:
                ``$REMOTERUN_SSH_TRANSPORT``, else "paramiko".
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
            transport=transport,
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


def url_filesystem(url: str, **options: Any) -> tuple[Any, str]:
    """The filesystem and path of an ``ssh://[user@]host[:port]/path`` (or ``sftp://``)
    URL, over remoterun's own connection to that host: its key checked against
    known_hosts and ~/.ssh/config honoured, as for a cluster (fsspec's own SFTP would take
    any host key). ``options``: ``key``, ``known_hosts``, ``trust_new_hosts``,
    ``python`` (the host is prepared as for a cluster, on first use), ``transport``."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host: ssh://[user@]host[:port]/path")
    unknown = set(options) - {"key", "known_hosts", "trust_new_hosts", "python", "transport"}
    if unknown:
        raise ValueError(
            f"ssh:// URLs take key=, known_hosts=, trust_new_hosts=, python=, transport=; "
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
        transport=options.get("transport"),
    )
    return _HostFileSystem(cluster.hosts[0]), parts.path or "/"
