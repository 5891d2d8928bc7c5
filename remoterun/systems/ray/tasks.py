"""What executes in Ray's worker processes: synchronous calls, chunks of a ``map`` and
recorded runs. Each is a plain function that ``system.py`` wraps in ``ray.remote`` with
``max_retries=0``: a retry is remoterun's decision, recorded as a new attempt, never
Ray's behind its back.

Calls answer as an agent does (``{"result": ...}``, ``{"outcomes": [...]}``, or a failure
record), with the output the function wrote (fds 1 and 2) captured and sent back. A
recorded run writes its logs, its outcome and their digests into its run folder itself;
the coordinator writes the record (``coordinator.py``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from typing import Any

from ... import context
from ...agent import layout, pickling
from ...agent.coroutines import run_to_end
from ...agent.protocol import Failure
from ...agent.record import SERIALIZATION_ERROR
from ...agent.runfolder import RunFolder, resolve_run_arguments
from ...agent.server import (
    _Failure,
    _failure_record,
    _load_failure_message,
    call_pickled,
    map_outcomes,
)

# Functions already unpickled in this worker process, by key.
_functions: dict[str, Any] = {}
_FN_CACHE_SIZE = 256


def _function(fn_key: str, fn_holder: list) -> Any:
    """The function ``fn_key``: from this worker's cache, else from ``fn_holder[0]`` (the
    pickle, or a Ray object reference to it, fetched only on a miss)."""
    fn = _functions.get(fn_key)
    if fn is None:
        data = fn_holder[0]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            import ray

            data = ray.get(data)
        fn = pickling.loads(data)
        if len(_functions) >= _FN_CACHE_SIZE:
            _functions.pop(next(iter(_functions)))
        _functions[fn_key] = fn
    return fn


_files: list[Any] = []


def _capture_files() -> list[Any]:
    """This worker's two capture files, emptied: made once (a worker runs one call at
    a time), since making them costs more than a quick call."""
    if not _files:
        _files.extend(tempfile.TemporaryFile() for _ in range(2))  # noqa: SIM115
    for f in _files:
        f.seek(0)
        f.truncate()
    return _files


class _Captured:
    """fds 1 and 2 pointed at temporary files for the span of one call; what was written
    is returned, in order per stream. A call still running after ``_LIVE_AFTER`` seconds
    with a ``live`` folder (on a filesystem the caller reads too) has its output copied
    there as it comes, by this worker's mirror thread, for the caller to print while it
    waits."""

    def __init__(self, live: str | None = None) -> None:
        self.files = _capture_files()
        self.saved: list[int] = []
        self.live = live
        self.started = time.monotonic()
        self.targets: list[Any] | None = None
        self.offsets = [0, 0]
        self.lock = threading.Lock()
        self.closed = False

    def __enter__(self) -> _Captured:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, f in zip((1, 2), self.files):
            self.saved.append(os.dup(fd))
            os.dup2(f.fileno(), fd)
        if self.live:
            _mirror.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        if self.live:
            _mirror.unwatch(self)

    def copy_out(self) -> None:
        """Copy what was written since the last copy to the live folder."""
        with self.lock:
            if self.closed:
                return
            if self.targets is None:
                try:  # private to the run root's owner, as the runs in it are
                    layout.makedirs_private(self.live)  # type: ignore[arg-type]
                    self.targets = [
                        os.fdopen(
                            layout.open_private(
                                os.path.join(self.live, s),  # type: ignore[arg-type]
                                os.O_WRONLY | os.O_APPEND,
                            ),
                            "ab",
                        )
                        for s in ("stdout", "stderr")
                    ]
                except OSError:
                    self.live = None  # the caller gets the output with the result
                    return
            for i, (f, target) in enumerate(zip(self.files, self.targets)):
                data = os.pread(f.fileno(), 1 << 20, self.offsets[i])
                if data:
                    target.write(data)
                    target.flush()
                    self.offsets[i] += len(data)

    def output(self) -> list[tuple[str, bytes]]:
        out = []
        for kind, f in zip(("stdout", "stderr"), self.files):
            f.seek(0)
            data = f.read()
            if data:
                out.append((kind, data))
        return out

    def close_live(self) -> None:
        with self.lock:
            self.closed = True
            for target in self.targets or ():
                target.close()
            self.targets = None


_LIVE_AFTER = 0.1
_LIVE_EVERY = 0.05


class _Mirror:
    """One thread per worker process that copies the output of its slow calls to their
    live folders (a thread per call would cost every quick call its start). It sleeps
    while no call is watched."""

    def __init__(self) -> None:
        self.calls: set[_Captured] = set()
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def watch(self, captured: _Captured) -> None:
        with self.changed:
            self.calls.add(captured)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True)
                self.thread.start()
            self.changed.notify()

    def unwatch(self, captured: _Captured) -> None:
        with self.changed:
            self.calls.discard(captured)
        captured.close_live()

    def _run(self) -> None:
        while True:
            with self.changed:
                while not self.calls:
                    self.changed.wait()
            time.sleep(_LIVE_EVERY)
            now = time.monotonic()
            with self.changed:
                slow = [c for c in self.calls if now - c.started >= _LIVE_AFTER and c.live]
            for captured in slow:
                try:
                    captured.copy_out()
                except (OSError, ValueError):
                    pass


_mirror = _Mirror()


def call(
    fn_key: str,
    fn_holder: list,
    inputs: bytes,
    run_args: bool,
    live: str | None = None,
    buffers: list | None = None,
) -> dict:
    """A synchronous call: ``{"ok": True, "result": ...}`` or ``{"ok": False, "failure":
    record}``, with ``"output"``: what the function wrote, ``[(stream, bytes), ...]``
    (also copied to ``live`` as it comes, when the call is not quick). ``buffers``: the
    large arguments left out of the inputs' pickle."""
    with _Captured(live) as captured:
        try:
            result = _call(fn_key, fn_holder, inputs, run_args, buffers)
            reply: dict = {"ok": True, "result": result}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as a record
            reply = {"ok": False, "failure": _failure_record(exc)}
    reply["output"] = captured.output()
    reply["node"] = _node()
    return reply


