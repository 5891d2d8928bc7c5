"""The agent: serves remoterun's protocol on stdin/stdout (``python -m remoterun.agent``).

The agent moves the protocol to private file descriptors first, then points fd 0 at
/dev/null and fds 1 and 2 at pipes that it drains into STDOUT/STDERR frames. Nothing a
function prints, down to a subprocess writing to fd 1, can corrupt the frame stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time
from typing import Any, Iterator

import cloudpickle

from ..errors import CorruptRunError, InvalidRunNameError, SigningKeyError
from . import forkserver, integrity, pickling, procs, protocol
from .coroutines import run_to_end
from .failures import error_record
from .protocol import SYNCHRONOUS_OPS, Action, Failure
from .record import RUNNING
from .runfolder import resolve_run_arguments
from .store import HostRuns

AGENT_VERSION = "1"
_FN_CACHE_SIZE = 256


class OutputCapture:
    """Forward whatever is written to fd 1 or fd 2 as output frames of the current request."""

    def __init__(self, send: protocol.FrameWriter):
        self._send = send
        self._lock = threading.Lock()
        self.req_id = 0
        self._pipes: list[tuple[int, int]] = []
        for fd, kind in ((1, protocol.STDOUT), (2, protocol.STDERR)):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            self._pipes.append((r, kind))
        for r, kind in self._pipes:
            threading.Thread(target=self._drain_forever, args=(r, kind), daemon=True).start()

    def _drain(self, r: int, kind: int) -> None:
        # Caller holds the lock: reading and sending as one step keeps frames in order.
        pending = struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"))[0]
        if pending:
            self._send.send(kind, self.req_id, os.read(r, pending))

    def _drain_forever(self, r: int, kind: int) -> None:
        poller = select.poll()
        poller.register(r, select.POLLIN)
        while True:
            poller.poll()
            with self._lock:
                self._drain(r, kind)

    def flush(self) -> None:
        """Forward everything written so far; call before replying to a request."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        with self._lock:
            for r, kind in self._pipes:
                self._drain(r, kind)


class HangupWatch:
    """Stops a synchronous call whose client is gone, as the client's Ctrl-C would.

    sshd sends no signal when a connection drops: it closes the agent's stdin, and a call
    running here would go on for as long as it takes. So a thread looks at the protocol's
    input every _TICK while a call runs. The client never sends anything while a request
    is in flight: readable then means end of file, or a protocol violation. Readiness
    alone is not trusted (an earlier watcher that left on POLLHUP made agents exit while
    still in use): end of file is confirmed with no bytes waiting and a real read that
    returns nothing, through the protocol's own buffered reader, so a byte that did come
    stays in the stream. Only then is the agent's process group killed: the agent, the
    call, and the processes the call started in it. Recorded runs are in sessions of
    their own; between calls, the serve loop reads the end of file itself and returns.

    The thread looks on a timer rather than waiting on the input: a thread woken at
    every call's start and end cost ~20% of a short call. Marking a call costs a lock;
    the thread sleeps once no call has run for a while, until the next one.
    """

    _TICK = 0.25
    _IDLE_TICKS = 8

    def __init__(self, reader: io.BufferedReader):
        self._reader = reader
        self._poller = select.poll()
        self._poller.register(reader.fileno(), select.POLLIN)
        self._lock = threading.Lock()  # held while the input is looked at
        self._running = False
        self._calls = 0
        self._asleep = False
        self._wake = threading.Event()
        threading.Thread(target=self._watch, name="remoterun-hangup", daemon=True).start()

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Watch while the block runs; the caller reads nothing from the input meanwhile."""
        with self._lock:
            self._running = True
            self._calls += 1
            wake, self._asleep = self._asleep, False
        if wake:
            self._wake.set()
        try:
            yield
        finally:
            with self._lock:  # once this is held, the watcher reads nothing
                self._running = False

    def _watch(self) -> None:
        seen, quiet = 0, 0
        while True:
            time.sleep(self._TICK)
            with self._lock:
                if self._running:
                    if self._client_gone():
                        _stop_process_group()
                    continue
                quiet = quiet + 1 if self._calls == seen else 0
                seen = self._calls
                if quiet < self._IDLE_TICKS:
                    continue
                self._asleep = True
                self._wake.clear()
            self._wake.wait()
            quiet = 0

    def _client_gone(self) -> bool:
        if not self._poller.poll(0):
            return False
        # Bytes mid-call break the protocol, but they are left for the serve loop.
        return not _bytes_waiting(self._reader.fileno()) and not self._reader.peek(1)


def _bytes_waiting(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _stop_process_group() -> None:
    """Kill this agent and every process of its group, at once, as Ctrl-C's stop does."""
    if os.getpgrp() == os.getpid():  # under sshd (and the local system): its own group
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class _IdleTrim:
    """Gives the memory that requests freed back to the kernel once the agent has been
    idle for a second after one (the agent keeps it meanwhile, so that the next large
    argument or result lands in memory already mapped: see procs.keep_freed_memory).
    Never during a request: a call's own temporaries are what it may reuse."""

    IDLE = 1.0

    def __init__(self, trim: Any):
        self._trim = trim
        self._lock = threading.Lock()
        self._busy = False
        self._last = time.monotonic()
        self._dirty = threading.Event()
        threading.Thread(target=self._serve, name="remoterun-trim", daemon=True).start()

    def begin(self) -> None:
        with self._lock:
            self._busy = True

    def end(self) -> None:
        with self._lock:
            self._busy = False
            self._last = time.monotonic()
        self._dirty.set()

    def _serve(self) -> None:
        while True:
            self._dirty.wait()
            with self._lock:
                idle = None if self._busy else time.monotonic() - self._last
                if idle is not None and idle >= self.IDLE:
                    self._dirty.clear()
                    self._trim()  # under the lock: no request begins meanwhile
                    continue
            time.sleep(self.IDLE if idle is None else self.IDLE - idle)


