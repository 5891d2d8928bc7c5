"""The coordinator of a run root on Ray: a detached, named actor that decides the fate of
the root's runs, as a host's agent does for its own.

Every submit, status look and cancel of the root's runs goes through it, one decision at
a time per name (and under the host's file lock too when the root is a shared POSIX
folder, which ``Run.update_record`` takes): racing callers in separate driver processes
get one execution per name. It starts each recorded run as a Ray task with
``max_retries=0`` that it owns, so the run outlives the driver that asked for it, watches
it, and writes its record: RUNNING when it starts, COMPLETED or FAILED from what the task
reports, FAILED with ``worker lost`` when the worker or its node dies, CANCELLED.

A record RUNNING that no live coordinator tracks (the coordinator or the cluster was
restarted) is marked lost at the next look.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from typing import Any, Iterator

from ...agent.protocol import Action, Mode
from ...agent.record import RUNNING, RunRecord
from ...agent.runfolder import Files, RunFolder
from ...agent.store import HostRuns, decide, hit_reply
from ...errors import CorruptRunError
from ...folder import check_run_name
from .options import ray_options


class Coordinator:
    """The decisions about the runs under ``root`` on ``files``."""

    def __init__(self, files: Files, root: str, url: str):
        from . import tasks

        self.files = files
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.id = uuid.uuid4().hex[:12]
        self._host_runs = HostRuns(root) if files.local else None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # name -> (attempt, task reference, done event)
        self._tasks: dict[str, tuple[int, Any, threading.Event]] = {}
        import ray

        self._execute = ray.remote(max_retries=0)(tasks.execute)

    def ping(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "root": self.url}

    def folder(self, name: str) -> RunFolder:
        return RunFolder(self.files, f"{self.root}/{check_run_name(name)}", name)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if self._host_runs is not None:
                with self._host_runs.lock(name):
                    yield
            else:
                yield

    # ------------------------------------------------------------------ ops

    def submit(self, request: dict) -> dict:
        name = request["name"]
        folder = self.folder(name)
        hit = hit_reply(folder, request, self.root)
        if hit is not None:
            return hit
        done = None
        started: RunRecord | None = None
        with self.lock(name):
            try:
                decision = decide(self._alive(folder, folder.read_record()), request)
            except CorruptRunError:
                if request["mode"] == Mode.GET:
                    raise  # a cached run that cannot be read is no hit: the caller is told
                # A new run of the name mends it, keeping the damaged files as an attempt.
                decision = {"action": Action.START, "previous": {"attempt": None}}
            action = decision["action"]
            if action == Action.START and request.get("payload_omitted"):
                return {"name": name, "action": Action.NEED_PAYLOAD, "root": self.root}
            if action == Action.START:
                options = ray_options(request.get("resources"))  # a bad one: nothing moved
                previous = decision.get("previous")
                attempt = 1 if previous is None else folder.archive_attempt(previous.get("attempt"))
                try:
                    done, started = self._start(folder, request, attempt, options)
                except BaseException:
                    self._undo(folder, attempt)
                    raise
        if done is not None and request.get("wait"):
            done.wait()
        reply: dict[str, Any] = {"name": name, "action": action, "root": self.root}
        if action in (Action.MISMATCH, Action.EXISTS, Action.BUSY):
            reply["differences"] = decision.get("differences", [])
        if action != Action.START:
            config = decision.get("config")
        elif done is not None and done.is_set():
            config = folder.read_record()  # it has ended already (waited for)
        else:
            config = started
        reply["config"] = config
        if request.get("want_outcome") and config is not None and config.terminal:
            reply.update(folder.read_outcome(config))
        return reply

    def status(self, name: str, want_outcome: bool = False) -> dict:
        folder = self.folder(name)
        config = folder.read_record()
        if config is not None and config.status == RUNNING and not self._tracked(name, config):
            with self.lock(name):
                config = self._alive(folder, folder.read_record())
        reply: dict[str, Any] = {"config": config}
        if want_outcome and config is not None and config.terminal:
            reply.update(folder.read_outcome(config))
        return reply

    def wait_for_end(self, name: str, timeout: float) -> str:
        """Wait up to ``timeout`` seconds for the run ``name`` that this coordinator runs
        to have its end recorded: ``"ended"``, ``"running"`` (the time is up), or
        ``"untracked"`` (no task of this coordinator runs it: nothing to wait for)."""
        tracked = self._tasks.get(name)
        if tracked is None:
            return "untracked"
        return "ended" if tracked[2].wait(timeout) else "running"

    def cancel(self, name: str) -> dict | None:
        folder = self.folder(name)
        with self.lock(name):
            config = self._alive(folder, folder.read_record())
            if config is None or config.terminal:
                return config
            tracked = self._tasks.get(name)
            config.cancelled()
            folder.write_record(config)
            if tracked is not None:  # under the lock: no new attempt starts before it
                import ray

                try:
                    ray.cancel(tracked[1], force=True)
                except Exception:  # noqa: BLE001 - already finished: it says CANCELLED
                    pass
        if tracked is not None:
            tracked[2].wait(10)  # its watcher has seen it end
        return config

    # ------------------------------------------------------------------ runs

    def _tracked(self, name: str, config: RunRecord) -> bool:
        tracked = self._tasks.get(name)
        return (
            tracked is not None
            and tracked[0] == config.attempt
            and config.get("coordinator") == self.id
        )

    def _alive(self, folder: RunFolder, config: RunRecord | None) -> RunRecord | None:
        """``config``, marked FAILED (worker lost) when it says RUNNING and no task of this
        coordinator runs it. The caller holds the lock."""
        if config is None or config.status != RUNNING or self._tracked(folder.name, config):
            return config
        # Not tracked: its watcher records an end before it lets a run go, so no task of
        # this coordinator runs it (and another coordinator's run was cut off with it).
        config.lost("no Ray task runs it any more (its coordinator or cluster restarted)")
        folder.write_record(config)
        return config

    def _undo(self, folder: RunFolder, attempt: int) -> None:
        """Take back an attempt that could not be started: stop its task if it has one,
        move the previous attempt back."""
        tracked = self._tasks.pop(folder.name, None)
        if tracked is not None:
            import ray

            try:
                ray.cancel(tracked[1], force=True)
            except Exception:  # noqa: BLE001 - it never ran
                pass
            tracked[2].set()
        try:
            folder.undo_attempt(attempt)
        except OSError:
            pass  # the record, if any, says what is there

    def _start(
        self, folder: RunFolder, request: dict, attempt: int, options: dict
    ) -> tuple[threading.Event, RunRecord]:
        """Start the new attempt's task, write its files and RUNNING record while it
        starts, and watch it. The task gets the function and inputs from here, not from
        the folder; it writes only its logs and outcome, and the record of its end is
        written after the RUNNING one (by the watcher, under the same lock)."""
        folder.create()
        ref = self._launch(folder, request, options)
        done = threading.Event()
        self._tasks[folder.name] = (attempt, ref, done)
        fields = dict(request.get("record") or {})
        record = RunRecord.new(folder.name, fields.pop("run_type", "function"), attempt, **fields)
        record.update(digests={}, host="ray", coordinator=self.id)
        if request.get("fn") is not None:
            folder.write_pickle("function", request["fn"], record)
        if request.get("inputs") is not None:
            folder.write_pickle("inputs", request["inputs"], record)
        record.running(pid=None)  # the task makes its logs (an absent log reads as empty)
        folder.write_record(record)
        threading.Thread(target=self._watch, args=(folder, attempt, ref, done), daemon=True).start()
        return done, RunRecord(record)

    def _launch(self, folder: RunFolder, request: dict, options: dict) -> Any:
        """Submit the run's task with its Ray options."""
        fn_name = (request.get("record") or {}).get("fn_name") or "the function"
        execute = self._execute.options(**options) if options else self._execute
        return execute.remote(
            folder,
            request.get("fn"),
            request.get("inputs"),
            fn_name,
            bool(request.get("run_args")),
            f"{self.url}/{folder.name}",
        )

    def _watch(self, folder: RunFolder, attempt: int, ref: Any, done: threading.Event) -> None:
        import ray
        from ray import exceptions

        try:
            try:
                outcome: dict | None = ray.get(ref)
                lost = None
            except exceptions.TaskCancelledError:
                return  # cancel() recorded it
            except (exceptions.WorkerCrashedError, exceptions.NodeDiedError) as exc:
                outcome, lost = None, f"its Ray worker died ({type(exc).__name__})"
            except exceptions.RayError as exc:
                outcome, lost = None, f"its Ray task failed ({type(exc).__name__}: {exc})"
            for tries in range(5):  # a store's hiccup must not leave it RUNNING
                try:
                    self._record_end(folder, attempt, outcome, lost)
                    break
                except Exception:  # noqa: BLE001 - tried again; the last one is logged
                    if tries == 4:
                        import traceback

                        traceback.print_exc()
                    time.sleep(0.2 * (tries + 1))
        finally:
            current = self._tasks.get(folder.name)
            if current is not None and current[1] is ref:
                del self._tasks[folder.name]
            done.set()

    def _record_end(
        self, folder: RunFolder, attempt: int, outcome: dict | None, lost: str | None
    ) -> None:
        with self.lock(folder.name):
            config = folder.read_record()
            if config is None or config.status != RUNNING or config.attempt != attempt:
                return
            if outcome is None:
                config.lost(lost or "unknown")
            else:
                config.setdefault("digests", {}).update(outcome.get("digests") or {})
                if outcome["status"] == "COMPLETED":
                    config.completed()
                else:
                    config.failed(outcome["message"], outcome["type"], outcome["traceback"])
            folder.write_record(config)
