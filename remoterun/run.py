"""Run handles: a recorded execution, wherever its folder lives.

A Run reads its folder (``agent.runfolder.RunFolder``) and asks its system (when it has
one that executes) for its status, so a worker that died is found out. Results and
errors are unpickled only when asked for with ``result()``, ``exception()`` or
``inputs()``.
"""

from __future__ import annotations

import enum
import functools
import os
import posixpath
import time
from typing import Any, AsyncIterator, Callable, Generator, Iterator

from . import aio, context, export, lineage, registry, transfer
from .agent.protocol import Failure
from .agent.record import (
    CANCELLED,
    CANCELLED_ERROR,
    COMPLETED,
    FAILED,
    NOT_STARTED,
    TERMINAL,
    RunRecord,
    check_key,
)
from .agent.runfolder import RunArgument, RunFolder
from .errors import (
    CorruptRunError,
    RemoterunError,
    RunNotFinishedError,
    RunNotFoundError,
    exception_from_record,
)
from .folder import (
    LOCAL,
    check_run_name,
    split_run_url,
)
from .rerun import rerun as _rerun

# A System (``remoterun.systems``, the layer above, which makes Run handles); typed
# loosely here, so that this module does not import it.
System = Any


class RunStatus(str, enum.Enum):
    """Where a run is in its life. COMPLETED, FAILED and CANCELLED are terminal."""

    NOT_STARTED = "NOT_STARTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self.value in TERMINAL

    def __str__(self) -> str:
        return self.value


_POLL_FIRST = 0.001
_POLL_MAX = 0.1
# How long one wait of a system that tells when a run ends lasts (then the run is read).
_POLL_LONG = 1.0
# How long a run that was seen may read as absent before wait() says it is gone.
_GONE_AFTER = 1.0