class Agent:
    idle_trim: _IdleTrim | None = None

    def __init__(self, read_fd: int, write_fd: int):
        reader = os.fdopen(read_fd, "rb", buffering=1 << 16)
        self.read_exact = protocol.exact_reader(reader.read)
        self.hangup = HangupWatch(reader)
        out = os.fdopen(write_fd, "wb", buffering=0)
        self.send = protocol.FrameWriter(out.write)
        self.output = OutputCapture(self.send)
        self._functions: dict[str, Any] = {}
        # Work to do once the current reply is sent (forking the next spare worker).
        self._after_reply: list[Any] = []

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        while True:
            try:
                kind, req_id, payload = protocol.read_frame(self.read_exact)
            except EOFError:
                return
            if kind == protocol.HELLO:
                self.send.send(protocol.REPLY, req_id, protocol.dumps(self.hello()))
                continue
            if kind != protocol.REQUEST:
                raise protocol.ProtocolError(f"unexpected frame kind {kind}")
            self.output.req_id = req_id
            if self.idle_trim is not None:
                self.idle_trim.begin()
            try:
                self._answer(req_id, payload)
            finally:
                del payload  # not held while the agent waits for the next request
                if self.idle_trim is not None:
                    self.idle_trim.end()

    def _answer(self, req_id: int, payload: Any) -> None:
        """Do one request and send its reply (or its failure)."""
        request = protocol.loads(payload)
        try:
            handler = getattr(self, "op_" + request["op"])
            if request["op"] in SYNCHRONOUS_OPS:
                with self.hangup.armed():
                    reply = handler(request, req_id)
            else:
                reply = handler(request, req_id)
        except BaseException as exc:  # an op never takes the agent down
            self.output.flush()
            self.send.send(protocol.FAIL, req_id, protocol.dumps(_failure_record(exc)))
            return
        self.output.flush()
        self.send.send(protocol.REPLY, req_id, protocol.dumps(reply))
        while self._after_reply:
            self._after_reply.pop()()

    def hello(self) -> dict:
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "agent": AGENT_VERSION,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "cloudpickle": getattr(cloudpickle, "__version__", "?"),
            "cpus": os.cpu_count() or 1,
            "home": os.path.expanduser("~"),
        }

    # ------------------------------------------------------------------ ops

    def _function(self, request: dict) -> Any:
        key = request.get("fn_key")
        fn = self._functions.get(key) if key else None
        if fn is None:
            if request.get("fn") is None:
                raise _Failure(Failure.UNKNOWN_FUNCTION, f"function {key} is not cached here")
            fn = cloudpickle.loads(request["fn"])
            if key:
                if len(self._functions) >= _FN_CACHE_SIZE:
                    self._functions.pop(next(iter(self._functions)))
                self._functions[key] = fn
        return fn

    def _load(self, request: dict, field: str) -> tuple[Any, Any]:
        """The request's function and its unpickled ``field`` (with the request's
        out-of-band ``buffers``); a failure to load either (a module missing on this
        host) is reported as such, not as the function's error."""
        try:
            value = cloudpickle.loads(request[field], buffers=request.get("buffers") or ())
            return self._function(request), value
        except _Failure:
            raise
        except BaseException as exc:
            raise _Failure(Failure.LOAD, _load_failure_message(exc)) from exc

    def op_ping(self, request: dict, req_id: int) -> dict:
        return {"time": time.time()}

    def op_call(self, request: dict, req_id: int) -> dict:
        """Call a function here, in the agent: the synchronous fast path (no folder)."""
        fn, inputs = self._load(request, "inputs")
        buffers: list = []  # a large result travels beside its pickle, as the arguments do
        result = call_pickled(fn, inputs, bool(request.get("run_args")), buffers)
        return {"result": result, "buffers": buffers}

    def op_map(self, request: dict, req_id: int) -> dict:
        """Call a function on a chunk of argument tuples, one after the other.

        Replies ``{"outcomes": [(True, result pickle) | (False, failure record), ...]}``:
        one item's failure does not stop the others.
        """
        fn, items = self._load(request, "items")
        return {"outcomes": map_outcomes(fn, items)}

    def op_submit(self, request: dict, req_id: int) -> dict:
        """Record a run and start it detached, or answer from the cache.

        With ``wait``, stream the run's logs as output frames and reply with its outcome.
        """
        runs = HostRuns(request["root"])
        name = request["name"]
        runs.path(name)  # validates the name before any I/O
        hit = runs.cached_hit(request)
        if hit is not None:
            return hit
        started = None
        # Written before the name is claimed, so that a full disk refuses the run while
        # nothing has changed; put in place if it starts, else removed.
        integrity.signing_key()  # a bad team key is refused before anything is written
        staged: dict = {}
        stage_error: OSError | None = None
        if not request.get("payload_omitted"):
            try:
                staged = runs.stage(request)
            except OSError as exc:  # only an error if the run is to start
                stage_error = exc
        try:
            with runs.lock(name):
                decision = runs.claim(request)
                action = decision["action"]
                if action == Action.START and request.get("payload_omitted"):
                    # A miss that needs the function and inputs the client held back.
                    return {"name": name, "action": Action.NEED_PAYLOAD, "root": runs.root}
                if action == Action.START:
                    if stage_error is not None:
                        raise stage_error
                    attempt = runs.next_attempt(name, decision["previous"])
                    exited = threading.Event()
                    try:
                        record = runs.prepare(request, attempt, staged)
                        started = forkserver.take_spare()
                        runs.start(
                            request,
                            record,
                            started,
                            forkserver.server().watch,
                            on_exit=lambda pid, status: exited.set(),
                        )
                    except OSError:
                        runs.undo_attempt(name, attempt)
                        raise
        finally:
            runs.discard(staged)  # what prepare did not move into the run's folder
        reply: dict[str, Any] = {"name": name, "action": action, "root": runs.root}
        if started is not None:
            self._after_reply.append(forkserver.prepare_spare)
            if request.get("wait"):
                self._follow_until(runs, name, started.done_fd, exited)
            os.close(started.done_fd)
        if action in (Action.MISMATCH, Action.EXISTS, Action.BUSY):
            reply["differences"] = decision.get("differences", [])
        config = runs.read_config(name) if action == Action.START else decision.get("config")
        if request.get("want_outcome"):
            reply.update(runs.with_outcome(name, config))
        else:
            reply["config"] = config
        return reply

    def _follow_until(
        self, runs: HostRuns, name: str, done_fd: int, exited: threading.Event
    ) -> None:
        """Forward the run's log files as output frames until its worker says its outcome
        is written, or has exited (a child it forked may hold the done pipe open)."""
        folder = runs.folder(name)
        kinds = {"stdout": protocol.STDOUT, "stderr": protocol.STDERR}
        files = {s: open(folder.log_path(s), "rb") for s in kinds}  # noqa: SIM115
        try:
            delay = 0.0005
            while True:
                finished = bool(select.select([done_fd], [], [], delay)[0]) or exited.is_set()
                for filename, f in files.items():
                    data = f.read()
                    if data:
                        self.send.send(kinds[filename], self.output.req_id, data)
                if finished:
                    break
                delay = min(delay * 2, 0.05)
        finally:
            for f in files.values():
                f.close()
        # The reaper marks a run that left no outcome; wait for it to have done so.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            config = runs.read_config(name)
            if config is None or config.status != RUNNING:
                return
            time.sleep(0.001)

    def op_status(self, request: dict, req_id: int) -> dict:
        runs = HostRuns(request["root"])
        config = runs.status(request["name"])
        if request.get("want_outcome"):
            return runs.with_outcome(request["name"], config)
        return {"config": config}

    def op_cancel(self, request: dict, req_id: int) -> dict:
        runs = HostRuns(request["root"])
        return {"config": runs.cancel(request["name"], float(request.get("grace", 3.0)))}


