"""The local side of the OpenSSH transport's processes: started from one long-lived
thread and tied to this process's life (PR_SET_PDEATHSIG), stopped, their error output
kept; the pipes they are spoken to over; the private folder of their control sockets."""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import os
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from typing import IO, Any, Callable

from ...errors import SystemUnavailableError

logger = logging.getLogger(__name__)

# Unix socket paths are at most 107 bytes; ssh first binds "<path>.<16 random chars>".
_MAX_CONTROL_PATH = 107 - 17
# How much of an ssh process's error output is kept to explain a failure.
_STDERR_TAIL = 4000


# --------------------------------------------------------------------------- spawning


@functools.lru_cache(maxsize=1)
def _prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel TERM the child when the forking thread ends;
    None where there is no prctl (then only close() and atexit end the processes)."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl took hold
            os._exit(1)

    return preexec


class _Spawner:
    """Starts processes from one long-lived thread (or the main thread), so that the
    parent-death signal of each is tied to this process's life, not a pool thread's."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future, dict]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.update(args=argv, start_new_session=True, preexec_fn=_die_with_parent_preexec())
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(**kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, kwargs))
        self._ensure_thread()
        return future.result()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="remoterun-ssh-spawner", daemon=True
                )
                self._thread.start()

    def _serve(self) -> None:
        while True:
            future, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(subprocess.Popen(**kwargs))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


spawner = _Spawner()


def stderr_tail(stream: IO[bytes] | None) -> str:
    """The end of what a process wrote to its (temporary file) stderr."""
    if stream is None:
        return ""
    try:
        stream.flush()
        size = stream.seek(0, os.SEEK_END)
        stream.seek(max(0, size - _STDERR_TAIL))
        return stream.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""


def stop_process(proc: subprocess.Popen, grace: float = 1.0) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- the folder


def control_folder() -> str:
    """``~/.remoterun/cm``, the control sockets' folder: created 0700, refused when it is
    another user's or open to others (a socket there is a logged-in connection). A home
    too deep for a socket path gets a private temporary folder instead."""
    folder = os.path.expanduser("~/.remoterun/cm")
    if len(folder) + 1 + 12 > _MAX_CONTROL_PATH:
        return _short_folder()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.stat(folder)
    except OSError as exc:  # a read-only home
        logger.debug("no control folder in the home folder (%s): using a temporary one", exc)
        return _short_folder()
    if info.st_uid != os.getuid():
        raise SystemUnavailableError(
            f"{folder} belongs to another user (uid {info.st_uid}); remove it, or set HOME"
        )
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)
    if not _swept:
        _swept.append(folder)
        sweep(folder)
    return folder


_swept: list[str] = []


def sweep(folder: str) -> None:
    """Remove the sockets of masters that are gone (a client killed by SIGKILL leaves
    its socket behind): nothing answers on them."""
    import socket

    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue  # connecting to a plain file is refused too: not a master's
        except OSError:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except OSError:
            pass  # not ours to judge
        finally:
            probe.close()


_short: list[str] = []


def _short_folder() -> str:
    if not _short:
        _short.append(tempfile.mkdtemp(prefix="rr-cm-"))  # 0700
        atexit.register(shutil.rmtree, _short[0], True)
    return _short[0]


# --------------------------------------------------------------------------- streams


def write_all(fd: int) -> Callable[[Any], None]:
    def write(data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            # Slices of at most 4 MB: a pipe write of more is no faster, and a partial
            # write then costs no copy.
            view = view[os.write(fd, view[: 4 << 20]) :]

    return write


def widen_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass


class PipeChannel:
    """An ``ssh -s HOST sftp`` process as the channel paramiko's SFTP client expects:
    send, recv, recv_ready, close."""

    def __init__(self, proc: subprocess.Popen, label: str):
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._in, self._out = proc.stdin.fileno(), proc.stdout.fileno()
        self._label = label

    def send(self, data: Any) -> int:
        try:
            return os.write(self._in, data)
        except OSError as exc:
            raise EOFError(f"the SFTP session to {self._label} ended: {exc}") from exc

    def recv(self, n: int) -> bytes:
        return os.read(self._out, n)

    def recv_ready(self) -> bool:
        return bool(select.select([self._out], [], [], 0)[0])

    def settimeout(self, timeout: float | None) -> None:
        pass

    def get_name(self) -> str:
        return f"sftp {self._label}"

    def close(self) -> None:
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        stop_process(self._proc)
