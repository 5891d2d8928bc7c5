"""Where the workers of recorded runs come from: a clean process that forks them.

The agent runs synchronous calls in its own process, and what they leave behind
(imported modules, ``os.environ``, the working directory, threads, a CUDA context, which
does not survive a fork) must not reach the recorded runs it starts later. So the agent
starts this server as a new interpreter (``python -m remoterun.agent.forkserver FD``),
never as a fork of itself; workers are forked from it ahead of need (a *spare*, waiting
for its run), and it reaps them and reports how they exited.

Messages go over a ``SOCK_SEQPACKET`` socket pair, one datagram each. To the server:
``b"s"``, fork a spare. To the agent: ``b"spare <pid> <start time>"`` with two fds (the
write end of the spare's request pipe and the read end of its done pipe), and
``b"exit <pid> <wait status>"``, and ``b"fail 0 <errno>"`` when it could not fork.
A start time of ``-`` means unknown.
"""

from __future__ import annotations

import gc
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from . import protocol
from .procs import open_fds, process_start_time
from .worker import spare_main

_MESSAGE = 64
# What the agent started with, before any user code ran: the server, and so every
# worker, gets these, even a server started again after the first one died.
_START_ENV = dict(os.environ)
_START_CWD = os.getcwd()
_START_PATH = list(sys.path)
# The agent's sys.path comes as arguments, and is set before anything is imported: a
# json.py in the working directory (the host user's home) must not be imported first.
_BOOT = (
    "import sys; sys.path[:] = sys.argv[2:]; from remoterun.agent.forkserver import main; main()"
)
ExitCallback = Callable[[int, int], None]


class SpareWorker:
    """A worker process waiting for its run: its own session already, nothing of the
    agent's open. It exits on EOF if no run comes."""

    def __init__(
        self, server: ForkServer, pid: int, proc_start: int | None, req_w: int, done_fd: int
    ):
        self._server = server
        self.pid = pid
        self.proc_start = proc_start
        self._req_w = req_w
        self.done_fd = done_fd

    def alive(self) -> bool:
        if self._server.exited(self.pid):
            return False
        return process_start_time(self.pid) == self.proc_start is not None

    def hand_over(self, request: dict) -> None:
        """Send the run's request; the worker starts on it at once."""

        def write(data: bytes | memoryview) -> None:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(self._req_w, view) :]

        try:
            protocol.FrameWriter(write).send(protocol.REQUEST, 0, protocol.dumps(request))
        finally:
            self._req_w = _close(self._req_w)

    def discard(self) -> None:
        """Let a spare go that will not run anything (it exits on EOF)."""
        self._req_w = _close(self._req_w)
        self.done_fd = _close(self.done_fd)


