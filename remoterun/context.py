"""``with rr.run(...)``: a block of code recorded as a run, and the stack of blocks that
``rr.current_run()`` reads (each thread's, and the blocks open in this process)."""

from __future__ import annotations

import functools
import io
import os
import sys
import threading
from typing import Any, TextIO

from . import lineage
from .agent.procs import BOOT_ID, HOSTNAME, process_start_time
from .agent.record import RUNNING, RunRecord
from .errors import RunNotFinishedError
from .version import __version__

_STREAMS = ("stdout", "stderr")
# The folder of the recorded run this process executes when it is not on this machine's
# disk (a Ray task's, on an object store): given as an object, since its storage options
# hold credentials that must not go into the environment of the user's subprocesses.
_executing: list[Any] = []


def executing(folder: Any) -> None:
    """Set (or, with None, clear) the folder of the run this process executes."""
    _executing[:] = [] if folder is None else [folder]


def executing_folder() -> Any:
    return _executing[0] if _executing else None


_context_stack = threading.local()
# Blocks open in any thread of this process, so that threads a block starts see it.
_open_blocks: list[Any] = []


def innermost() -> Any:
    """The innermost block open in this thread (or, in a thread of its own, the one block
    open in this process), else None."""
    stack = getattr(_context_stack, "runs", None)
    if stack:
        return stack[-1]
    if len(_open_blocks) == 1:  # a thread started inside the only open block
        return _open_blocks[0]
    return None


class _Tee(io.TextIOBase):
    """A text stream that writes to the stream it replaces and to a run's log."""

    def __init__(self, original: TextIO, sink: Any):
        self._original = original
        self._sink = sink

    def write(self, text: str) -> int:
        self._original.write(text)
        self._sink.write(text.encode("utf-8", "replace"))
        self._sink.flush()
        return len(text)

    def flush(self) -> None:
        self._original.flush()
        self._sink.flush()

    def isatty(self) -> bool:
        return self._original.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8")


class BlockRecorder:
    """Records a ``with rr.run(...)`` block: start and end, logs, and its exception."""

    def __init__(self, run: Any, outer: Any):
        self.run = run
        self._outer = outer
        self.config = RunRecord()
        self.lock = threading.Lock()
        self._sinks: list[Any] = []
        self._streams: tuple[TextIO, TextIO] | None = None

    def start(self) -> None:
        outer = self._outer
        if outer is not None and outer.url == self.run.url:
            raise RunNotFinishedError(f"run {self.run.name!r} is already open as a block")
        self._parent = outer.url if outer is not None else None
        self._start()
        if outer is not None:
            lineage.note(lineage.PRODUCED, self.run, self.config.attempt, outer=outer)

    def _start(self) -> None:
        folder = self.run.folder
        if folder.local:
            # The same lock and liveness check recorded runs take on this machine, so a
            # block whose process died can be re-run and a live one is never moved aside.
            from .agent.store import HostRuns  # start-up time: fcntl, the protocol

            runs = HostRuns(self.run.root)
            runs.status(folder.name)  # marks a block whose process died as lost
            with runs.lock(folder.name):
                previous = runs.read_config(folder.name)
                self._refuse_if_running(previous)
                self._begin(previous)
                self.config.update(boot_id=BOOT_ID, proc_start=process_start_time(os.getpid()))
                self._record()
        else:
            previous = folder.read_record()
            self._refuse_if_running(previous)
            self._begin(previous)
            self._record()

    def _refuse_if_running(self, previous: dict | None) -> None:
        if previous is not None and previous.get("status") == RUNNING:
            where = f"pid {previous.get('pid')} on {previous.get('host')}"
            raise RunNotFinishedError(
                f"run {self.run.name!r} at {self.run.url} is still RUNNING ({where}); "
                "wait for it to finish, cancel it, or record this block under another name"
            )

    def _begin(self, previous: dict | None) -> None:
        """Move an earlier attempt aside and make this block's config."""
        folder = self.run.folder
        attempt = 1
        folder.create()
        if previous is not None:
            attempt = folder.archive_attempt(previous.get("attempt"))
        config = RunRecord.new(
            folder.name,
            "context",
            attempt,
            host=HOSTNAME,
            remoterun_version=__version__,
            creator=creator(),
            parent=self._parent,
        ).running(pid=os.getpid())
        self.config = config

    def _record(self) -> None:
        """Write the RUNNING config and start teeing the block's output into the folder."""
        folder = self.run.folder
        if folder.local:
            self._sinks = [
                os.fdopen(folder.open_log(stream, truncate=True), "wb") for stream in _STREAMS
            ]
        else:  # object stores cannot append: keep the logs and write them at the end
            self._sinks = [io.BytesIO(), io.BytesIO()]
        folder.write_record(self.config)
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._sinks[0])  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self._sinks[1])  # type: ignore[assignment]
        stack = getattr(_context_stack, "runs", None)
        if stack is None:
            stack = _context_stack.runs = []
        stack.append(self.run)
        _open_blocks.append(self.run)

    def finish(self, exc: BaseException | None) -> dict:
        stack = getattr(_context_stack, "runs", [])
        if stack and stack[-1] is self.run:
            stack.pop()
        for i, block in enumerate(_open_blocks):
            if block is self.run:
                del _open_blocks[i]
                break
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
        folder = self.run.folder
        for sink, stream in zip(self._sinks, _STREAMS):
            if isinstance(sink, io.BytesIO):
                folder.write_log(stream, sink.getvalue())
            else:
                sink.close()
        config = self.config
        if exc is None:
            config.completed()
        else:
            from .agent.failures import error_record  # cloudpickle: not at import

            record = error_record(exc)
            if record["exc"] is not None:
                folder.write_error(record["exc"], config)
            config.failed(record["message"], record["type"], "".join(_traceback(exc)))
        folder.write_record(config)
        return config


@functools.lru_cache(maxsize=1)
def creator() -> str:
    """``user@host`` of this process, as records name who made a run."""
    try:
        import getpass

        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{HOSTNAME}"


def _traceback(exc: BaseException) -> list[str]:
    import traceback  # start-up time: `import remoterun` stays light

    return traceback.format_exception(exc)
