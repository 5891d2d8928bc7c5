"""Executes calls and commands on this host and keeps its run folders.

Everything that decides the fate of a run folder happens here, on the host that holds it,
under a per-name ``flock``: whether a cached run is a hit, which attempt is archived, who
starts the one execution when many clients ask at once, whether a RUNNING run's worker is
still alive. The client sends one request and gets one answer.

Recorded runs are forked (by the agent's fork server, a process that no user code has
touched: see ``forkserver.py``) into a session and process group of their own
(``setsid``), so they outlive the agent, the SSH connection and the client; the forked
worker writes its outcome into the folder itself, ``config.json`` last.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Iterator

import cloudpickle

from ..errors import CorruptRunError
from . import integrity, layout, pickling, protocol
from .fingerprints import fingerprint_differences

if TYPE_CHECKING:
    from .forkserver import SpareWorker

HOSTNAME = socket.gethostname()
# The error type recorded for a return value that cannot be pickled; the client raises
# remoterun.errors.SerializationError for it.
SERIALIZATION_ERROR = "remoterun.errors.SerializationError"
# ... and for an outcome that could not be written (a full disk): RunStorageError.
STORAGE_ERROR = "remoterun.errors.RunStorageError"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()
# How long a status check waits for a dead worker's reaper before marking it lost itself.
_REAPER_GRACE = 0.5


# --------------------------------------------------------------------------- processes


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone.

    Together with the pid this names one process: a reused pid has another start time.
    A zombie counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:  # no /proc: all we can tell is whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def worker_alive(config: dict) -> bool:
    """Whether the process recorded in a RUNNING run's config still runs.

    A run recorded on another host cannot be checked from here and counts as alive.
    """
    if config.get("host") != HOSTNAME:
        return True
    if config.get("boot_id") and BOOT_ID and config["boot_id"] != BOOT_ID:
        return False
    pid = config.get("pid")
    if not isinstance(pid, int):
        return True  # claimed, worker not yet recorded
    started = process_start_time(pid)
    return started is not None and started == config.get("proc_start", started)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


# --------------------------------------------------------------------------- errors


def error_record(exc: BaseException, skip_frames: int = 0) -> dict[str, Any]:
    """What is known of an exception, as plain data, plus its pickle when it round-trips.

    ``skip_frames`` leaves out the innermost-caller frames of remoterun's own code.
    """
    for _ in range(skip_frames):
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            exc.__traceback__ = exc.__traceback__.tb_next
    exc_type = type(exc)
    record: dict[str, Any] = {
        "type": f"{exc_type.__module__}.{exc_type.__qualname__}",
        "message": f"{exc_type.__qualname__}: {exc}" if str(exc) else exc_type.__qualname__,
        "traceback": "".join(traceback.format_exception(exc)),
        "exc": None,
    }
    try:
        data = pickling.dumps(exc)
        cloudpickle.loads(data)
        record["exc"] = data
    except Exception:
        pass
    return record


# --------------------------------------------------------------------------- the runs root


# Run roots this process has made sure are private (one chmod per root and process).
_private_roots: set[str] = set()


class HostRuns:
    """The run folders under one root on this host's own disk."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def path(self, name: str) -> str:
        return os.path.join(self.root, layout.check_run_name(name))

    def file(self, name: str, filename: str) -> str:
        return os.path.join(self.root, name, filename)

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

    def read_config(self, name: str) -> dict | None:
        """The run's record, None when there is none; raises CorruptRunError for a
        ``config.json`` that is not one."""
        try:
            with open(self.file(name, layout.CONFIG), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return layout.decode_record(data)
        except layout.CorruptRecord as exc:
            raise CorruptRunError(
                layout.corrupt_message(name, self.path(name), str(exc)),
                url=self.path(name),
                filename=layout.CONFIG,
            ) from None

    def write_config(self, name: str, config: dict) -> None:
        layout.write_atomic(self.file(name, layout.CONFIG), layout.encode_record(config))

    def write_pickle(self, name: str, filename: str, data: bytes, config: dict) -> None:
        """Write one of the run's pickles and note its digest in ``config`` (which the
        caller writes after it)."""
        layout.write_atomic(self.file(name, filename), data)
        config.setdefault(integrity.DIGESTS, {})[filename] = integrity.digest(data)

    def read_file(self, name: str, filename: str) -> bytes | None:
        try:
            with open(self.file(name, filename), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

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
        if config and config.get("status") == layout.RUNNING and not worker_alive(config):
            # The agent that forked the worker, if it still lives, is recording how it
            # ended (the signal, the exit code): give it a moment to say so first.
            deadline = time.monotonic() + _REAPER_GRACE
            while time.monotonic() < deadline:
                time.sleep(0.01)
                config = self.read_config(name)
                if not config or config.get("status") != layout.RUNNING:
                    return config
            with self.lock(name):
                config = self.read_config(name)
                if config and config.get("status") == layout.RUNNING and not worker_alive(config):
                    config = self._mark_lost(name, config, "its process is gone")
        return config

    def _mark_lost(self, name: str, config: dict, why: str) -> dict:
        """Record a run whose worker is gone as FAILED, after killing what the worker left
        running in its process group. When the record cannot be written (a full disk),
        the FAILED record is returned all the same, and written at a later look."""
        kill_leftovers(config)
        config.update(
            status=layout.FAILED,
            end_time=layout.utc_now(),
            error=f"{layout.WORKER_LOST}: {why}",
            error_type="remoterun.errors.WorkerLostError",
            error_traceback="",
        )
        try:
            self.write_config(name, config)
        except OSError as exc:
            config["error"] += f" (not recorded on disk: {layout.storage_message(exc)})"
        return config

    def outcome(self, name: str, config: dict, folder: str | None = None) -> dict:
        """A terminal run's ``result`` or ``error_pickle`` bytes, for a reply; read from
        ``folder`` (an archived attempt's) instead of the run's own when given."""
        folder = folder or self.path(name)
        filename = layout.RESULT if config.get("status") == layout.COMPLETED else layout.ERROR
        try:
            with open(os.path.join(folder, filename), "rb") as f:
                data: bytes | None = f.read()
        except FileNotFoundError:
            data = None
        return {"result": data} if filename == layout.RESULT else {"error_pickle": data}

    def with_outcome(self, name: str, config: dict | None) -> dict:
        """``{"config": config}`` plus, for a terminal run, the outcome of that very attempt.

        When the name was executed again between the reads, the attempt's files have been
        archived (a re-execution moves them under the lock before it writes anything):
        they are read from there, so config and outcome always belong together.
        """
        reply: dict[str, Any] = {"config": config}
        if not config or config.get("status") not in layout.TERMINAL:
            return reply
        reply.update(self.outcome(name, config))
        if self.read_config(name) == config:
            return reply
        with self.lock(name):
            if self.read_config(name) == config:
                return {"config": config, **self.outcome(name, config)}
            folder = self._archived(name, config)
            if folder is not None:
                return {"config": config, **self.outcome(name, config, folder)}
            config = self.read_config(name)  # gone altogether: say what is there now
            reply = {"config": config}
            if config and config.get("status") in layout.TERMINAL:
                reply.update(self.outcome(name, config))
        return reply

    def _archived(self, name: str, config: dict) -> str | None:
        """The ``attempts/<n>/`` folder holding the attempt whose record is ``config``."""
        attempts = os.path.join(self.path(name), layout.ATTEMPTS)
        numbers = [str(config.get("attempt") or 1)]
        try:
            numbers += sorted((d for d in os.listdir(attempts) if d.isdigit()), key=int)
        except FileNotFoundError:
            return None
        for number in numbers:
            folder = os.path.join(attempts, number)
            try:
                with open(os.path.join(folder, layout.CONFIG), "rb") as f:
                    if layout.decode_record(f.read()) == config:
                        return folder
            except (FileNotFoundError, ValueError):
                continue
        return None

    # ------------------------------------------------------------------ claims

    def cached_hit(self, request: dict) -> dict | None:
        """The reply to a ``get`` submit that is a plain cache hit, without taking the lock;
        None when the lock is needed to decide.

        config.json is replaced atomically, and a COMPLETED record is only ever replaced
        by a re-execution, which would answer the same.
        """
        if request["mode"] != "get":
            return None
        name = request["name"]
        try:
            config = self.read_config(name)
        except CorruptRunError:
            return None  # the locked path decides what a damaged record means
        if not config or config.get("status") != layout.COMPLETED:
            return None
        if fingerprint_differences(config, request):
            return None
        reply = {"name": name, "action": "hit", "root": self.root, "config": config}
        if request.get("want_outcome"):
            reply.update(self.outcome(name, config))
            if self.read_config(name) != config:
                return None  # re-executed while we read: let the locked path decide
        return reply

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
            # A damaged record is no run to keep: executing the name again keeps its
            # files under attempts/<n>/, as for a failed run.
            sys.stderr.write(f"remoterun: {exc}\n")
            return {"action": "start", "previous": {"attempt": None}}
        if config and config.get("status") == layout.RUNNING and not worker_alive(config):
            config = self._mark_lost(name, config, "its process is gone")
        if config is None:
            return {"action": "start", "previous": None}
        mode = request["mode"]
        if mode == "new":
            if request.get("exclusive"):
                return {"action": "exists", "config": config}
            if config.get("status") == layout.RUNNING:
                return {"action": "busy", "config": config}
            return {"action": "start", "previous": config}
        status = config.get("status")
        if status in (layout.COMPLETED, layout.RUNNING):
            differences = fingerprint_differences(config, request)
            if differences:
                policy = request.get("on_mismatch", "error")
                if policy == "error":
                    return {"action": "mismatch", "config": config, "differences": differences}
                if policy == "rerun":
                    if status == layout.RUNNING:
                        return {"action": "busy", "config": config}
                    return {"action": "start", "previous": config}
            return {"action": "hit" if status == layout.COMPLETED else "attach", "config": config}
        # FAILED, CANCELLED, NOT_STARTED or unknown: execute again, keeping the attempt.
        return {"action": "start", "previous": config}

    def undo_attempt(self, name: str, attempt: int) -> None:
        """Take back a new attempt that could not be recorded (a full disk): remove what
        it put in the folder and move the previous attempt, archived for it, back."""
        folder = self.path(name)
        for filename in layout.ATTEMPT_FILES:
            try:
                os.unlink(os.path.join(folder, filename))
            except OSError:
                pass
        archived = os.path.join(folder, layout.ATTEMPTS, str(attempt - 1))
        if attempt > 1 and os.path.isdir(archived):
            for filename in os.listdir(archived):
                os.replace(os.path.join(archived, filename), os.path.join(folder, filename))
            os.rmdir(archived)
        for empty in (os.path.join(folder, layout.ATTEMPTS), folder):
            try:
                os.rmdir(empty)
            except OSError:
                pass

    def next_attempt(self, name: str, previous: dict | None) -> int:
        """Archive the previous attempt, if any; return the new attempt's number."""
        return 1 if previous is None else self._archive(name, previous)

    def _archive(self, name: str, config: dict) -> int:
        """Move the files of the current attempt to ``attempts/<n>/``; return the next n."""
        attempts = os.path.join(self.path(name), layout.ATTEMPTS)
        number = int(config.get("attempt") or 1)
        layout.makedirs_private(attempts)
        taken = {int(d) for d in os.listdir(attempts) if d.isdigit()}
        while number in taken:
            number = max(taken) + 1
        target = os.path.join(attempts, str(number))
        os.mkdir(target, layout.FOLDER_MODE)
        # config.json first: a folder without config reads as "no run" rather than as
        # a half-moved attempt that still claims its old status.
        for filename in layout.ATTEMPT_FILES:
            src = self.file(name, filename)
            if os.path.exists(src):
                os.replace(src, os.path.join(target, filename))
        return number + 1

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
            for filename, field in ((layout.FUNCTION, "fn"), (layout.INPUTS, "inputs")):
                data = request.get(field)
                if data is None:
                    continue
                tmp = layout.staging_name(os.path.join(staging, f"{request['name']}.{filename}"))
                layout.write_atomic(tmp, data)
                staged[filename] = (tmp, integrity.digest(data))
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
        layout.makedirs_private(self.path(name))
        for filename in (layout.STDOUT, layout.STDERR):
            os.close(layout.open_private(self.file(name, filename), os.O_WRONLY | os.O_TRUNC))
        digests = {}
        for filename, (tmp, digest) in staged.items():
            os.replace(tmp, self.file(name, filename))
            digests[filename] = digest
        config = dict(request.get("record") or {})
        config[integrity.DIGESTS] = digests
        config.update(
            name=name,
            status=layout.NOT_STARTED,
            attempt=attempt,
            host=HOSTNAME,
            boot_id=BOOT_ID,
            python=sys.version.split()[0],
            executable=sys.executable,
        )
        for key in ("start_time", "end_time", "error", "error_traceback", "pid"):
            config.setdefault(key, None)
        for key in ("upstream", "downstream"):
            config.setdefault(key, [])
        for key in ("tags", "metrics"):
            config.setdefault(key, {})
        return config

    def start(
        self, request: dict, config: dict, on_exit: Callable[[int, int], None] | None = None
    ) -> SpareWorker:
        """Record a prepared run RUNNING in a spare worker's name and hand it the run;
        return the worker (its ``done_fd`` becomes readable once the outcome is written).
        ``on_exit(pid, wait_status)`` runs when it exits.

        The caller holds ``lock(name)``. The RUNNING record, written here in the warm
        parent, always precedes the worker's outcome: the worker only learns of the run
        after it.
        """
        from .forkserver import take_spare

        name = request["name"]
        worker = take_spare()
        config = dict(config)
        config.update(
            status=layout.RUNNING,
            start_time=layout.utc_now(),
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
            self._watch(name, worker.pid, on_exit)
        return worker

    def _watch(self, name: str, pid: int, on_exit: Callable[[int, int], None] | None) -> None:
        """When the worker exits, mark it lost if it left no outcome."""
        from .forkserver import server

        def exited(pid: int, status: int) -> None:
            try:
                with self.lock(name):
                    config = self.read_config(name)
                    if (
                        config
                        and config.get("status") == layout.RUNNING
                        and config.get("pid") == pid
                    ):
                        self._mark_lost(name, config, f"its process {_describe_exit(status)}")
            except (OSError, CorruptRunError) as exc:  # a later look marks it, or says why
                sys.stderr.write(f"remoterun: run {name!r} ended, not recorded: {exc}\n")
            finally:
                if on_exit is not None:
                    on_exit(pid, status)

        server().watch(pid, exited)

    # ------------------------------------------------------------------ cancel

    def cancel(self, name: str, grace: float) -> dict | None:
        """Stop a RUNNING run's process group (SIGTERM, SIGKILL after ``grace`` seconds)
        and record CANCELLED. A terminal run is left as it is."""
        with self.lock(name):
            config = self.read_config(name)
            if config is None or config.get("status") in layout.TERMINAL:
                return config
            if config.get("status") == layout.RUNNING and worker_alive(config):
                pid = config.get("pid")
                pgid = config.get("pgid", pid)
                if isinstance(pgid, int) and config.get("host") == HOSTNAME:
                    _kill_group(pgid, pid, grace)
            config.update(
                status=layout.CANCELLED,
                end_time=layout.utc_now(),
                error="cancelled",
                error_type="remoterun.errors.RunCancelledError",
            )
            self.write_config(name, config)
            return config


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


def kill_leftovers(config: dict) -> None:
    """SIGKILL what a lost worker left running, before its run is marked lost (else a
    re-execution would run beside them). The worker made itself a session leader, so
    everything it started carries its pid as session id, unless it called setsid itself;
    only processes started after the worker count, so a recycled pid is never hit."""
    sid = config.get("pgid")
    started = config.get("proc_start")
    if not isinstance(sid, int) or sid <= 1 or not started or config.get("host") != HOSTNAME:
        return
    if config.get("boot_id") and BOOT_ID and config["boot_id"] != BOOT_ID:
        return  # recorded before this machine restarted: nothing of it lives
    leader = process_start_time(sid)
    if leader is not None and leader != started:
        # The pid is another process's now: Linux reuses a pid only once no process
        # has it as session id, so nothing of the worker's session is left.
        return
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc to tell the session's members by: leave them
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[3]) == sid and int(fields[19]) >= started:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _kill_group(pgid: int, pid: int, grace: float) -> None:
    """SIGTERM the run's process group, SIGKILL what is left after ``grace`` seconds.

    The worker leads its own session and a session leader cannot change its group, so
    the group is gone only once the worker and everything it started are.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            break
        time.sleep(0.01)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- the worker


def _spare_main(req_r: int, done_w: int) -> int:
    """Body of a spare worker: wait for a run, then run it. Returns the exit code."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    # Keep nothing of the agent's: its protocol pipes or SSH channel must see EOF when
    # the agent exits, whatever this worker does.
    keep = {0, 1, 2, req_r, done_w}
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    try:
        _, _, payload = protocol.read_frame(protocol.exact_reader(lambda n: os.read(req_r, n)))
    except EOFError:
        return 0  # no run came: the agent exited or let this spare go
    os.close(req_r)
    request = protocol.loads(payload)
    code = _run(HostRuns(request["root"]), request)
    try:
        os.write(done_w, b"1")  # the outcome is on disk
    except OSError:
        pass  # nobody waits for it
    return code


def _run(runs: HostRuns, request: dict) -> int:
    """Execute a recorded run in this (worker) process and write its outcome."""
    name = request["name"]
    for fd, filename in ((1, layout.STDOUT), (2, layout.STDERR)):
        log = layout.open_private(runs.file(name, filename), os.O_WRONLY | os.O_APPEND)
        os.dup2(log, fd)
        os.close(log)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ["REMOTERUN_RUN_DIR"] = runs.path(name)
    os.environ["REMOTERUN_RUN_NAME"] = name

    pid = os.getpid()
    fn_name = (request.get("record") or {}).get("fn_name") or "the function"

    result_bytes: bytes | None = None
    error: dict | None = None
    try:
        fn = cloudpickle.loads(request["fn"])
        inputs = cloudpickle.loads(request["inputs"]) if request.get("inputs") else {}
        if request.get("run_args"):
            inputs = layout.resolve_run_arguments(inputs)
        value = fn(*inputs.get("args", ()), **inputs.get("kwargs", {}))
        try:
            result_bytes = pickling.dumps(value)
        except Exception as exc:
            error = {
                "type": SERIALIZATION_ERROR,
                "message": f"the return value of {fn_name} "
                f"cannot be pickled ({type(value).__name__}): {exc}",
                "traceback": "",
                "exc": None,
            }
    except BaseException as exc:  # SystemExit and KeyboardInterrupt fail the run too
        error = error_record(exc, skip_frames=1)
        sys.stderr.write(error["traceback"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

    with runs.lock(name):
        config = runs.read_config(name) or {}
        if config.get("status") != layout.RUNNING or config.get("pid") != pid:
            return 0  # cancelled meanwhile: its outcome is already written
        try:
            if error is None:
                runs.write_pickle(name, layout.RESULT, result_bytes or b"", config)
                config.update(status=layout.COMPLETED, error=None, error_traceback=None)
            else:
                if error["exc"] is not None:
                    runs.write_pickle(name, layout.ERROR, error["exc"], config)
                config.update(
                    status=layout.FAILED,
                    error=error["message"],
                    error_type=error["type"],
                    error_traceback=error["traceback"],
                )
            config["end_time"] = layout.utc_now()
            runs.write_config(name, config)
        except OSError as exc:
            # The outcome or the record did not fit (a full disk): free what this attempt
            # wrote and record why it failed, which a small record can still say.
            error = _storage_failure(runs, name, config, exc)
    return 0 if error is None else 1


def _storage_failure(runs: HostRuns, name: str, config: dict, exc: OSError) -> dict:
    """Record a run whose outcome could not be written as FAILED, saying why and where."""
    for filename in (layout.RESULT, layout.ERROR):
        try:
            os.unlink(runs.file(name, filename))
        except OSError:
            pass
        (config.get(integrity.DIGESTS) or {}).pop(filename, None)
    message = f"the outcome could not be written: {layout.storage_message(exc)}"
    sys.stderr.write(f"remoterun: {message}\n")
    config.update(
        status=layout.FAILED,
        end_time=layout.utc_now(),
        error=message,
        error_type=STORAGE_ERROR,
        error_traceback="",
    )
    runs.write_config(name, config)  # if even this fails, the reaper marks the run lost
    return {"message": message}


def _open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


# --------------------------------------------------------------------------- commands


def run_commands(cmds: list[str], python_lines: bool = False) -> list[tuple[int, str, str]]:
    """Run shell commands one after the other (or one Python program made of lines).

    Each command's output is streamed to this process's stdout and stderr as it comes and
    also returned: ``[(returncode, stdout, stderr), ...]``.
    """
    if python_lines:
        cmds_to_run: list[list[str] | str] = [[sys.executable, "-c", "\n".join(cmds)]]
    else:
        cmds_to_run = list(cmds)
    return [_run_command(cmd) for cmd in cmds_to_run]


def _run_command(cmd: list[str] | str) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        cmd,
        shell=isinstance(cmd, str),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    captured: dict[int, bytes] = {}
    threads = [
        threading.Thread(target=_tee_pipe, args=(proc.stdout, sys.stdout.buffer, captured, 1)),
        threading.Thread(target=_tee_pipe, args=(proc.stderr, sys.stderr.buffer, captured, 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    returncode = proc.wait()
    return (
        returncode,
        captured[1].decode(errors="replace"),
        captured[2].decode(errors="replace"),
    )


def _tee_pipe(pipe: Any, sink: Any, captured: dict[int, bytes], key: int) -> None:
    """Copy a child's output to ``sink`` as it comes, and keep it in ``captured[key]``."""
    parts = []
    for chunk in iter(lambda: pipe.read1(65536), b""):
        parts.append(chunk)
        sink.write(chunk)
        sink.flush()
    captured[key] = b"".join(parts)
