"""The host's run store: the run folders under one root on this host's disk, and every
decision about their fate.

Everything that decides the fate of a run folder happens here, on the host that holds it,
under a per-name ``flock``: whether a cached run is a hit, which attempt is archived, who
starts the one execution when many clients ask at once, whether a RUNNING run's worker is
still alive. The client sends one request and gets one answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from typing import Any, Callable, Iterator, Protocol

from ..errors import CorruptRunError
from . import integrity, layout
from .fingerprints import fingerprint_differences
from .procs import (
    BOOT_ID,
    HOSTNAME,
    describe_exit,
    kill_group,
    kill_leftovers,
    process_start_time,
    worker_alive,
)
from .protocol import Action, Mode
from .record import COMPLETED, RUNNING, RunRecord
from .runfolder import POSIX, RunFolder

ExitCallback = Callable[[int, int], None]


class SpareWorker(Protocol):
    """What ``start`` needs of a worker (the fork server's ``SpareWorker``)."""

    pid: int
    proc_start: int | None

    def hand_over(self, request: dict) -> None: ...

    def discard(self) -> None: ...


# How long a status check waits for a dead worker's reaper before marking it lost itself.
_REAPER_GRACE = 0.5


# Run roots this process has made sure are private (one chmod per root and process).
_private_roots: set[str] = set()


class HostRuns:
    """The run folders under one root on this host's own disk."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def path(self, name: str) -> str:
        return os.path.join(self.root, layout.check_run_name(name))

    def folder(self, name: str) -> RunFolder:
        """The folder of the run ``name`` (validated)."""
        return RunFolder(POSIX, self.path(name), name)

    def _make_root(self) -> None:
        """Create the root (and ``.locks``) private to this user, once per process. A root
        in remoterun's own home (``~/.remoterun``) that an older version left readable by
        others is tightened; a root the user made elsewhere keeps the mode they chose (its
        run folders are private all the same). Staged files that a killed agent left are
        removed."""
        if self.root in _private_roots:
            return
        layout.makedirs_private(os.path.join(self.root, layout.LOCKS))
        if ".remoterun" in self.root.split(os.sep):
            try:
                info = os.stat(self.root)
                if info.st_uid == os.getuid() and info.st_mode & 0o077:
                    os.chmod(self.root, layout.FOLDER_MODE)
            except OSError:
                pass
        _remove_stale_staging(os.path.join(self.root, layout.STAGING))
        _private_roots.add(self.root)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the per-name lock that every change of a run's fate takes. Lock files are
        the owner's only: no other user can open one, so none can block a name."""
        self._make_root()
        path = os.path.join(self.root, layout.LOCKS, name + ".lock")
        try:
            fd = layout.open_private(path, os.O_RDWR)
        except FileNotFoundError:  # the root was removed since: make it again
            _private_roots.discard(self.root)
            self._make_root()
            fd = layout.open_private(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read_config(self, name: str) -> RunRecord | None:
        """The run's record, None when there is none; raises CorruptRunError for a
        record file that is not one."""
        return self.folder(name).read_record()

    def write_config(self, name: str, config: dict) -> None:
        self.folder(name).write_record(config)

    # ------------------------------------------------------------------ status

    def status(self, name: str) -> dict | None:
        """The run's config, after marking a RUNNING run whose worker is gone as FAILED."""
        self.path(name)
        config = self.read_config(name)
        if config is None and os.path.isdir(self.path(name)):
            # A folder without config.json is being archived for a re-execution, which
            # holds the lock until the new attempt is recorded: read it then.
            with self.lock(name):
                config = self.read_config(name)
        if config and config.status == RUNNING and not worker_alive(config):
            # The agent that forked the worker, if it still lives, is recording how it
            # ended (the signal, the exit code): give it a moment to say so first.
            deadline = time.monotonic() + _REAPER_GRACE
            while time.monotonic() < deadline:
                time.sleep(0.01)
                config = self.read_config(name)
                if not config or config.status != RUNNING:
                    return config
            with self.lock(name):
                config = self.read_config(name)
                if config and config.status == RUNNING and not worker_alive(config):
                    config = self._mark_lost(name, config, "its process is gone")
        return config

    def _mark_lost(self, name: str, config: dict, why: str) -> dict:
        """Record a run whose worker is gone as FAILED, after killing what the worker left
        running in its process group. When the record cannot be written (a full disk),
        the FAILED record is returned all the same, and written at a later look."""
        kill_leftovers(config)
        config = RunRecord(config).lost(why)
        try:
            self.write_config(name, config)
        except OSError as exc:
            config["error"] += f" (not recorded on disk: {layout.storage_message(exc)})"
        return config

    def with_outcome(self, name: str, config: RunRecord | None) -> dict:
        """``{"config": config}`` plus, for a terminal run, the outcome of that very attempt.

        When the name was executed again between the reads, the attempt's files have been
        archived (a re-execution moves them under the lock before it writes anything):
        they are read from there, so config and outcome always belong together.
        """
        reply: dict[str, Any] = {"config": config}
        if not config or not config.terminal:
            return reply
        folder = self.folder(name)
        reply.update(folder.read_outcome(config))
        if folder.read_record() == config:
            return reply
        with self.lock(name):
            if folder.read_record() == config:
                return {"config": config, **folder.read_outcome(config)}
            archived = folder.archived_folder(config)
            if archived is not None:
                return {"config": config, **archived.read_outcome(config)}
            config = folder.read_record()  # gone altogether: say what is there now
            reply = {"config": config}
            if config and config.terminal:
                reply.update(folder.read_outcome(config))
        return reply

    # ------------------------------------------------------------------ claims

    def cached_hit(self, request: dict) -> dict | None:
        """The reply to a ``get`` submit that is a plain cache hit, without taking the lock;
        None when the lock is needed to decide.

        config.json is replaced atomically, and a COMPLETED record is only ever replaced
        by a re-execution, which would answer the same.
        """
        return hit_reply(self.folder(request["name"]), request, self.root)

    def claim(self, request: dict) -> dict:
        """Decide what a submit request does; the caller holds ``lock(name)``.

        Returns ``{"action": ..., "config": ...}``; ``"start"`` comes with ``"previous"``,
        the record of the attempt that ``start_attempt`` will archive (None if none).
        Nothing is changed on disk but the marking of a lost worker.
        """
        name = request["name"]
        try:
            config = self.read_config(name)
        except CorruptRunError as exc:
            if request["mode"] == Mode.GET:
                raise  # a cached run that cannot be read is no hit: the caller is told
            # A new run of the name mends it: the damaged files are kept under
            # attempts/<n>/, as a failed run's are.
            sys.stderr.write(f"remoterun: {exc}\n")
            return {"action": Action.START, "previous": {"attempt": None}}
        if config and config.status == RUNNING and not worker_alive(config):
            config = self._mark_lost(name, config, "its process is gone")
        return decide(config, request)

    def undo_attempt(self, name: str, attempt: int) -> None:
        """Take back a new attempt that could not be recorded (a full disk)."""
        self.folder(name).undo_attempt(attempt)

    def next_attempt(self, name: str, previous: dict | None) -> int:
        """Archive the previous attempt, if any; return the new attempt's number."""
        if previous is None:
            return 1
        return self.folder(name).archive_attempt(previous.get("attempt"))

    # ------------------------------------------------------------------ starting

    def stage(self, request: dict) -> dict[str, tuple[str, str]]:
        """Write a new run's function and inputs to hidden temporary files, before the
        name is claimed: what does not fit on the disk is refused while nothing has
        changed. Returns ``{filename: (temporary path, digest)}`` for ``prepare``."""
        self._make_root()
        staging = os.path.join(self.root, layout.STAGING)
        staged: dict[str, tuple[str, str]] = {}
        try:
            layout.makedirs_private(staging)
            for what, field in (("function", "fn"), ("inputs", "inputs")):
                data = request.get(field)
                if data is None:
                    continue
                tmp = layout.staging_name(os.path.join(staging, f"{request['name']}.{what}"))
                layout.write_atomic(tmp, data)
                staged[what] = (tmp, integrity.digest(data))
        except OSError as exc:
            self.discard(staged)
            raise OSError(
                exc.errno,
                f"the function and arguments of run {request['name']!r} do not fit in "
                f"{self.root} ({layout.storage_message(exc)}); nothing was started",
            ) from exc
        return staged

    @staticmethod
    def discard(staged: dict[str, tuple[str, str]]) -> None:
        for tmp, _ in staged.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def prepare(self, request: dict, attempt: int, staged: dict[str, tuple[str, str]]) -> dict:
        """Put the files of a new run in place (its staged function and inputs, empty
        logs); return its record, which ``start`` writes once the worker is known."""
        name = request["name"]
        folder = self.folder(name)
        folder.create()
        folder.start_logs()
        fields = dict(request.get("record") or {})
        record = RunRecord.new(name, fields.pop("run_type", "function"), attempt, **fields)
        record.update(digests={}, host=HOSTNAME, boot_id=BOOT_ID, executable=sys.executable)
        for what, (tmp, digest) in staged.items():
            folder.adopt(what, tmp)
            folder.note_digest(what, digest, record)
        return record

    def start(
        self,
        request: dict,
        config: dict,
        worker: SpareWorker,
        watch: Callable[[int, ExitCallback], None],
        on_exit: ExitCallback | None = None,
    ) -> None:
        """Record a prepared run RUNNING in ``worker``'s name (a spare of the fork server)
        and hand it the run; its ``done_fd`` becomes readable once the outcome is written.
        ``watch(pid, callback)`` calls back when the worker exits, with its wait status;
        ``on_exit(pid, wait_status)`` runs then too.

        The caller holds ``lock(name)``. The RUNNING record, written here in the warm
        parent, always precedes the worker's outcome: the worker only learns of the run
        after it.
        """
        name = request["name"]
        config = RunRecord(config).running(
            pid=worker.pid,
            pgid=worker.pid,  # the worker's setsid() made it its group's leader
            proc_start=worker.proc_start,
        )
        try:
            self.write_config(name, config)
            worker.hand_over(request)
        except BaseException:
            worker.discard()  # it exits on EOF; the watcher reaps it and marks it lost
            raise
        finally:
            self._watch(name, worker.pid, watch, on_exit)

    def _watch(
        self,
        name: str,
        pid: int,
        watch: Callable[[int, ExitCallback], None],
        on_exit: ExitCallback | None,
    ) -> None:
        """When the worker exits, mark it lost if it left no outcome."""

        def exited(pid: int, status: int) -> None:
            try:
                if not os.path.isdir(self.path(name)):
                    return  # the run's folder (or the root) was removed: nothing to mark
                with self.lock(name):
                    config = self.read_config(name)
                    if config and config.status == RUNNING and config.pid == pid:
                        self._mark_lost(name, config, f"its process {describe_exit(status)}")
            except (OSError, CorruptRunError) as exc:  # a later look marks it, or says why
                sys.stderr.write(f"remoterun: run {name!r} ended, not recorded: {exc}\n")
            finally:
                if on_exit is not None:
                    on_exit(pid, status)

        watch(pid, exited)

    # ------------------------------------------------------------------ cancel

    def cancel(self, name: str, grace: float) -> dict | None:
        """Stop a RUNNING run's process group (SIGTERM, SIGKILL after ``grace`` seconds)
        and record CANCELLED. A terminal run is left as it is."""
        with self.lock(name):
            config = self.read_config(name)
            if config is None or config.terminal:
                return config
            if config.status == RUNNING and worker_alive(config):
                pid = config.pid
                pgid = config.get("pgid", pid)
                if isinstance(pgid, int) and config.host == HOSTNAME:
                    kill_group(pgid, pid, grace)
            config.cancelled()
            self.write_config(name, config)
            return config


def decide(config: RunRecord | None, request: dict) -> dict:
    """What a submit request does to the run whose record is ``config`` (None: there is
    none; a RUNNING one is alive): ``{"action": ..., "config": ...}``, ``"start"`` with
    ``"previous"``, the record of the attempt a start archives. Decides only."""
    if config is None:
        return {"action": Action.START, "previous": None}
    mode = request["mode"]
    if mode == Mode.NEW:
        if request.get("exclusive"):
            return {"action": Action.EXISTS, "config": config}
        if config.status == RUNNING:
            return {"action": Action.BUSY, "config": config}
        return {"action": Action.START, "previous": config}
    status = config.status
    if status in (COMPLETED, RUNNING):
        differences = fingerprint_differences(config, request)
        if differences:
            policy = request.get("on_mismatch", "error")
            if policy == "error":
                return {"action": Action.MISMATCH, "config": config, "differences": differences}
            if policy == "rerun":
                if status == RUNNING:
                    return {"action": Action.BUSY, "config": config}
                return {"action": Action.START, "previous": config}
        return {
            "action": Action.HIT if status == COMPLETED else Action.ATTACH,
            "config": config,
        }
    # FAILED, CANCELLED, NOT_STARTED or unknown: execute again, keeping the attempt.
    return {"action": Action.START, "previous": config}


def hit_reply(folder: RunFolder, request: dict, root: str) -> dict | None:
    """The reply to a ``get`` submit for the run in ``folder`` that is a plain cache hit,
    read without a lock; None when a lock is needed to decide.

    The record is replaced atomically, and a COMPLETED record is only ever replaced by a
    re-execution, which would answer the same.
    """
    if request["mode"] != Mode.GET:
        return None
    try:
        config = folder.read_record()
    except CorruptRunError:
        return None  # the locked path decides what a damaged record means
    if not config or config.status != COMPLETED:
        return None
    if fingerprint_differences(config, request):
        return None
    reply = {"name": folder.name, "action": Action.HIT, "root": root, "config": config}
    if request.get("want_outcome"):
        reply.update(folder.read_outcome(config))
        if folder.read_record() != config:
            return None  # re-executed while we read: let the locked path decide
    return reply


def _remove_stale_staging(staging: str) -> None:
    """Remove staged files whose writer (the pid in their name) is gone."""
    try:
        names = os.listdir(staging)
    except OSError:
        return
    for filename in names:
        pid = filename.rpartition(".")[0].rpartition(".")[2].partition("-")[0]
        if pid.isdigit() and process_start_time(int(pid)) is None:
            try:
                os.unlink(os.path.join(staging, filename))
            except OSError:
                pass