class Run:
    """One recorded execution: its folder, and the system it belongs to (if any).

    Get one from ``fn.run()``, ``fn.get_or_run()``, ``system.get_run(name)`` or
    ``rr.run(name=..., system=...)`` / ``rr.run(path=URL)``.
    """

    def __init__(
        self,
        folder: RunFolder,
        system: System | None = None,
        config: dict | None = None,
        *,
        attempt: int | None = None,
        trust: str | None = None,
    ):
        self.folder = folder
        self.system = system
        self._config = _as_record(config)
        # "signed": its pickles are read only under a valid team signature (when this
        # machine has the key); "writers": digests only (the store's writers are
        # trusted); None: "signed" unless the folder is on this machine or on the host
        # of the executing system it belongs to (stores of the user's own).
        self._trust = trust
        # Set when the handle is one attempt's (a started or attached run); None follows
        # whatever attempt of the name is current.
        self._attempt = attempt
        self._outcome: dict | None = None  # result/error bytes from the last terminal poll
        self._context: context.BlockRecorder | None = None
        # Called once, with this Run, when wait() first sees it COMPLETED (publishing to
        # the shared stores of the function that started it).
        self._on_completed: Any = None

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def url(self) -> str:
        """Where the run's folder is, as an fsspec URL."""
        return self.folder.url

    @property
    def root(self) -> str:
        return posixpath.dirname(self.folder.path)

    def __repr__(self) -> str:
        status = (self._config or {}).get("status", "?")
        return f"<Run {self.name!r} {status} at {self.url}>"

    def _repr_html_(self) -> str:
        """How Jupyter shows a run: a card of its record, read again unless terminal."""
        problem = ""
        if not self._terminal:
            try:
                self.refresh()
            except Exception as exc:  # a card says what it could not read; it never fails
                problem = f"could not read it now: {type(exc).__name__}: {exc}"
        from . import display  # start-up time: html and datetime, for notebooks only

        return display.run_card(self.name, self.url, self._config, problem)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def at(self, folder: RunFolder, system: Any = None, config: dict | None = None) -> Run:
        """A handle of the same kind on another folder (a run this one links to), its
        record as given (None: read when asked). Its trust is its own store's (see
        ``Run``), not this handle's."""
        return type(self)(folder, system, config)

    @property
    def known_config(self) -> dict | None:
        """The record as last read, None if it was never read (or there is none)."""
        return self._config

    @property
    def execution(self) -> str:
        """One execution of this run as seen from this process: a block by its start, a
        recorded run by this process (a worker executes one run)."""
        if self._context is not None and self._context.config:
            return f"{self.url}@{self._context.config.start_time}"
        return f"{self.url}@pid{os.getpid()}"

    # ------------------------------------------------------------------ status

    @property
    def config(self) -> RunRecord:
        """The run's record (``config.json``) as last read; read it first if never read
        (empty when there is no such run)."""
        if self._config is None:
            self.refresh()
        return self._config if self._config is not None else RunRecord()

    def refresh(self) -> Run:
        """Read the record again (finding out a dead worker on its host); return self."""
        self._config = _as_record(self._read_status(want_outcome=False)["config"])
        return self

    @property
    def _terminal(self) -> bool:
        """Whether the record as last read is terminal (no need to read it again)."""
        return self._config is not None and self._config.terminal

    def _read_status(self, want_outcome: bool) -> dict:
        reply = self._read_current(want_outcome)
        config = _as_record(reply.get("config"))
        if self._attempt is not None and config and config.attempt != self._attempt:
            # The name was executed again: this handle's attempt is now archived.
            self.folder = self.folder.attempt(self._attempt)
            self._attempt = None
            return self._read_current(want_outcome)
        return reply

    def _read_current(self, want_outcome: bool) -> dict:
        if self.folder.archived:  # attempts/<n>/: terminal
            return {"config": self.folder.read_record()}
        if self.system is not None:  # an executing one finds a dead worker out
            return self.system.status(self.name, root=self.root, want_outcome=want_outcome)
        if self.folder.local:
            return {"config": _host_runs(self.root).status(self.name)}
        return self.folder.read_with_outcome(want_outcome)

    @property
    def status(self) -> RunStatus:
        """The run's status, read again unless it was already terminal."""
        if not self._terminal:
            self.refresh()
        return RunStatus(self.config.status)

    def done(self) -> bool:
        return self.status.terminal

    def wait(self, timeout: float | None = None) -> RunStatus:
        """Block until the run is terminal; return its status.

        Raises TimeoutError when ``timeout`` seconds pass first, RunNotFoundError when
        there is no such run.
        """
        steps = self._waiting(timeout)
        while True:
            done, value = _step(steps)
            if done:
                return value
            time.sleep(value)

    async def await_end(self, timeout: float | None = None) -> RunStatus:
        """``wait()``, awaited: each look at the run is a short job of a small pool of
        threads (``remoterun.aio``) and the pauses between them the event loop's, so a
        waiting task holds no thread. Cancelling it only stops the waiting: the run goes
        on."""
        import asyncio

        steps = self._waiting(timeout)
        while True:
            done, value = await aio.look(functools.partial(_step, steps))
            if done:
                return value
            await asyncio.sleep(value)

    def _waiting(self, timeout: float | None) -> Generator[float, None, RunStatus]:
        """The steps of waiting for the run: each reads it (blocking), then yields how
        long to pause before the next; returns the terminal status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_FIRST
        if not self._terminal:
            lineage.check_not_self(self, current_run())
        # A run seen once does not vanish, but its record can read as absent for a moment
        # while the name is executed again elsewhere: look again before saying it is gone.
        missing_since = None
        while True:
            if not self._terminal:
                # The poll that finds the run terminal brings its outcome along: one round
                # trip less for result() on a remote system.
                seen = self._config is not None
                reply = self._read_status(want_outcome=True)
                if reply["config"] is None and seen:
                    missing_since = missing_since or time.monotonic()
                    if time.monotonic() - missing_since < _GONE_AFTER:
                        yield _POLL_FIRST
                        continue
                self._config = _as_record(reply["config"])
                self._outcome = reply
            status = RunStatus(self._config.status if self._config is not None else NOT_STARTED)
            if status.terminal:
                if status is RunStatus.COMPLETED and self._on_completed is not None:
                    hook, self._on_completed = self._on_completed, None
                    hook(self)
                return status
            if self._config is None:
                raise RunNotFoundError(f"no run at {self.url}")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"run {self.name!r} is still {status} after {timeout} s")
                delay = min(delay, left)
            # A system that can tell when a run ends (Ray's coordinator) is asked to wait
            # for it; the others are polled, less often as the run goes on.
            wait_for_end = getattr(self.system, "wait_for_end", None)
            if wait_for_end is None or self.folder.archived:
                yield delay
            else:
                left = _POLL_LONG if deadline is None else deadline - time.monotonic()
                if not wait_for_end(self.name, self.root, max(0.0, min(_POLL_LONG, left))):
                    yield delay  # nothing to wait on: read it again, less often
            delay = min(delay * 1.5, _POLL_MAX)

    # ------------------------------------------------------------------ outcome

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value, once the run is terminal.

        Raises the function's own exception (chained from a RemoteError carrying the
        remote traceback) when it FAILED, RunCancelledError when CANCELLED,
        TimeoutError when ``timeout`` passes first.
        """
        value = self.read_result(timeout)
        if current_run() is not None:
            lineage.note(lineage.USED, self, outer=current_run())
        return value

    async def aresult(self, timeout: float | None = None) -> Any:
        """``result()``, awaited (``await run`` is the same without a timeout): waiting
        holds no thread (see ``await_end``); cancelling it leaves the run going on."""
        await self.await_end(timeout)
        return await aio.look(self.result)  # terminal: reads the outcome only

    def __await__(self) -> Generator[Any, None, Any]:
        return self.aresult().__await__()

    def read_result(self, timeout: float | None = None) -> Any:
        """``result()`` without noting the run as used by the current run (lineage): for
        a caller that records the use itself, or none."""
        self.wait(timeout)
        for last_try in (False, True):
            outcome = self._outcome or {}
            if self.config.status != COMPLETED:
                raise self._failure(outcome.get("error_pickle"))
            data = outcome.get("result")
            if data is None:
                data = self.folder.read_result()
            try:
                return self._unpickle("result", data)
            except CorruptRunError:
                # A handle read before the name was executed again holds the earlier
                # attempt's record: read the record again before calling it damaged.
                seen = self.config
                self._outcome = None
                if last_try or self.refresh().config == seen:
                    raise
                self.wait(timeout)
        raise AssertionError("unreachable")

    def outcome_of(self, reply: dict) -> Any:
        """The value of a system's reply about this run (``config`` with ``result`` or
        ``error_pickle`` bytes): its result, checked and unpickled; its failure raised;
        waited for when the reply found it still running."""
        config = _as_record(reply.get("config")) or RunRecord()
        if config.status == COMPLETED:
            data = reply.get("result")
            if data is None:  # a missing file is told as such by the digest check
                data = self.folder.read_result()
            return self._unpickle("result", data, config)
        if config.terminal:
            raise failure_from_config(config, reply.get("error_pickle"), self)
        return self.result()

    def on_completed(self, hook: Any) -> None:
        """Call ``hook(run)`` once, when ``wait()`` first sees the run COMPLETED."""
        self._on_completed = hook

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the run ended with, or None if it COMPLETED."""
        self.wait(timeout)
        if self.config.status == COMPLETED:
            return None
        return self._failure()

    def _failure(self, error_pickle: bytes | None = None) -> BaseException:
        config = self.config
        if error_pickle is None and config.status == FAILED:
            error_pickle = self.folder.read_error()
        return failure_from_config(config, error_pickle, self)

    def inputs(self) -> dict:
        """The call's arguments: ``{"args": [...], "kwargs": {...}}``."""
        inputs = self.load_pickle("inputs")
        args = [self._argument_run(a) for a in inputs.get("args", ())]
        kwargs = {k: self._argument_run(v) for k, v in inputs.get("kwargs", {}).items()}
        return {"args": args, "kwargs": kwargs}

    def _argument_run(self, value: Any) -> Any:
        """A run passed as an argument (recorded as a reference) as a Run again."""
        if isinstance(value, RunArgument):
            return lineage.resolve(self, value.url, value.attempt) or value
        if type(value) in (list, tuple):
            return type(value)(self._argument_run(v) for v in value)
        if type(value) is dict:
            return {k: self._argument_run(v) for k, v in value.items()}
        return value

    def __remoterun_fingerprint__(self) -> str:
        """What stands for this run when it is an argument: its name and which attempt,
        wherever its folder is (a copy in S3 fingerprints as the original)."""
        config = self.config
        return f"run:{self.name}:{config.attempt}:{config.end_time}"

    def read_pickle(self, what: str) -> bytes:
        """The bytes of the run's pickle ``what`` (``"function"``, ``"inputs"``,
        ``"result"``, ``"error"``), once checked: its record trusted, its digest matched."""
        return self._checked(what, self.folder.read_pickle(what))

    def load_pickle(self, what: str, data: bytes | None = None) -> Any:
        """The object in the run's pickle ``what``, checked (see ``read_pickle``) and
        unpickled; ``data``: its bytes, when already read."""
        if data is None:
            data = self.folder.read_pickle(what)
        return self._unpickle(what, data)

    def _unpickle(self, what: str, data: bytes | None, config: dict | None = None) -> Any:
        """The object in the run's pickle ``what`` (``"result"``, ``"inputs"``, ...), once
        the record it belongs to is trusted and ``data`` matches its digest there
        (CorruptRunError, UntrustedRunError otherwise: nothing unchecked is unpickled)."""
        data = self._checked(what, data, config)
        import cloudpickle  # here, not at import: `import remoterun` stays light

        try:
            return cloudpickle.loads(data)
        except Exception as exc:
            raise RemoterunError(
                f"the {what} of run {self.name!r} cannot be unpickled here "
                f"({type(exc).__name__}: {exc}); load it where the modules it needs are "
                "installed"
            ) from exc

    def _checked(self, what: str, data: bytes | None, config: dict | None = None) -> bytes:
        """``data``, read as the run's pickle ``what``, once the record it belongs to
        (this run's as last read, or ``config``) is trusted and holds its digest."""
        config = self.config if config is None else config
        required = self.needs_signature
        self.folder.check_trusted(config, required=required)
        return self.folder.check_digest(config, what, data, legacy_ok=not required)

    @property
    def needs_signature(self) -> bool:
        """Whether the run's pickles are read only under a valid team signature (when
        this machine has the key): runs of shared stores and of stores not the user's
        own. A run on this machine or on its executing system's host needs none."""
        if self._trust is not None:
            return self._trust == "signed"
        own_host = self.system is not None and self.system.executes
        return not (self.folder.local or own_host)

    # ------------------------------------------------------------------ logs

    def stdout(self) -> str:
        """Everything the run wrote to stdout so far."""
        return self.folder.read_log("stdout").decode("utf-8", "replace")

    def stderr(self) -> str:
        """Everything the run wrote to stderr so far."""
        return self.folder.read_log("stderr").decode("utf-8", "replace")

    def logs(
        self, follow: bool = False, *, stream: str = "stdout", poll: float = 0.1
    ) -> Iterator[str]:
        """Yield the run's log lines; with ``follow``, keep yielding until the run ends.

        ``stream`` is ``"stdout"`` or ``"stderr"``. A last line without a newline is
        yielded once the run is over.
        """
        read = self._log_reader(stream, follow)
        while True:
            lines, finished, grew = read()
            yield from lines
            if finished:
                return
            if not grew:
                time.sleep(poll)

    async def alogs(
        self, follow: bool = False, *, stream: str = "stdout", poll: float = 0.1
    ) -> AsyncIterator[str]:
        """``logs()`` as an async iterator (``async for line in run.alogs(follow=True)``):
        each read is a short job of a small pool of threads, each pause the loop's."""
        import asyncio

        read = self._log_reader(stream, follow)
        while True:
            lines, finished, grew = await aio.look(read)
            for line in lines:
                yield line
            if finished:
                return
            if not grew:
                await asyncio.sleep(poll)

    def _log_reader(self, stream: str, follow: bool) -> Callable[[], tuple[list[str], bool, bool]]:
        """A reader of the log ``stream`` from its start: each call returns the complete
        lines written since the last (and the last, unterminated one once the run is
        over), whether reading is over, and whether the log grew."""
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        offset, pending = 0, b""

        def read() -> tuple[list[str], bool, bool]:
            nonlocal offset, pending
            finished = not follow or self.status.terminal
            data = self.folder.read_log(stream, offset)
            offset += len(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            text = [line.decode("utf-8", "replace") + "\n" for line in lines]
            if finished and pending:
                text.append(pending.decode("utf-8", "replace"))
            return text, finished, bool(data)

        return read

    # ------------------------------------------------------------------ control

    def cancel(self, grace: float = 3.0) -> RunStatus:
        """Stop the run's whole process group (SIGTERM, then SIGKILL after ``grace`` s)
        and record it CANCELLED. A terminal run is left as it is."""
        if self.system is None or not self.system.executes:
            if not self.folder.local:
                raise RemoterunError(
                    f"run {self.name!r} at {self.url} has no system to cancel it on"
                )
            self._config = _as_record(_host_runs(self.root).cancel(self.name, grace))
        else:
            self._config = _as_record(self.system.cancel(self.name, root=self.root, grace=grace))
        return self.status

    # ------------------------------------------------------------------ moving

    def to(
        self,
        system: Any = "here",
        path: str | None = None,
        *,
        wait: bool = False,
        overwrite: bool = False,
        storage_options: dict | None = None,
        progress: bool | None = None,
    ) -> Run:
        """Copy the whole run folder (earlier attempts included) to another place; return
        the Run there.

        ``system``: ``"here"``, a cluster or any System (the run goes in its root, or at
        ``path`` on its filesystem); ``"s3"`` with ``path="bucket/prefix/<name>"``; or an
        fsspec URL: the run's own folder when its last part is the run's name, else the
        folder that will hold it. A RUNNING run is refused unless ``wait=True``; another
        run of the same name at the destination is refused unless ``overwrite=True``.
        """

        status = self.refresh().status
        if not status.terminal:
            if not wait:
                raise RunNotFinishedError(
                    f"run {self.name!r} is {status}: copy it once it is finished, or pass "
                    "wait=True to wait for it"
                )
            self.wait()
        target, folder = transfer.copy_run(
            self, system, path, overwrite=overwrite, options=storage_options, progress=progress
        )
        return self if folder.url == self.url else Run(folder, target)

    # ------------------------------------------------------------------ metrics, tags

    @property
    def metrics(self) -> dict[str, Any]:
        """``{"loss": [0.5, 0.3], "acc": 0.9}``: logged with ``log_metric``."""
        return self.refresh().config.metrics

    @property
    def tags(self) -> dict[str, Any]:
        return self.refresh().config.tags

    @property
    def params(self) -> dict[str, Any]:
        return self.refresh().config.params

    def log_metric(
        self,
        key: str,
        value: float,
        *,
        step: int | None = None,
        overwrite: bool = False,
        single_value: bool = False,
    ) -> None:
        """Append ``value`` to the metric ``key`` (a list), with its ``step`` if given;
        ``overwrite=True`` starts the list again, ``single_value=True`` keeps just the
        number. Stored in ``config.json``, so every copy of the run has it."""
        number = RunRecord.metric_value(key, value, step)
        self.update_record(
            lambda record: record.add_metric(
                key, number, step, overwrite=overwrite, single_value=single_value
            )
        )

    def set_tag(self, key: str, value: Any) -> None:
        """Set the tag ``key`` (text, a number or a bool; anything else as its ``str``)."""
        check_key(key, "tag")  # before any reading or locking
        self.update_record(lambda record: record.set_tag(key, value))

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the run's parameters (values kept as JSON when they can be, else as
        their ``repr``)."""
        for key in params:
            check_key(key, "param")
        self.update_record(lambda record: record.set_params(params))

    def update_record(self, change: Any) -> None:
        """Change the run's record in place: under its lock on this machine (the worker
        writes its outcome under the same lock, re-reading the record first), in the
        block's own record for a ``with rr.run(...)`` block. ``change(config)`` returns
        False when it changed nothing (nothing is written then)."""
        if self._context is not None and self._context.config:
            with self._context.lock:  # threads of the block may link runs at once
                if change(self._context.config) is not False:
                    self.folder.write_record(self._context.config)
                self._config = RunRecord(self._context.config)
            return
        if self.folder.local and not self.folder.archived:
            runs = _host_runs(self.root)
            with runs.lock(self.name):
                config = runs.read_config(self.name)
                if config is None:
                    raise RunNotFoundError(f"no run at {self.url}")
                if change(config) is not False:
                    runs.write_config(self.name, config)
        else:  # an object store: the last writer wins
            config = self.folder.read_record()
            if config is None:
                raise RunNotFoundError(f"no run at {self.url}")
            # Rewriting signs it with this machine's key: never a record not checked.
            self.folder.check_trusted(config, required=self.needs_signature)
            if change(config) is not False:
                self.folder.write_record(config)
        self._config = config

    # ------------------------------------------------------------------ lineage

    def parent(self) -> Run | None:
        """The run that started this one, or None."""
        url = self.config.parent
        found = lineage.resolve(self, url) if url else None
        return found if found is not None and found.known_config is not None else None

    def children(self) -> list[Run]:
        """The runs this run started (its ``downstream``), in order."""
        return lineage.linked(self, lineage.PRODUCED)

    def upstream(self) -> list[Run]:
        """The finished runs whose results this run used: cache hits, results it read,
        runs passed to it as arguments."""
        return lineage.linked(self, lineage.USED)

    def steps(self) -> list[Run]:
        """Every run this run started or used and, through the runs it started, theirs:
        a pipeline's steps, whether they executed or came from the cache."""
        return lineage.steps(self)

    def find_step(self, name: str) -> Run:
        """The step (see ``steps``) whose run name is ``name``, else the only step of the
        function ``name``. Raises RunNotFoundError when there is none."""
        return lineage.find_step(self, name)

    def graph(self, max_runs: int = 1000) -> Any:
        """The runs linked to this one, both ways and transitively, as a ``RunGraph``
        (``nodes``, ``edges``, ``to_dot()`` for Graphviz)."""
        return lineage.graph(self, max_runs)

    # ------------------------------------------------------------------ re-running

    def rerun(self, run_name: str | None = None, system: Any = None) -> Run:
        """Execute the recorded function (``function.pkl``) again with the recorded inputs,
        as a new run on ``system`` (default: this run's own system, else this machine);
        return it at once, RUNNING. Its record names this run as its ``source``.

        The recorded bytes are sent as they are, once checked against their digests (and
        the signature, where one is needed): the function is not unpickled here.
        """
        return _rerun(self, run_name, system, outer=current_run())

    def export(self, path: str, *, format: str | None = None) -> str:
        """Write the run's record (``config.json`` plus its URL) to ``path`` (a file path or
        fsspec URL) as YAML or JSON, by ``format`` or the path's extension; return
        ``path``. YAML needs PyYAML; without it the file is written as JSON, which YAML
        readers read too."""
        return export.write_record(self.url, self.refresh().config, path, format)

    def attempts(self) -> list[Run]:
        """The earlier attempts kept under ``attempts/<n>/``, oldest first."""
        return [Run(self.folder.attempt(n), trust=self._trust) for n in self.folder.attempts()]

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Run:
        if self._context is not None:
            raise RemoterunError(f"run {self.name!r} is already open as a context")
        self._context = context.BlockRecorder(self, outer=current_run())
        self._context.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        recorder, self._context = self._context, None
        if recorder is not None:
            self._config = _as_record(recorder.finish(exc))


