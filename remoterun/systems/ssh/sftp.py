"""Run folders over SFTP: fsspec's SFTP filesystem on a host's link, one
request at a time, and the view of it that follows the host through reconnections."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Protocol

import paramiko
from fsspec.implementations.sftp import SFTPFileSystem


class _SharedSFTPFileSystem(SFTPFileSystem):
    """fsspec's SFTP filesystem over a host's link (a paramiko channel, or an
    ``ssh -s HOST sftp`` process over the OpenSSH master).

    One SFTP channel, used by one thread at a time: paramiko's SFTPClient is not safe
    for requests from several threads at once (one thread can take another's response
    and leave it waiting forever), and a channel per thread would spend the server's
    sessions per connection (MaxSessions, 10 by default) that agents need.
    """

    def __init__(self, open_sftp: Callable[[], paramiko.SFTPClient], label: str, generation: int):
        self._open_sftp = open_sftp
        self.generation = generation  # of the host's link it was opened over
        self._label = label
        self._one_at_a_time = threading.RLock()
        super().__init__(label, skip_instance_cache=True)

    def _connect(self) -> None:
        self.client = None
        self.ftp = self._open_sftp()

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


class _SFTPHost(Protocol):
    """What _HostFileSystem needs of a host (an SSHHost)."""

    def filesystem(self) -> _SharedSFTPFileSystem: ...

    def host_label(self) -> str: ...


class _HostFileSystem:
    """The host's SFTP filesystem as of each call: a Run handle keeps working after its
    cluster reconnects or was closed (it connects again), instead of holding a
    filesystem over a dead connection."""

    protocol = ("sftp", "ssh")

    def __init__(self, host: _SFTPHost):
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host.filesystem(), name)

    def unstrip_protocol(self, path: str) -> str:  # a run's URL needs no SFTP channel
        return f"ssh://{self._host.host_label()}{path if path.startswith('/') else '/' + path}"

    def __repr__(self) -> str:
        return f"<SFTP of {self._host.host_label()}>"
