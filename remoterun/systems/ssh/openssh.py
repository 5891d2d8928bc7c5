"""A host over the OpenSSH client binary: everything in the user's ssh_config applies as
``ssh HOST`` applies it (Match, Include, certificates, GSSAPI, FIDO keys, ProxyCommand,
hashed known_hosts), and the encryption runs outside this process.

One master connection per host (``ssh -M``, in the foreground, owned by this process),
its control socket in a 0700 folder under ``~/.remoterun/cm``; every agent, command and
SFTP session is an ``ssh -S`` process over it, costing a session, not a handshake. The
agent protocol runs unchanged over each process's stdin and stdout.

Nothing outlives the client: every ssh process starts in a session of its own (Ctrl-C
reaches the client, which then stops its calls over the connection, rather than the
connection itself), and on Linux asks the kernel to be sent SIGTERM when the thread that
started it ends (PR_SET_PDEATHSIG), so that a killed client leaves no ssh behind. That
signal follows the forking *thread*, so every ssh is started from the main thread or
from one long-lived spawner thread, never from a pool thread that may end. A closed link
terminates its master, which ends every session over it; the agents on the host end on
their stdin's EOF.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from typing import IO, Any

import paramiko

from ...errors import HostKeyError, SystemUnavailableError
from .endpoint import parse_destination
from .link import AgentStream, Link
from .processes import (
    PipeChannel,
    control_folder,
    spawner,
    stderr_tail,
    stop_process,
    widen_pipe,
    write_all,
)

logger = logging.getLogger(__name__)

# Pauses between attempts at a server that dropped the connection (a busy sshd past its
# MaxStartups), as for paramiko (endpoint.py).
_RETRY_FIRST = 0.05
_RETRY_CAP = 1.0
# AES-GCM first where both ends have it (one pass per packet: ~30-45 % faster on bulk
# data than OpenSSH's default chacha20-poly1305 here); "^" puts them in front of the
# default list instead of replacing it, so a server without them still connects.
_PREFER_GCM = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"

_live: weakref.WeakSet[OpenSSHLink] = weakref.WeakSet()


def ssh_binary() -> str | None:
    """The ``ssh`` client on PATH, or None."""
    return shutil.which("ssh")


# --------------------------------------------------------------------------- errors


_CHANGED = re.compile(r"Host key for (\S+) has changed")
_UNKNOWN = re.compile(r"No (\S+) host key is known for (\S+) and you have requested strict")
_OFFERED = re.compile(r"The fingerprint for the (\S+) key sent by the remote host is\s+(\S+?)\.?\s")
_REMOVE = re.compile(r'remove with:\s+ssh-keygen -f "(.+)" -R "(.+)"')
_DENIED = re.compile(r"Permission denied \(([^)]*)\)")
_DROPPED = re.compile(
    r"kex_exchange_identification|Connection reset by|Connection closed by (?!UNKNOWN)"
    r"|banner exchange|ssh_exchange_identification"
)


_REFUSED = re.compile(r"Permission denied|Connection refused|Could not resolve|No route")
# ssh's own words when a session over the master cannot be had.
_NO_SESSION = re.compile(
    r"mux_client|Control socket|ControlSocket|Session open refused|master session|"
    r"kex_exchange_identification|Connection closed by UNKNOWN|ssh_exchange_identification"
)
_SERVER_KEY = re.compile(r"Server host key: (\S+) (SHA256:\S+)")


def _connect_error(
    err: str, label: str, user: str, port: int, host: str, offered: str = "", proxy: str = ""
) -> Exception:
    """What a master's failure to connect means, from its error output (OpenSSH says why
    only in text; every failure of its own exits 255). ``proxy``: the ProxyJump or
    ProxyCommand the connection goes through."""
    err = err.replace("\r", "")
    lines = [line for line in err.strip().splitlines() if line.strip() and "@@@" not in line]
    said = "\n".join(lines[-6:])
    changed = _CHANGED.search(err)
    if changed or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
        offered = _OFFERED.search(err)
        remove = _REMOVE.search(err)
        return HostKeyError(
            f"the host key of {label} has CHANGED"
            + (f": it offers the {offered.group(1)} key {offered.group(2)}" if offered else "")
            + ". This may be an attack; if the host was really reinstalled, remove the old "
            "key with: "
            + (
                f"ssh-keygen -R '{remove.group(2)}' -f '{remove.group(1)}'"
                if remove
                else f"ssh-keygen -R '[{host}]:{port}'"
            )
        )
    unknown = _UNKNOWN.search(err)
    if unknown:
        port_arg = f"-p {port} " if port != 22 else ""
        return HostKeyError(
            f"{unknown.group(2)} is not in known_hosts"
            + (f"; it offers the {offered} key" if offered else "")
            + f". If that is the host's key, trust it with:\n  ssh-keyscan {port_arg}{host} >> "
            "~/.ssh/known_hosts\nor create the cluster with trust_new_hosts=True"
        )
    if "Certificate invalid" in err or "Host key verification failed" in err:
        return HostKeyError(f"the host key of {label} was refused by ssh:\n{said}")
    denied = _DENIED.search(err)
    if denied:
        return SystemUnavailableError(
            f"authentication as {user!r} on {host}:{port} failed (Permission denied, tried "
            f"{denied.group(1)}); check user= and key= (or the IdentityFile in ~/.ssh/config)"
        )
    if proxy and "Connection closed by UNKNOWN" in err:  # what carried the connection ended
        return SystemUnavailableError(f"cannot reach {proxy}:\n{said}")
    return SystemUnavailableError(f"cannot reach {label}: {said or 'ssh exited'}")


# --------------------------------------------------------------------------- the link


class OpenSSHLink(Link):
    """The host through the ``ssh`` binary and one master connection of this process."""

    transport = "openssh"

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
        ssh = ssh_binary()
        if ssh is None:
            raise SystemUnavailableError(
                "transport='openssh' needs the OpenSSH client (ssh) on PATH: install it "
                "(apt install openssh-client), or use transport='paramiko'"
            )
        self.ssh = ssh
        self.alias = alias
        self.connect_timeout = connect_timeout
        self.trust_new_hosts = trust_new_hosts
        self._given = dict(
            user=user,
            port=port,
            key=os.path.expanduser(key) if key else None,
            ssh_config=os.path.expanduser(ssh_config) if ssh_config else None,
            known_hosts=known_hosts,
            proxy_jump=proxy_jump,
        )
        self._resolved: dict[str, str] | None = None
        self._args: list[str] | None = None
        self._lock = threading.Lock()
        self.control_path = ""
        self.master: subprocess.Popen | None = None
        self._master_err: IO[bytes] | None = None
        self._owner = os.getpid()
        _live.add(self)

    # ------------------------------------------------------------------ options

    def _options(self, known_hosts: str | None = None) -> list[str]:
        given = self._given
        args = [self.ssh]
        if given["ssh_config"]:
            args += ["-F", given["ssh_config"]]
        if given["user"]:
            args += ["-l", str(given["user"])]
        if given["port"]:
            args += ["-p", str(given["port"])]
        if given["key"]:
            args += ["-i", given["key"], "-o", "IdentitiesOnly=yes"]
        if given["proxy_jump"] is not None:
            args += ["-o", f"ProxyJump={given['proxy_jump'] or 'none'}"]
        if known_hosts:
            args += ["-o", f"UserKnownHostsFile={known_hosts}"]
        return args

    def resolved(self) -> dict[str, str]:
        """What ssh makes of the host with the user's config (``ssh -G``): hostname,
        user, port, known_hosts files, ciphers."""
        if self._resolved is None:
            try:
                proc = subprocess.run(
                    [*self._options(), "-G", "--", self.alias],
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    timeout=30,  # a Match exec that hangs
                )
            except subprocess.TimeoutExpired:
                raise SystemUnavailableError(
                    f"ssh -G {self.alias} took over 30 s: does a Match exec in your ssh "
                    "config hang?"
                ) from None
            if proc.returncode != 0:
                raise SystemUnavailableError(
                    f"ssh cannot read the configuration of {self.alias!r}: "
                    f"{proc.stderr.strip()[-800:]}"
                )
            found: dict[str, str] = {}
            for line in proc.stdout.splitlines():
                key, _, value = line.partition(" ")
                found.setdefault(key.lower(), value)
            self._resolved = found
        return self._resolved

    hostname = property(lambda self: self.resolved()["hostname"])
    user = property(lambda self: self.resolved()["user"])
    port = property(lambda self: int(self.resolved()["port"]))

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def _common(self) -> list[str]:
        """The options of every ssh this link runs: the user's config kept, except that
        it never prompts, checks host keys strictly, and uses our control socket."""
        if self._args is not None:
            return self._args
        resolved = self.resolved()
        known_hosts = None
        if self._given["known_hosts"]:
            # The cluster's file first (new keys go there with trust_new_hosts), then the
            # files the config names, which still count.
            files = [self._given["known_hosts"], *resolved.get("userknownhostsfile", "").split()]
            known_hosts = " ".join(_quoted(f) for f in dict.fromkeys(files) if f != "/dev/null")
        args = self._options(known_hosts)
        jumps = resolved.get("proxyjump", "")
        if jumps and jumps.lower() != "none" and (known_hosts or self.trust_new_hosts):
            # ssh -J would check the hops as the user's config says: the cluster's
            # known_hosts and trust_new_hosts must apply to them too, as with paramiko.
            # The first ProxyCommand or ProxyJump given wins: this one goes first.
            args[1:1] = ["-o", "ProxyCommand=" + self._hop_command(jumps, known_hosts)]
        args += [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=" + ("accept-new" if self.trust_new_hosts else "yes"),
            "-o",
            f"ConnectTimeout={max(1, math.ceil(self.connect_timeout))}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "ControlPersist=no",
            # Whatever the config says for the host: remoterun's sessions run their own
            # commands, forward no ports, and its master stays its own child.
            "-o",
            "RemoteCommand=none",
            "-o",
            "ClearAllForwardings=yes",
            *_supported("ForkAfterAuthentication=no"),
        ]
        if resolved.get("ciphers") == _default_ciphers() and _supported(f"Ciphers={_PREFER_GCM}"):
            args += ["-o", f"Ciphers={_PREFER_GCM}"]  # the user chose none
        self._args = args
        return args

    def _hop_command(self, jumps: str, known_hosts: str | None) -> str:
        """A ProxyCommand that reaches the host through ``jumps`` (ProxyJump's
        ``[user@]host[:port],...``, first hop first), each hop an ``ssh -W`` with this
        link's host key options. Each ssh expands %-tokens once in the command it runs:
        literal text is escaped for its own level, and each inner command once more."""

        def literal(text: str) -> str:
            return text.replace("%", "%%")

        given = self._given
        command = ""
        for hop in jumps.split(","):
            user, host, port = parse_destination(hop)
            argv = [self.ssh]
            if given["ssh_config"]:
                argv += ["-F", literal(given["ssh_config"])]
            if user:
                argv += ["-l", literal(user)]
            if port:
                argv += ["-p", str(port)]
            if given["key"]:  # offered to the hops too, besides their own IdentityFiles
                argv += ["-i", literal(given["key"])]
            if known_hosts:
                argv += ["-o", literal(f"UserKnownHostsFile={known_hosts}")]
            argv += ["-o", "BatchMode=yes"]
            argv += [
                "-o",
                "StrictHostKeyChecking=" + ("accept-new" if self.trust_new_hosts else "yes"),
            ]
            argv += ["-o", f"ConnectTimeout={max(1, math.ceil(self.connect_timeout))}"]
            argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
            argv += ["-o", "RemoteCommand=none", "-o", "ClearAllForwardings=yes"]
            if command:
                argv += ["-o", "ProxyCommand=" + literal(command)]
            else:
                argv += ["-o", "ProxyJump=none"]
            argv += ["-W", "[%h]:%p", "--", literal(host)]
            command = shlex.join(argv)
        return command

    def _session(self, *extra: str) -> list[str]:
        """An ssh over the master: ``extra`` options, then the host. It never logs in on
        its own: without the master (gone, or refusing a session past sshd's
        MaxSessions) ssh would connect afresh, through ``ProxyCommand=false`` here,
        which fails at once (the first ProxyCommand or ProxyJump given wins)."""
        return [
            self.ssh,
            "-o",
            "ProxyCommand=false",
            *self._common()[1:],
            "-o",
            "ControlMaster=no",
            "-o",
            f"ControlPath={self.control_path}",
            "-T",
            *extra,
            "--",
            self.alias,
        ]

    # ------------------------------------------------------------------ the master

    def is_open(self) -> bool:
        master = self.master
        return master is not None and self._owner == os.getpid() and master.poll() is None

    def open(self) -> None:
        """Start the master connection and wait until it is logged in (its control
        socket appears); a server that drops new connections is tried again while
        ``connect_timeout`` lasts."""
        with self._lock:
            self._close_master()
            deadline = time.monotonic() + self.connect_timeout
            for attempt in itertools.count():
                error = self._start_master(deadline)
                if error is None:
                    self.generation += 1
                    return
                err, dropped = error
                ceiling = min(_RETRY_CAP, _RETRY_FIRST * 2**attempt)
                pause = ceiling / 2 + random.uniform(0, ceiling / 2)
                if not dropped or time.monotonic() + pause >= deadline:
                    offered = self._offered_key() if _UNKNOWN.search(err) else ""
                    raise _connect_error(
                        err, self.label, self.user, self.port, self.hostname, offered, self._proxy()
                    ) from None
                logger.debug("%s dropped the connection; again in %.2f s", self.label, pause)
                time.sleep(pause)

    def _start_master(self, deadline: float) -> tuple[str, bool] | None:
        """None once the master is up, else its error output and whether the server
        dropped it (worth another try)."""
        self.control_path = os.path.join(control_folder(), uuid.uuid4().hex[:12])
        err_file = tempfile.TemporaryFile()  # noqa: SIM115 - kept while the process lives
        argv = [
            *self._common(),
            "-M",
            "-N",
            "-T",
            "-o",
            f"ControlPath={self.control_path}",
            "--",
            self.alias,
        ]
        try:
            master = spawner.popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file
            )
        except OSError as exc:
            err_file.close()
            raise SystemUnavailableError(f"cannot start {self.ssh}: {exc}") from exc
        pause = 0.002
        # ConnectTimeout bounds the TCP connect; the login gets as long again.
        give_up = max(deadline, time.monotonic() + 1.0) + self.connect_timeout
        try:
            while not os.path.exists(self.control_path):
                if master.poll() is not None:
                    err = stderr_tail(err_file)
                    err_file.close()
                    dropped = _DROPPED.search(err) and not _REFUSED.search(err)
                    return err, bool(dropped)
                if time.monotonic() > give_up:
                    stop_process(master)
                    err = stderr_tail(err_file)
                    err_file.close()
                    return f"no login after {self.connect_timeout:g} s (timed out)\n{err}", False
                time.sleep(pause)
                pause = min(pause * 1.5, 0.02)
        except BaseException:  # Ctrl-C while it logs in: it is in a session of its own
            stop_process(master)
            err_file.close()
            raise
        self.master, self._master_err, self._owner = master, err_file, os.getpid()
        return None

    def _proxy(self) -> str:
        """What the connection goes through, as the error should name it."""
        resolved = self.resolved()
        jump = self._given["proxy_jump"] or resolved.get("proxyjump", "")
        if jump and jump.lower() != "none":
            return f"{jump} (the jump host to {self.label})"
        if resolved.get("proxycommand"):
            return f"{self.label} through its ProxyCommand {resolved['proxycommand']}"
        return ""

    def override(self, name: str, value: Any) -> None:
        """Change the user, port or key given for the host."""
        self._given[name] = os.path.expanduser(value) if name == "key" and value else value
        self._resolved = self._args = None

    def _offered_key(self) -> str:
        """The key an unknown host offers (strict checking prints none): asked again,
        verbosely, and refused as before, before any login."""
        try:
            proc = subprocess.run(
                [*self._common(), "-v", "-o", "ControlMaster=no", "-o", "ControlPath=none"]
                + ["-T", "--", self.alias, "true"],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=self.connect_timeout + 5,
            )
        except subprocess.TimeoutExpired:
            return ""
        found = _SERVER_KEY.search(proc.stderr)
        return f"{found.group(1)} {found.group(2)}" if found else ""

    def _close_master(self) -> None:
        if self._owner != os.getpid():  # a forked child: the master is its parent's
            self.master = self._master_err = None
            return
        master, self.master = self.master, None
        if master is not None:
            stop_process(master)  # its sessions end with it
        err, self._master_err = self._master_err, None
        if err is not None:
            err.close()
        if self.control_path:
            try:
                os.unlink(self.control_path)  # gone already, unless it was killed
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_master()

    # ------------------------------------------------------------------ sessions

    def exec(self, command: str, timeout: float | None, stdin: bytes = b"") -> tuple[int, str, str]:
        argv = [*self._session(), command]
        try:
            proc = spawner.popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise SystemUnavailableError(f"cannot start {self.ssh}: {exc}") from exc
        with proc:
            try:
                out, err = proc.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc)
                raise SystemUnavailableError(
                    f"a command on {self.label} took over {timeout:g} s: {command[:200]}"
                ) from None
        text = err.decode(errors="replace")
        self._check_session(proc.returncode, text)
        return proc.returncode, out.decode(errors="replace"), text

    def _check_session(self, status: int, err: str) -> None:
        """Raise SystemUnavailableError when ssh itself failed to open the session (its
        own errors exit 255, as a remote command's may: its message tells them apart)."""
        if status == 255 and _NO_SESSION.search(err):
            said = " ".join(err.strip().splitlines()[-2:])
            raise SystemUnavailableError(
                f"no session on the connection to {self.label} ({said}); it may have "
                "dropped, or the server allows fewer sessions (MaxSessions) than "
                "max_sessions="
            )

    def start(self, command: str) -> AgentStream:
        err_file = tempfile.TemporaryFile()  # noqa: SIM115 - kept while the process lives
        try:
            proc = spawner.popen(
                [*self._session(), command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err_file,
                bufsize=0,
            )
        except OSError as exc:
            err_file.close()
            raise SystemUnavailableError(f"cannot start {self.ssh}: {exc}") from exc
        assert proc.stdin is not None and proc.stdout is not None
        stdin_fd, stdout_fd = proc.stdin.fileno(), proc.stdout.fileno()
        for fd in (stdin_fd, stdout_fd):
            widen_pipe(fd)

        # Buffered: a frame's header costs no syscall of its own, and a large frame is
        # read straight into one object of its size.
        reader = open(stdout_fd, "rb", buffering=1 << 16, closefd=False)  # noqa: SIM115
        write_to_agent = write_all(stdin_fd)
        # A close may come from another thread (a cancelled call) while one reads or
        # writes: the fds are closed only once neither does, so that a number the
        # kernel hands out again is never written to or read from.
        reading, writing = threading.Lock(), threading.Lock()
        closed = threading.Event()

        def read(n: int) -> bytes:
            with reading:
                return b"" if closed.is_set() else reader.read(n)

        def write(data: Any) -> None:
            with writing:
                if closed.is_set():
                    raise BrokenPipeError(f"the agent's session on {self.label} is closed")
                write_to_agent(data)

        def close() -> None:
            if closed.is_set():
                return
            closed.set()
            # The ssh goes first: a blocked read sees EOF and a blocked write EPIPE; the
            # agent on the host sees its stdin end, and ends.
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                stop_process(proc)
            with writing:
                pass
            with reading:
                try:
                    proc.stdout.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            # err_file stays open for failure(), which may ask after a close.

        def failure() -> tuple[int, str]:
            try:
                status = proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                status = -1
            err = stderr_tail(err_file)
            self._check_session(status, err)
            return status, err

        return AgentStream(read, write, close, lambda: proc.poll() is None, failure)

    def open_sftp(self) -> paramiko.SFTPClient:
        try:
            proc = spawner.popen(
                self._session("-s") + ["sftp"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
            )
        except OSError as exc:
            raise SystemUnavailableError(f"cannot start {self.ssh}: {exc}") from exc
        channel = PipeChannel(proc, self.label)
        try:
            return paramiko.SFTPClient(channel)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            channel.close()
            raise SystemUnavailableError(f"cannot open SFTP on {self.label}: {exc}") from exc


def _quoted(path: str) -> str:
    return f'"{path}"' if " " in path else path


_defaults: list[str] = []


@functools.cache
def _supported(option: str) -> tuple[str, ...]:
    """``("-o", option)`` when this ssh client knows the option (and its value), else
    nothing: ``Ciphers=^...`` needs OpenSSH 7.5, ForkAfterAuthentication 8.7."""
    proc = subprocess.run(
        [ssh_binary() or "ssh", "-F", "/dev/null", "-o", option, "-G", "x"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )
    return ("-o", option) if proc.returncode == 0 else ()


def _default_ciphers() -> str:
    """The ssh binary's own cipher list (what a config that sets none resolves to)."""
    if not _defaults:
        ssh = ssh_binary() or "ssh"
        proc = subprocess.run(
            [ssh, "-F", "/dev/null", "-G", "x"],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=10,
        )
        found = [
            line.split(" ", 1)[1]
            for line in proc.stdout.splitlines()
            if line.startswith("ciphers ")
        ]
        _defaults.append(found[0] if found else "")
    return _defaults[0]


@atexit.register
def _close_all() -> None:
    for link in list(_live):
        link.close()
