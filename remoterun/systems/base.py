"""The System interface: a place that holds run folders and, for executing systems,
runs code.

A backend implements a few primitives (``filesystem``, ``root``, and for executing
systems ``_request``); the rest (``get_run``, ``run``, ``run_python``, status, cancel)
is written once here.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

from ..agent import layout
from ..agent.protocol import Failure, Op
from ..agent.record import RUNNING, STATUSES
from ..agent.runfolder import Files, RunFolder
from ..errors import (
    CorruptRunError,
    RemoterunError,
    RunNotFoundError,
    RunStorageError,
    SystemUnavailableError,
    exception_from_record,
)
from ..folder import check_run_name, files_of, protocols, storage_errors, storage_reason
from ..run import Run
from .connection import AgentConnection, AgentFailure, OutputHandler

if TYPE_CHECKING:
    import fsspec

    from ..run import Run

logger = logging.getLogger(__name__)


class System:
    """Where runs live (every system) and execute (executing systems only)."""

    #: The system's name, as shown in errors and in run records.
    name: str = "system"
    #: Whether this system can execute functions and commands.
    executes: bool = False
    #: Shared stores (folder URLs) that every function on this system looks in on a
    #: cache miss and publishes its runs to, after its own ``share=``.
    share: tuple[tuple[str, dict], ...] = ()

    # ------------------------------------------------------------------ primitives

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem holding this system's run folders."""
        raise NotImplementedError

    @property
    def root(self) -> str:
        """The folder holding this system's run folders, on ``filesystem()``."""
        raise NotImplementedError

    def _connection(self) -> ContextManager[AgentConnection]:
        """A connection to an agent of this system, held for one or more requests."""
        raise SystemUnavailableError(
            f"{self.name} only stores runs; it cannot execute them. Run functions on "
            "rr.local() or a cluster, then copy the run here with run.to()."
        )

    def call(
        self, op: dict, fn_bytes: bytes, on_output: OutputHandler | None = None
    ) -> tuple[dict | None, str, BaseException | None]:
        """Send a ``call`` or ``map`` op to an agent of this system (the least-loaded
        host's), with the function itself only when that agent does not hold it yet
        (``op["fn_key"]`` names it). Returns ``(reply, host label, error)``: a failed op's
        exception is returned, not raised, so that the caller raises it where its cause
        (a RemoteError) is kept, or keeps it as an item's result."""
        with self._connection() as conn:
            host = conn.label
            try:
                return _send_function_op(conn, op, fn_bytes, on_output), host, None
            except AgentFailure as failure:
                record = failure.record
        return None, host, exception_from_record(record, host=host)

    def _request(self, op: dict, on_output: OutputHandler | None = None) -> dict:
        """Send one request to an agent of this system and return its reply."""
        with self._connection() as conn:
            return conn.request(op, on_output)

    def host_label(self) -> str:
        return self.name

    def parallelism(self) -> int:
        """How many calls this system runs at once at full use (its cores)."""
        return os.cpu_count() or 1

    def cached_hit(self, request: dict) -> dict | None:
        """Answer a ``get`` submit that is a plain cache hit without a round trip, where
        this system can read its run folders in-process; None to ask the system."""
        return None

    def reads_locally(self, folder: RunFolder) -> bool:
        """Whether code executing on this system reads ``folder`` from its own disk."""
        return False

    def placement(self, run_name: str | None) -> System:
        """The system that executes and holds the run ``run_name`` (for None: an
        unrecorded call). A system of one host is its own placement."""
        return self

    # ------------------------------------------------------------------ built on them

    def files(self) -> Files:
        """The run folders' filesystem as a RunFolder uses it."""
        return files_of(self.filesystem())

    def folder(self, name: str, root: str | None = None) -> RunFolder:
        check_run_name(name)
        return RunFolder(self.files(), f"{(root or self.root).rstrip('/')}/{name}")

    def request(self, op: dict, on_output: OutputHandler | None = None, **context: Any) -> dict:
        """``_request`` with agent failures mapped to remoterun's exceptions."""
        try:
            return self._request(op, on_output)
        except AgentFailure as failure:
            record = failure.record
        # Raised outside the except block, so that a remote error's cause is its RemoteError.
        raise exception_from_record(record, host=self.host_label(), **context)

    def status(self, name: str, *, root: str | None = None, want_outcome: bool = False) -> dict:
        """``{"config": ...}``: the run's config (None if there is no such run), with a
        dead worker found out.

        With ``want_outcome``, a terminal run's reply also holds ``result`` or
        ``error_pickle`` bytes, saving a second read.
        """
        if not self.executes:
            return self.folder(name, root).read_with_outcome(want_outcome)
        op = {"op": Op.STATUS, "root": root or self.root, "name": check_run_name(name)}
        op["want_outcome"] = want_outcome
        return self.request(op, run_name=name)

    def cancel(self, name: str, *, root: str | None = None, grace: float = 3.0) -> dict | None:
        """Stop the run's process group and record CANCELLED; return its config."""
        op = {"op": Op.CANCEL, "root": root or self.root, "name": check_run_name(name)}
        op["grace"] = grace
        return self.request(op, run_name=name)["config"]

    def get_run(self, name: str) -> Run:
        """The run of that name on this system; RunNotFoundError if there is none."""
        run = Run(self.folder(name), system=self)
        if run.refresh().known_config is None:
            raise RunNotFoundError(f"no run named {name!r} on {self.name} (looked in {run.url})")
        return run

    def runs(self) -> list[Run]:
        """The runs in this system's root, by name, each holding the record it was read
        with (one listing and one batched read of the records, not a request per run;
        a RUNNING run is asked about again, so that a dead worker is found out).

        What is not a run is skipped with a warning on this module's logger, never
        failing the listing: a stray file, a folder without ``config.json``, a record
        that is not valid JSON, not an object, of an unknown status or of another name.
        Raises RunStorageError when the root itself cannot be listed (no such bucket, no
        credentials, no permission); a root that does not exist yet holds no runs.
        """
        return self.read_runs(self.run_names())

    def run_names(self) -> list[str]:
        """The names of the run folders in this system's root, sorted: one listing, no
        record read (a page of a large store reads the records of its page only, with
        ``read_runs``). Entries that cannot be runs are skipped as ``runs`` skips them."""
        fs = self.filesystem()
        root = self.root
        where = fs.unstrip_protocol(root)
        fs.invalidate_cache(root)  # a listing kept by fsspec (s3fs) would hide new runs
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            _check_bucket(fs, root, where)
            return []
        except storage_errors() as exc:
            raise RunStorageError(
                f"cannot list the runs in {where}: {storage_reason(exc)}"
            ) from exc
        names = []
        for entry in entries:
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            if name.startswith("."):  # remoterun's own lock and temporary files
                continue
            if entry.get("type") != "directory":
                _skipped(f"{where}/{name}", "a file, not a run folder")
            elif not layout.RUN_NAME_RE.fullmatch(name):
                _skipped(f"{where}/{name}", "not a run name")
            else:
                names.append(name)
        return sorted(names)

    def read_runs(self, names: Sequence[str]) -> list[Run]:
        """The runs of these names in this system's root, by name, each holding its
        record: one batched read (a RUNNING run is asked about again, so that a dead
        worker is found out). A name that is not a run's is skipped with a warning, as
        ``runs`` skips it; RunStorageError when the store cannot be read at all."""
        fs = self.filesystem()
        where = fs.unstrip_protocol(self.root)
        folders = {name: self.folder(name) for name in names}
        try:
            records = _read_many(fs, [f.record_path for f in folders.values()])
        except storage_errors() as exc:
            raise RunStorageError(
                f"cannot read the runs in {where}: {storage_reason(exc)}"
            ) from exc
        runs = []
        for name in sorted(folders):
            folder = folders[name]
            try:
                config, problem = self._listed_record(name, records.get(name))
            except (RemoterunError, ValueError, OSError) as exc:
                config, problem = {}, str(exc)
            if problem:
                _skipped(folder.url, problem)
            else:
                runs.append(Run(folder, system=self, config=config))
        return runs

    def _listed_record(self, name: str, data: Any) -> tuple[dict, str | None]:
        """The record of the listed folder ``name``, from its ``config.json`` as read
        (bytes, the exception reading it raised, or None), and why it is not a run's."""
        if data is None or isinstance(data, FileNotFoundError):
            # A folder being archived for a re-execution has no record for a moment: an
            # executing system answers once the new one is written.
            config = self.status(name)["config"] if self.executes else None
            if config is None:
                return {}, f"no {RunFolder.RECORD_FILE}"
            problem = record_problem(config, name)
        elif isinstance(data, BaseException):
            return {}, f"cannot read {RunFolder.RECORD_FILE}: {storage_reason(data)}"
        else:
            config, problem = _record(data, name)
        if problem is None and self.executes and config["status"] == RUNNING:
            config = self.status(name)["config"] or {}  # finds out a worker that died
            problem = record_problem(config, name)
        return config, problem

    def run(
        self,
        cmds: Sequence[str] | str,
        *,
        run_name: str | None = None,
        stream: bool = True,
    ) -> list[tuple[int, str, str]]:
        """Run shell commands here, one after the other; ``[(returncode, stdout, stderr)]``.

        With ``run_name`` the commands are recorded as a run of type ``command``.
        """
        cmd_list = [cmds] if isinstance(cmds, str) else list(cmds)
        return self._run_commands(cmd_list, False, run_name, stream)

    def run_python(
        self, lines: Sequence[str] | str, *, run_name: str | None = None, stream: bool = True
    ) -> list[tuple[int, str, str]]:
        """Run Python source lines as one program with this system's interpreter."""
        line_list = [lines] if isinstance(lines, str) else list(lines)
        return self._run_commands(line_list, True, run_name, stream)

    def _run_commands(
        self, cmds: list[str], python_lines: bool, run_name: str | None, stream: bool
    ) -> list[tuple[int, str, str]]:
        from ..agent.commands import run_commands  # start-up time: subprocess, threading
        from ..function import RemoteFunction

        fn = RemoteFunction(
            run_commands,
            system=self,
            name="python" if python_lines else "cmd",
            run_type="command",
            cmds=cmds,
        )
        return fn.invoke((cmds, python_lines), {}, run_name=run_name, stream=stream)

    def close(self) -> None:
        """Release connections and agents; runs going on are not affected."""

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} root={self.root!r}>"


