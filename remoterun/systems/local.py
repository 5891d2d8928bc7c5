"""This machine: the embedded default system, no server needed.

Calls go to agents started as child processes over pipes: the same agent and protocol
an SSH cluster uses over its channels, so a call cannot disturb the caller's process
(its imports, its stdout, its signal handlers) and a recorded run outlives it.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, ContextManager

from ..agent.runfolder import Files
from ..agent.store import HostRuns
from ..errors import SystemUnavailableError
from ..folder import LOCAL
from ..registry import share_list
from .base import System
from .connection import AgentConnection, ConnectionPool

if TYPE_CHECKING:
    import fsspec

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_live: weakref.WeakSet[LocalSystem] = weakref.WeakSet()


def _widen_pipe(fd: int) -> None:
    """Grow a pipe from 64 KB to 1 MB where Linux allows: a large argument then costs far
    fewer context switches between client and agent."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass


def default_home() -> str:
    """``$REMOTERUN_HOME``, or ``~/.remoterun``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("REMOTERUN_HOME") or "~/.remoterun"))


class LocalSystem(System):
    """Runs functions and commands on this machine; run folders under ``root``.

    Args:
        root: the folder of run folders; default ``$REMOTERUN_HOME/runs``, read at each use.
        python: the interpreter agents run with; default this one.
        max_idle: how many idle agents to keep for reuse.
    """

    executes = True

    def __init__(
        self,
        *,
        root: str | None = None,
        python: str | None = None,
        max_idle: int = 8,
        share: Any = None,
    ):
        self.name = "here"
        self.share = share_list(share)
        self._root = root
        self._python = python or sys.executable
        self._pool = ConnectionPool(self._open_agent, max_idle=max_idle)
        self._facts: dict = {}
        self._facts_lock = threading.Lock()
        _live.add(self)

    def __reduce__(self) -> tuple:
        if self is _default:
            return (local, ())
        return (_rebuild, (self._root, self._python, self.share))

    @property
    def root(self) -> str:
        if self._root is not None:
            return os.path.abspath(os.path.expanduser(self._root))
        return os.path.join(default_home(), "runs")

    def filesystem(self) -> fsspec.AbstractFileSystem:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem()

    def files(self) -> Files:
        # The disk itself: no fsspec needed (nested calls on a host without it)
        return LOCAL

    def host_label(self) -> str:
        return self._facts.get("host") or "localhost"

    def reads_locally(self, folder: Any) -> bool:
        return folder.local

    # ------------------------------------------------------------------ agents

    def _open_agent(self) -> AgentConnection:
        env = dict(os.environ)
        paths = [_PACKAGE_PARENT] + [p for p in sys.path if p]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        try:
            proc = subprocess.Popen(
                [self._python, "-u", "-m", "remoterun.agent"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the client, which drops the agent
            )
        except OSError as exc:
            raise SystemUnavailableError(
                f"cannot start a local agent with {self._python}: {exc}"
            ) from exc
        assert proc.stdin is not None and proc.stdout is not None
        stdin_fd = proc.stdin.fileno()
        for fd in (stdin_fd, proc.stdout.fileno()):
            _widen_pipe(fd)

        def write(data: bytes | memoryview) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(stdin_fd, view) :]

        def close() -> None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        def stop() -> None:
            # The agent leads its own process group (start_new_session): kill the group,
            # with what the call started in it, as the agent does itself when its input
            # closes. Recorded runs are in sessions of their own.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        conn = AgentConnection(
            proc.stdout.read,
            write,
            close,
            label=f"localhost (pid {proc.pid})",
            alive=lambda: proc.poll() is None,
            stop=stop,
        )
        try:
            facts = conn.handshake()
        except BaseException:  # interrupted, or cancelled: no agent left behind
            conn.interrupt()
            conn.close()
            raise
        with self._facts_lock:
            self._facts = facts
        return conn

    def _connection(self) -> ContextManager[AgentConnection]:
        return self._pool.connection()

    def cached_hit(self, request: dict) -> dict | None:
        # The folders are on this machine: the agent's own lock-free hit check, here.
        return HostRuns(request["root"]).cached_hit(request)

    def close(self) -> None:
        self._pool.close()


def _rebuild(root: str | None, python: str, share: tuple = ()) -> LocalSystem:
    return LocalSystem(root=root, python=python, share=share)


_default: LocalSystem | None = None
_default_lock = threading.Lock()


def local() -> LocalSystem:
    """This machine, the default system (one shared instance per process)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = LocalSystem()
    return _default


@atexit.register
def _close_all() -> None:
    for system in list(_live):
        system.close()