def _close(fd: int) -> int:
    """Close ``fd`` unless it is -1 (closed already); return -1 to store in its place,
    so that no fd is closed twice (a second close could hit an fd reused meanwhile)."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    return -1


class ForkServer:
    """The agent's end of the fork server."""

    def __init__(self) -> None:
        agent_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The new interpreter imports what this one did, from where it did: its sys.path
        # is set from the agent's, not through PYTHONPATH, which runs would inherit.
        command = [sys.executable, "-c", _BOOT, str(server_end.fileno()), *_START_PATH]
        try:
            self._proc = subprocess.Popen(
                command,
                pass_fds=[server_end.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=_START_ENV,
                cwd=_START_CWD,
            )
        finally:
            server_end.close()
        self.pid = self._proc.pid
        self._sock = agent_end
        self._lock = threading.Lock()
        self._spares: queue.Queue[SpareWorker | OSError | None] = queue.Queue()
        self._asked = False  # a spare is on its way
        self._exits: dict[int, int] = {}  # exits of workers nobody watches yet
        self._watchers: dict[int, ExitCallback] = {}
        self.gone = False
        threading.Thread(target=self._read, name="remoterun-forkserver", daemon=True).start()

    def prepare(self) -> None:
        """Have a spare forked, unless one is ready or on its way."""
        with self._lock:
            if self._asked or not self._spares.empty() or self.gone:
                return
            self._asked = True
        try:
            self._sock.send(b"s")
        except OSError:
            self._lost()

    def take(self) -> SpareWorker:
        """A live spare worker, waiting for one to be forked if none is ready."""
        while True:
            try:
                spare = self._spares.get_nowait()
            except queue.Empty:
                self.prepare()
                spare = self._spares.get()
            if spare is None:
                raise ForkServerGone("the agent's fork server has exited")
            if isinstance(spare, OSError):
                raise spare
            if spare.alive():
                return spare
            spare.discard()
            with self._lock:
                self._exits.pop(spare.pid, None)

    def watch(self, pid: int, on_exit: ExitCallback) -> None:
        """Call ``on_exit(pid, wait_status)``, in a thread of its own, when the worker exits."""
        with self._lock:
            status = self._exits.pop(pid, None)
            if status is None:
                self._watchers[pid] = on_exit
                return
        threading.Thread(target=on_exit, args=(pid, status), daemon=True).start()

    def exited(self, pid: int) -> bool:
        with self._lock:
            return pid in self._exits

    def _read(self) -> None:
        try:
            self._read_messages()
        finally:
            self._lost()

    def _read_messages(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._sock, _MESSAGE, 2)
            except OSError:
                return
            if not message:
                return
            for fd in fds:  # received fds are inheritable: keep them out of subprocesses
                os.set_inheritable(fd, False)
            kind, pid_text, value = message.split()
            pid = int(pid_text)
            if kind == b"spare":
                if len(fds) != 2:
                    for fd in fds:
                        _close(fd)
                    raise RuntimeError("the fork server sent a spare without its pipes")
                start = None if value == b"-" else int(value)
                spare = SpareWorker(self, pid, start, fds[0], fds[1])
                with self._lock:
                    self._asked = False
                self._spares.put(spare)
            elif kind == b"fail":
                with self._lock:
                    self._asked = False
                errno = int(value)
                self._spares.put(OSError(errno, f"cannot fork a worker: {os.strerror(errno)}"))
            elif kind == b"exit":
                with self._lock:
                    on_exit = self._watchers.pop(pid, None)
                    if on_exit is None:
                        self._exits[pid] = int(value)
                if on_exit is not None:
                    threading.Thread(
                        target=on_exit, args=(pid, int(value)), name=f"reap-{pid}", daemon=True
                    ).start()

    def _lost(self) -> None:
        with self._lock:
            if self.gone:
                return
            self.gone = True
            watchers, self._watchers = self._watchers, {}
        self._spares.put(None)  # wakes a take() waiting for a spare that will never come
        try:
            self._proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        # Nobody reports these workers' exits any more: watch for them by polling.
        for pid, on_exit in watchers.items():
            threading.Thread(
                target=_poll_exit, args=(pid, on_exit), name=f"poll-{pid}", daemon=True
            ).start()


def _poll_exit(pid: int, on_exit: ExitCallback) -> None:
    start = process_start_time(pid)
    while start is not None and process_start_time(pid) == start:
        time.sleep(0.1)
    on_exit(pid, -1)


class ForkServerGone(RuntimeError):
    pass


def _serve(sock: socket.socket) -> int:
    """Body of the fork server: fork spares when asked, report their exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the agent to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # What every worker needs and the client imports only when used (hashlib's OpenSSL
    # takes milliseconds to load): loaded once here, so each forked worker has it.
    import hashlib  # noqa: F401
    import hmac  # noqa: F401

    # Hold nothing of the agent's: its pipes or SSH channel must close when it exits.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for fd in open_fds():
        if fd > 2 and fd != sock.fileno():
            try:
                os.close(fd)
            except OSError:
                pass
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    gc.freeze()  # the workers' collections then leave this process's objects untouched
    while True:
        readable = select.select([sock, wake_r], [], [])[0]
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(sock)
        if sock in readable:
            if not sock.recv(_MESSAGE):
                return 0  # the agent has exited; running workers carry on without us
            try:
                _fork_spare(sock, (wake_r, wake_w))
            except OSError as exc:  # EAGAIN, ENOMEM, EMFILE: say so, and go on serving
                try:
                    sock.send(f"fail 0 {exc.errno or 0}".encode())
                except OSError:
                    return 1


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            sock.send(f"exit {pid} {status}".encode())
        except OSError:
            pass  # the agent is gone


def _fork_spare(sock: socket.socket, wake: tuple[int, int]) -> None:
    req_r, req_w = os.pipe()
    try:
        done_r, done_w = os.pipe()
    except OSError:
        os.close(req_r)
        os.close(req_w)
        raise
    try:
        pid = os.fork()
    except OSError:
        for fd in (req_r, req_w, done_r, done_w):
            os.close(fd)
        raise
    if pid == 0:  # the spare
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (req_w, done_r, *wake):
                os.close(fd)
            sock.close()
            code = spare_main(req_r, done_w)
        finally:
            os._exit(code)
    os.close(req_r)
    os.close(done_w)
    start = process_start_time(pid)
    text = "-" if start is None else str(start)
    try:
        socket.send_fds(sock, [f"spare {pid} {text}".encode()], [req_w, done_r])
    except OSError:
        pass  # the agent is gone; the spare exits on EOF
    os.close(req_w)
    os.close(done_r)


_server: ForkServer | None = None
_server_lock = threading.Lock()


def server() -> ForkServer:
    """This process's fork server, started now if there is none (or it has exited)."""
    global _server
    with _server_lock:
        if _server is None or _server.gone:
            _server = ForkServer()
        return _server


def take_spare() -> SpareWorker:
    """A spare worker for a run about to start."""
    try:
        return server().take()
    except ForkServerGone:
        return server().take()  # once more, from a new server


def prepare_spare() -> None:
    """Have the next spare forked; the agent calls this after replying, off the clock."""
    server().prepare()


def main() -> None:
    """Entry point of the server's interpreter: ``sys.argv[1]`` is its socket's fd."""
    sys.exit(_serve(socket.socket(fileno=int(sys.argv[1]))))