def record_problem(config: object, name: str) -> str | None:
    """Why ``config``, read from the ``config.json`` of a folder named ``name``, is not
    the record of a remoterun run; None if it is one."""
    if not isinstance(config, dict):
        return f"{RunFolder.RECORD_FILE} holds {type(config).__name__}, not a run's record"
    missing = [k for k in ("name", "status", "run_type") if k not in config]
    if missing:
        return f"{RunFolder.RECORD_FILE} has no {', '.join(missing)} field (not a remoterun record)"
    if config["name"] != name:
        return f"its record is of the run {config['name']!r}, not {name!r}"
    if config["status"] not in STATUSES:
        return f"its record has an unknown status {config['status']!r}"
    return None


def parse_record(data: bytes, name: str, url: str) -> dict:
    """The run record in ``data``, the ``config.json`` of the folder ``name`` at ``url``;
    raises CorruptRunError saying why it is not one."""
    config, problem = _record(data, name)
    if problem:
        raise CorruptRunError(
            f"{url} is not a run: {problem}", url=url, filename=RunFolder.RECORD_FILE
        )
    return config


def _record(data: bytes, name: str) -> tuple[dict, str | None]:
    try:
        config = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both
        return {}, f"{RunFolder.RECORD_FILE} is not valid JSON ({exc})"
    return config, record_problem(config, name)


