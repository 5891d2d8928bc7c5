"""The System interface: a place that holds run folders and, for executing systems,
runs code.

A backend implements a few primitives (``filesystem``, ``root``, and for executing
systems ``_request``); the rest (``get_run``, ``run``, ``run_python``, status, cancel)
is written once here.
"""

from __future__ import annotations

import logging
import os
import posixpath
import sys
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

from ..agent import layout, protocol
from ..errors import (
    RemoterunError,
    RunNotFoundError,
    SystemUnavailableError,
    exception_from_record,
)
from ..folder import RunFolder, check_run_name
from .connection import AgentConnection, AgentFailure, OutputHandler

if TYPE_CHECKING:
    import fsspec

    from ..run import Run

logger = logging.getLogger(__name__)


def print_output(kind: int, data: bytes) -> None:
    """Write a function's streamed output to this process's stdout or stderr."""
    stream = sys.stdout if kind == protocol.STDOUT else sys.stderr
    try:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()
    except (OSError, ValueError):
        pass


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

    def folder(self, name: str, root: str | None = None) -> RunFolder:
        check_run_name(name)
        return RunFolder(self.filesystem(), f"{(root or self.root).rstrip('/')}/{name}")

    def request(self, op: dict, on_output: OutputHandler | None = None, **context: Any) -> dict:
        """``_request`` with agent failures mapped to remoterun's exceptions."""
        try:
            return self._request(op, on_output)
        except AgentFailure as failure:
            record = failure.record
        # Raised outside the except block, so that a remote error's cause is its RemoteError.
        raise exception_from_record(record, host=self.host_label(), **context)

    def status(self, name: str, *, root: str | None = None, want_outcome: bool = False) -> dict:
        """The run's config (None if there is no such run), with a dead worker found out.

        With ``want_outcome``, a terminal run's reply also holds ``result`` or
        ``error_pickle`` bytes, saving a second read.
        """
        if not self.executes:
            return self.folder(name, root).read_record(want_outcome)
        op = {"op": "status", "root": root or self.root, "name": check_run_name(name)}
        op["want_outcome"] = want_outcome
        return self.request(op, run_name=name)

    def cancel(self, name: str, *, root: str | None = None, grace: float = 3.0) -> dict | None:
        """Stop the run's process group and record CANCELLED; return its config."""
        op = {"op": "cancel", "root": root or self.root, "name": check_run_name(name)}
        op["grace"] = grace
        return self.request(op, run_name=name)["config"]

    def get_run(self, name: str) -> Run:
        """The run of that name on this system; RunNotFoundError if there is none."""
        from ..run import Run

        run = Run(self.folder(name), system=self)
        if run.refresh()._config is None:
            raise RunNotFoundError(f"no run named {name!r} on {self.name} (looked in {run.url})")
        return run

    def runs(self) -> list[Run]:
        """The runs in this system's root, by name."""
        from ..run import Run

        fs = self.filesystem()
        try:
            entries = fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
        return [Run(self.folder(n), system=self) for n in names if layout.RUN_NAME_RE.fullmatch(n)]

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
        from ..agent.worker import run_commands
        from ..function import RemoteFunction

        fn = RemoteFunction(run_commands, system=self, name="python" if python_lines else "cmd")
        fn._run_type = "command"
        fn._cmds = cmds
        return fn._call((cmds, python_lines), {}, run_name=run_name, stream=stream)

    def close(self) -> None:
        """Release connections and agents; runs going on are not affected."""

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} root={self.root!r}>"


def share_list(share: Any) -> tuple[tuple[str, dict], ...]:
    """``share=`` as ``((url, storage_options), ...)``: it takes a folder URL, a storage
    system (``rr.systems.storage.StorageSystem(url, endpoint_url=...)``, whose options are
    kept), a ``(url, options)`` pair, or a list of these."""
    if share is None:
        return ()
    single = isinstance(share, str) or not hasattr(share, "__iter__") or _is_pair(share)
    found: dict[str, dict] = {}
    for item in [share] if single else share:
        if isinstance(item, str):
            url, options = item, {}
        elif _is_pair(item):
            url, options = item[0], dict(item[1])
        elif isinstance(getattr(item, "url", None), str):
            url, options = item.url, dict(getattr(item, "storage_options", {}) or {})
        else:
            raise TypeError(f"share= takes folder URLs or storage systems, not {item!r}")
        found.setdefault(url.rstrip("/"), options)
    return tuple(found.items())


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (list, tuple))
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], dict)
    )


def unknown_system(spec: object) -> RemoterunError:
    return RemoterunError(
        f"cannot tell which system {spec!r} is: use 'here', a System object, "
        "a folder path or an fsspec URL"
    )