def _call(
    fn_key: str, fn_holder: list, inputs: bytes, run_args: bool, buffers: list | None
) -> bytes:
    return call_pickled(*_load(fn_key, fn_holder, inputs, buffers), run_args)


def map_chunk(fn_key: str, fn_holder: list, items: bytes) -> dict:
    """A chunk of ``map``: ``{"ok": True, "outcomes": [(True, pickle) | (False, record)]}``."""
    with _Captured() as captured:
        try:
            reply: dict = {"ok": True, "outcomes": map_outcomes(*_load(fn_key, fn_holder, items))}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as a record
            reply = {"ok": False, "failure": _failure_record(exc)}
    reply["output"] = captured.output()
    reply["node"] = _node()
    return reply


def _load(
    fn_key: str, fn_holder: list, data: bytes, buffers: list | None = None
) -> tuple[Any, Any]:
    """The function and the unpickled ``data`` (with its out-of-band ``buffers``); a
    failure to load either (a module missing on this node) is reported as such, not as
    the function's error."""
    try:
        return _function(fn_key, fn_holder), pickling.loads(data, buffers=buffers or ())
    except BaseException as exc:
        raise _Failure(Failure.LOAD, _load_failure_message(exc)) from exc


_node_id: list[str] = []


def _node() -> str:
    """This worker's node, as a short label."""
    if not _node_id:
        import ray

        try:
            _node_id.append(ray.get_runtime_context().get_node_id()[:12])
        except Exception:  # noqa: BLE001 - a label only
            return "?"
    return _node_id[0]


# --------------------------------------------------------------------------- recorded runs