def _step(steps: Generator[float, None, RunStatus]) -> tuple[bool, Any]:
    """The next step of ``Run._waiting``: ``(True, status)`` once it is over, else
    ``(False, pause)`` (StopIteration cannot cross a future)."""
    try:
        return False, next(steps)
    except StopIteration as end:
        return True, end.value


def _as_record(config: dict | None) -> RunRecord | None:
    """A record as read from a store or a reply, as a RunRecord."""
    if config is None or isinstance(config, RunRecord):
        return config
    return RunRecord(config)


def failure_from_config(config: dict, error_pickle: bytes | None, run: Run) -> BaseException:
    """The exception a FAILED or CANCELLED run raises, from its record."""
    config = _as_record(config) or RunRecord()
    status = config.get("status")
    if status not in (FAILED, CANCELLED):
        return RunNotFinishedError(f"run {run.name!r} is {status}, not failed")
    failure = {
        "kind": Failure.REMOTE,
        "message": config.error or f"run {run.name!r} {status}",
        "type": config.error_type,
        "traceback": config.error_traceback,
        "exc": error_pickle,
    }
    if status == CANCELLED:
        failure["type"] = CANCELLED_ERROR
    if error_pickle is not None:  # unpickled below only once it is checked
        run._checked("error", error_pickle, config)
    logs = (run.folder.log_url("stdout"), run.folder.log_url("stderr"))
    return exception_from_record(failure, run_name=run.name, host=config.host or "", log_paths=logs)


