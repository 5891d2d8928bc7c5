"""Endpoints: where and as whom to connect to a host or a jump host, read from
~/.ssh/config and ProxyJump destinations, and connecting to one (retried while a busy
server drops new connections), directly or through the jump host before it."""

from __future__ import annotations

import getpass
import itertools
import logging
import os
import random
import socket
import time
from typing import Any, Callable

import paramiko

from ...errors import HostKeyError, SystemUnavailableError
from .hostkeys import _AeadFirstTransport, changed_key_error, key_checking_client

logger = logging.getLogger(__name__)

# Pauses between attempts to connect to a server that dropped the connection: the first,
# and the most, before jitter (Endpoint.connect).
_RETRY_FIRST = 0.05
_RETRY_CAP = 1.0


def _ssh_config(alias: str, path: str | None) -> dict:
    path = os.path.expanduser(path or "~/.ssh/config")
    if not os.path.exists(path):
        return {}
    return paramiko.SSHConfig.from_path(path).lookup(alias)


def _local_user() -> str:
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
        client = key_checking_client(self.known_hosts, trust_new, self.hostname, self.port)
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
            raise changed_key_error(exc, self.hostname, self.port, via) from None
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
