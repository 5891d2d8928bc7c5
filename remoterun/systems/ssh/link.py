"""A host's link: the one connection an SSH host is reached over, whichever program
speaks SSH for it. ``SSHHost`` asks four things of it: run a command, start an agent on
a stream of its own, open SFTP, close. ``ParamikoLink`` does them in this process with
paramiko; ``openssh.OpenSSHLink`` drives the ``ssh`` binary (and so the user's whole
ssh_config)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, NamedTuple

import paramiko

from ...errors import HostKeyError, SystemUnavailableError
from .commands import _drain_stderr, _exec
from .endpoint import _endpoint, _jump_hops, _tunnel

logger = logging.getLogger(__name__)

TRANSPORTS = ("openssh", "paramiko")

# A wide channel window: at paramiko's default (2 MB) a large argument or result spends
# most of its time waiting for window adjustments.
_WINDOW_SIZE = 32 << 20
_MAX_PACKET = 32 << 10


class AgentStream(NamedTuple):
    """A program started on the host (an agent), and its byte streams."""

    read: Callable[[int], bytes]
    write: Callable[[Any], Any]
    close: Callable[[], None]
    alive: Callable[[], bool]
    # After it failed: its exit status (-1 when unknown) and what it wrote to stderr.
    failure: Callable[[], tuple[int, str]]


class Link:
    """The connection to one host. ``open`` connects (raising HostKeyError or
    SystemUnavailableError with the fix), and the rest work once it is open."""

    transport = ""
    hostname: str
    user: str
    port: int
    generation = 0  # opened how many times: what was made over an older one is stale

    def is_open(self) -> bool:
        raise NotImplementedError

    def override(self, name: str, value: Any) -> None:
        """Change the ``user``, ``port`` or ``key`` given for the host (until it
        reconnects, the open connection stays as it is)."""
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError

    def exec(self, command: str, timeout: float | None, stdin: bytes = b"") -> tuple[int, str, str]:
        """Run a shell command on the host: ``(exit status, out, err)``."""
        raise NotImplementedError

    def start(self, command: str) -> AgentStream:
        """Start a long-lived program (an agent) on a stream of its own."""
        raise NotImplementedError

    def open_sftp(self) -> paramiko.SFTPClient:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ParamikoLink(Link):
    """The host over paramiko: the SSH protocol in this process, through the jump hosts,
    ~/.ssh/config read for HostName, User, Port, IdentityFile, UserKnownHostsFile and
    ProxyJump."""

    transport = "paramiko"

    def __init__(
        self,
        *,
        alias: str,
        user: str | None,
        port: int | None,
        key: str | None,
        ssh_config: str | None,
        known_hosts: str | None,
        trust_new_hosts: bool,
        connect_timeout: float,
        proxy_jump: str | None,
    ):
        self.endpoint = _endpoint(alias, user, port, key, ssh_config, known_hosts)
        jump = proxy_jump if proxy_jump is not None else self.endpoint.proxy_jump
        # Each hop is resolved like a host (its ~/.ssh/config entry, its keys), now, so a
        # malformed ProxyJump fails when the cluster is made, not at its first call.
        # A hop without an IdentityFile of its own is offered the host's key too.
        self.jumps = [
            _endpoint(hop, hop_user, hop_port, None, ssh_config, known_hosts)
            for hop_user, hop, hop_port in _jump_hops(jump)
        ]
        for hop in self.jumps:
            if not hop.config_keys:
                hop.config_keys = [self.endpoint.key] if self.endpoint.key else []
                hop.look_for_keys = True
        self.trust_new_hosts = trust_new_hosts
        self.connect_timeout = connect_timeout
        self.client: paramiko.SSHClient | None = None
        self._jump_clients: list[paramiko.SSHClient] = []

    hostname = property(lambda self: self.endpoint.hostname)
    user = property(lambda self: self.endpoint.user)
    port = property(lambda self: self.endpoint.port)

    def override(self, name: str, value: Any) -> None:
        if name == "key":
            value = os.path.expanduser(value) if value else None
            self.endpoint.config_keys = []
            self.endpoint.look_for_keys = value is None
        setattr(self.endpoint, name, value)

    def is_open(self) -> bool:
        client = self.client
        transport = client.get_transport() if client is not None else None
        return transport is not None and transport.is_active()

    def open(self) -> None:
        self.close()
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
            self.client = self.endpoint.connect(
                self.trust_new_hosts, self.connect_timeout, open_sock, via
            )
        except (HostKeyError, SystemUnavailableError):
            self._close_jumps()
            raise
        self.generation += 1

    def _client(self) -> paramiko.SSHClient:
        client = self.client
        if client is None:
            raise SystemUnavailableError(f"the connection to {self.endpoint.label} is closed")
        return client

    def exec(self, command: str, timeout: float | None, stdin: bytes = b"") -> tuple[int, str, str]:
        return _exec(self._client(), command, timeout, stdin)

    def start(self, command: str) -> AgentStream:
        transport = self._client().get_transport()
        try:
            if transport is None:
                raise paramiko.SSHException("the connection is closed")
            channel = transport.open_session(
                window_size=_WINDOW_SIZE, max_packet_size=_MAX_PACKET, timeout=self.connect_timeout
            )
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SystemUnavailableError(
                f"cannot open a channel to {self.endpoint.label}: {exc}"
            ) from exc

        def failure() -> tuple[int, str]:
            err = _drain_stderr(channel)
            return (channel.recv_exit_status() if channel.exit_status_ready() else -1), err

        return AgentStream(
            channel.recv,
            channel.sendall,
            channel.close,
            lambda: not (channel.closed or channel.eof_received),
            failure,
        )

    def open_sftp(self) -> paramiko.SFTPClient:
        return self._client().open_sftp()

    def _close_jumps(self) -> None:
        jumps, self._jump_clients = self._jump_clients, []
        for jump in reversed(jumps):
            jump.close()

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
        self._close_jumps()