# --------------------------------------------------------------------------- factory


def run(
    name: str | None = None,
    *,
    system: Any = None,
    path: str | None = None,
    storage_options: dict | None = None,
) -> Run:
    """A handle on the run ``name`` of ``system`` (default: this machine), or on the run
    folder at ``path`` (any fsspec URL, or a path on ``system``'s filesystem; the
    folder's last part is the run's name).

    The run need not exist yet: ``with rr.run(name=...) as r:`` records the block as a run.
    """
    resolve = registry.resolve
    if path is not None:
        if name is not None and posixpath.basename(path.rstrip("/")) != name:
            raise RemoterunError(
                f"name {name!r} and path {path!r} disagree: the path's last part is the run's name"
            )
        root, base = split_run_url(path)
        if system is not None:  # a path on that system's filesystem
            resolved = resolve(system).placement(base)
            return Run(resolved.folder(base, root), resolved)
        # An explicit load by URL: its signature is checked whenever there is a team key.
        store = registry.load("storage")(root, **(storage_options or {}))
        return Run(store.folder(base), trust="signed")
    if name is None:
        raise RemoterunError("rr.run() needs a name=, or a path= to the run's folder")
    resolved = resolve(system if system is not None else "here").placement(check_run_name(name))
    return Run(resolved.folder(name), resolved)


# --------------------------------------------------------------------------- current run


def current_run() -> Run | None:
    """The run executing this code: the innermost ``with rr.run(...)`` block of this
    thread (or, in a thread of its own, the one block open in this process), else the
    recorded run this process works for, else None."""
    block = context.innermost()
    if block is not None:
        return block
    run_dir = os.environ.get("REMOTERUN_RUN_DIR")
    if run_dir:
        return Run(RunFolder(LOCAL, run_dir))
    folder = context.executing_folder()  # a run on an object store (Ray)
    if folder is not None:
        return Run(folder, trust="writers")
    return None


def _host_runs(root: str) -> Any:
    """The run store of a root on this machine (the host's own lock and liveness checks)."""
    from .agent.store import HostRuns  # start-up time: fcntl and the protocol

    return HostRuns(root)