def execute(
    folder: RunFolder,
    fn_bytes: bytes,
    inputs_bytes: bytes | None,
    fn_name: str,
    run_args: bool,
    run_url: str,
) -> dict:
    """Execute a recorded run: its function and inputs as the coordinator recorded them,
    its output into its logs, its result or error into the folder. Returns what the
    coordinator records: ``{"status": "COMPLETED"}`` or ``{"status": "FAILED",
    "message", "type", "traceback"}``, with the digests of what it wrote.
    """
    digests: dict = {}
    with _RunLogs(folder):
        if folder.local:
            os.environ["REMOTERUN_RUN_DIR"] = folder.path
        else:  # the folder itself, credentials and all, stays in this process
            os.environ["REMOTERUN_RUN_URL"] = run_url
            context.executing(folder)
        os.environ["REMOTERUN_RUN_NAME"] = folder.name
        error: dict | None = None
        result: bytes | None = None
        try:
            fn = pickling.loads(fn_bytes)
            inputs = pickling.loads(inputs_bytes) if inputs_bytes else {}
            if run_args:
                inputs = resolve_run_arguments(inputs)
            value = run_to_end(fn(*inputs.get("args", ()), **inputs.get("kwargs", {})))
            try:
                result = pickling.dumps(value)
            except Exception as exc:
                error = {
                    "type": SERIALIZATION_ERROR,
                    "message": f"the return value of {fn_name} cannot be pickled "
                    f"({type(value).__name__}): {exc}",
                    "traceback": "",
                    "exc": None,
                }
        except BaseException as exc:  # SystemExit and KeyboardInterrupt fail the run too
            from ...agent.failures import error_record

            error = error_record(exc, skip_frames=1)
            sys.stderr.write(error["traceback"])
        finally:
            for key in ("REMOTERUN_RUN_URL", "REMOTERUN_RUN_DIR", "REMOTERUN_RUN_NAME"):
                os.environ.pop(key, None)
            context.executing(None)
    if error is None:
        folder.write_result(result or b"", digests)
        return {"status": "COMPLETED", "digests": digests.get("digests", {})}
    if error["exc"] is not None:
        folder.write_error(error["exc"], digests)
    return {
        "status": "FAILED",
        "message": error["message"],
        "type": error["type"],
        "traceback": error["traceback"],
        "digests": digests.get("digests", {}),
    }


class _RunLogs:
    """A run's fds 1 and 2 (and sys.stdout/stderr) into its log files while it executes:
    straight into them on a shared filesystem, else into local files copied to the
    folder every second and at the end."""

    _PERIOD = 1.0

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.saved: list[int] = []
        self.paths: list[str] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.shipped: dict[str, int] = {}  # stream -> size of its last copy

    def __enter__(self) -> _RunLogs:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if self.folder.local:
            fds = [self.folder.open_log(s, truncate=False) for s in ("stdout", "stderr")]
        else:
            self.tmp = tempfile.mkdtemp(prefix="remoterun-logs-")
            self.paths = [os.path.join(self.tmp, s) for s in ("stdout", "stderr")]
            fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for p in self.paths]
            self.thread = threading.Thread(target=self._ship_until_stopped, daemon=True)
            self.thread.start()
        for fd, log in zip((1, 2), fds):
            self.saved.append(os.dup(fd))
            os.dup2(log, fd)
            os.close(log)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = self.streams
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self._ship()
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)

    def _ship_until_stopped(self) -> None:
        while not self.stop.wait(self._PERIOD):
            try:
                self._ship()
            except Exception:  # noqa: BLE001 - the last copy, at the end, says it
                time.sleep(self._PERIOD)

    def _ship(self) -> None:
        """Copy each log that grew since its last copy (an object is written whole)."""
        for stream, path in zip(("stdout", "stderr"), self.paths):
            size = os.path.getsize(path)
            if self.shipped.get(stream) == size:
                continue
            with open(path, "rb") as f:
                data = f.read()
            self.folder.write_log(stream, data)
            self.shipped[stream] = len(data)