class _Failure(Exception):
    """A failed op with a kind the client maps to its own error type."""

    def __init__(
        self, kind: str, message: str, exc: BaseException | None = None, skip_frames: int = 0
    ):
        super().__init__(message)
        self.remoterun_kind = kind
        self.original = exc
        self.skip_frames = skip_frames


def call_pickled(fn: Any, inputs: dict, run_args: bool, buffers: list | None = None) -> bytes:
    """``fn(*args, **kwargs)`` of the unpickled ``inputs``, its value pickled (its large
    buffers appended to ``buffers`` when given: ``pickling.dumps``); a failure raised as
    an op failure (the function's own exception, or a value that cannot be pickled).
    Also what Ray's workers run (``systems/ray/tasks.py``)."""
    try:
        if run_args:
            inputs = resolve_run_arguments(inputs)
        value = run_to_end(fn(*inputs["args"], **inputs["kwargs"]))
    except BaseException as exc:
        raise _Failure(Failure.REMOTE, "", exc, skip_frames=1) from exc
    try:
        return pickling.dumps(value, buffers=buffers)
    except Exception as exc:
        raise _Failure(
            Failure.SERIALIZATION,
            f"the return value ({type(value).__name__}) cannot be pickled: {exc}",
        ) from exc


def map_outcomes(fn: Any, items: list) -> list[tuple[bool, Any]]:
    """``fn(*args)`` for each argument tuple: ``(True, value pickle)`` or ``(False,
    failure record)`` each, one item's failure not stopping the others."""
    outcomes: list[tuple[bool, Any]] = []
    for args in items:
        try:
            value = run_to_end(fn(*args))
        except BaseException as exc:
            outcomes.append((False, _failure_record(_Failure(Failure.REMOTE, "", exc, 1))))
            continue
        try:
            outcomes.append((True, pickling.dumps(value)))
        except Exception as exc:
            message = f"the return value ({type(value).__name__}) cannot be pickled: {exc}"
            outcomes.append((False, _failure_record(_Failure(Failure.SERIALIZATION, message))))
    return outcomes