def _skipped(url: str, why: str) -> None:
    logger.warning("skipped %s: %s", url, why)


# Characters that would make fsspec's cat() read a path as a glob pattern.
_GLOB_CHARS = frozenset("*?[")


def _read_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, Any]:
    """The bytes of each file, or the exception reading it raised, keyed by the name
    of the folder holding it: at once on object stores (``cat`` of many paths)."""
    if not paths:
        return {}
    if any(_GLOB_CHARS & set(path) for path in paths):
        got: dict[str, Any] = {}
        for path in paths:
            try:
                got[path] = fs.cat_file(path)
            except Exception as exc:  # one file's failure is that entry's only
                got[path] = exc
    else:
        got = fs.cat(paths, on_error="return")
    return {posixpath.basename(posixpath.dirname(path)): value for path, value in got.items()}


def _check_bucket(fs: fsspec.AbstractFileSystem, root: str, where: str) -> None:
    """Raise RunStorageError when ``root`` is missing because its bucket is: on an
    object store, a missing prefix is an empty store, a missing bucket a typo."""
    if set(protocols(fs)) & {"file", "local", "sftp", "ssh", "memory"}:
        return
    bucket = root.strip("/").split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except storage_errors() as exc:
        raise RunStorageError(f"cannot list the runs in {where}: {storage_reason(exc)}") from exc
    if not found:
        raise RunStorageError(f"cannot list the runs in {where}: there is no bucket {bucket!r}")


def _send_function_op(
    conn: AgentConnection, op: dict, fn_bytes: bytes, on_output: OutputHandler | None
) -> dict:
    """Send a call or map op on ``conn``; the function itself only if that agent lacks it
    (or has evicted it from its cache)."""
    key = op["fn_key"]
    if key not in conn.known_functions:
        op["fn"] = fn_bytes
    try:
        reply = conn.request(op, on_output)
    except AgentFailure as failure:
        if failure.record.get("kind") != Failure.UNKNOWN_FUNCTION:
            raise
        op["fn"] = fn_bytes
        reply = conn.request(op, on_output)
    conn.known_functions.add(key)
    op.pop("fn", None)
    return reply