def _load_failure_message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (ImportError, AttributeError)):
        return (
            f"the function or its arguments could not be loaded on this host ({text}). "
            "Install the module there, or have it shipped by value with "
            "cloudpickle.register_pickle_by_value(module)"
        )
    return f"the function or its arguments could not be loaded on this host ({text})"


def _failure_record(exc: BaseException) -> dict:
    if isinstance(exc, _Failure):
        if exc.original is not None:
            record = error_record(exc.original, skip_frames=exc.skip_frames)
        else:
            record = {"type": "", "message": str(exc), "traceback": "", "exc": None}
        record["kind"] = exc.remoterun_kind
        return record
    record = error_record(exc)
    if isinstance(exc, CorruptRunError):  # before OSError: it is a RunStorageError too
        record.update(kind=Failure.CORRUPT, filename=exc.filename, url=exc.url)
    elif isinstance(exc, SigningKeyError):
        record["kind"] = Failure.KEY
    elif isinstance(exc, InvalidRunNameError):
        record["kind"] = Failure.NAME
    elif isinstance(exc, OSError):
        record["kind"] = Failure.STORAGE
    else:
        record["kind"] = Failure.AGENT
    return record


def main() -> None:
    trim = procs.keep_freed_memory()
    # Move the protocol off fds 0 and 1 before anything can print.
    read_fd, write_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Before any user code runs: recorded runs are forked from this clean process.
    forkserver.server()
    agent = Agent(read_fd, write_fd)
    if trim is not None:
        agent.idle_trim = _IdleTrim(trim)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    try:
        agent.serve()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
