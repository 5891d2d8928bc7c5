"""``rr.ray()``: a Ray cluster as a remoterun System.

remoterun does not schedule here: it dispatches to Ray. Synchronous calls and ``map``
chunks are Ray tasks (``tasks.py``), the function shipped once per driver as a Ray object
and cached in each worker. Recorded runs go through the root's coordinator, a detached
named actor (``coordinator.py``) that owns their tasks, so they outlive the driver and a
later process finds them by name. Run folders live under ``runs``, a root every node and
the client reach (an ``s3://`` prefix or a shared folder): reading a run, a cache hit
included, needs neither Ray nor the cluster.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from typing import Any, ContextManager

from ... import aio
from ...agent.protocol import STDERR, STDOUT, Action, Failure, Op
from ...agent.runfolder import Files, RunFolder
from ...agent.store import hit_reply
from ...errors import (
    MissingExtraError,
    RemoterunError,
    SystemUnavailableError,
    exception_from_record,
)
from ...folder import files_of
from ...registry import share_list
from ..base import System
from ..connection import AgentConnection, OutputHandler
from .options import ray_options

NAMESPACE = "remoterun"
# Functions pickled smaller than this travel with each call; larger ones once, by
# reference (workers keep them unpickled, by key, either way).
_INLINE_FUNCTION = 64 << 10
# A synchronous call's output is printed as it comes once the call has run this long.
_LIVE_AFTER = 0.1
# How often a RUNNING run's liveness is asked of the coordinator while it is read.
_LIVENESS_EVERY = 1.0
_OUTPUT_KINDS = {"stdout": STDOUT, "stderr": STDERR}


def _ray(address: str | None = None) -> Any:
    if address is None or address.split("://")[-1].startswith(("127.", "localhost")):
        # Read when Ray is imported: without it Ray swaps a loopback address for the
        # machine's interface address, where a cluster kept on loopback is not.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(
            f"Ray systems need Ray: pip install 'remoterun[ray]' ({exc})"
        ) from exc
    return ray


class RaySystem(System):
    """Functions on a Ray cluster; run folders under ``runs``.

    Args:
        address: what ``ray.init(address=...)`` takes (``"auto"``, ``"127.0.0.1:6379"``,
            ``"ray://host:10001"``); None starts a local Ray for trying it out.
        runs: the run root that the client and every node reach: an ``s3://`` prefix or
            a shared folder (a local path for a one-machine cluster). Default
            ``$REMOTERUN_HOME/ray-runs``.
        runtime_env: Ray's runtime environment for the tasks (``ray.init``'s).
        storage_options: for the fsspec filesystem of ``runs`` (S3 credentials, endpoint).
        resources: the default resources of every task (``num_cpus``, ``num_gpus``,
            ``memory``, ``custom``); a function's own ``resources=`` take precedence.
    """

    executes = True
    #: The client and every node read the same run root (lineage resolves paths in it).
    root_is_shared = True

    def __init__(
        self,
        address: str | None = None,
        *,
        runs: str | None = None,
        runtime_env: dict | None = None,
        storage_options: dict | None = None,
        resources: dict | None = None,
        share: Any = None,
        name: str | None = None,
    ):
        from ..local import default_home

        self.address = address
        self.runs = runs or os.path.join(default_home(), "ray-runs")
        self.runtime_env = runtime_env
        self.storage_options = dict(storage_options or {})
        self.resources = dict(resources or {})
        self.share = share_list(share)
        self.name = name or f"ray({address or 'local'})"
        import fsspec

        self._fs, path = fsspec.core.url_to_fs(self.runs, **self.storage_options)
        self._root = path.rstrip("/") or "/"
        self._url = self._fs.unstrip_protocol(self._root)
        self._lock = threading.Lock()
        self._coordinator: Any = None
        self._functions: dict[str, Any] = {}  # fn_key -> Ray object of its pickle
        self._checked: dict[str, float] = {}  # run name -> when the coordinator last said

    def __reduce__(self) -> tuple:
        options = dict(
            runs=self.runs,
            runtime_env=self.runtime_env,
            storage_options=self.storage_options,
            resources=self.resources,
            share=self.share,
            name=self.name,
        )
        return (_rebuild, (self.address, options))

    def __repr__(self) -> str:
        return f"<RaySystem {self.name!r} runs={self._url!r}>"

    # ------------------------------------------------------------------ primitives

    @property
    def root(self) -> str:
        return self._root

    def filesystem(self) -> Any:
        return self._fs

    def files(self) -> Files:
        return files_of(self._fs)

    def host_label(self) -> str:
        return self.name

    def parallelism(self) -> int:
        ray = self._connect()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def reads_locally(self, folder: RunFolder) -> bool:
        # A worker reads a run passed by reference from a shared folder of the root.
        return folder.local and self.files().local and folder.path.startswith(self._root + "/")

    def _connection(self) -> ContextManager[AgentConnection]:
        raise SystemUnavailableError(f"{self.name} has no agent connections: it speaks Ray")

    def _connect(self) -> Any:
        """Ray, connected to the cluster (once per process: Ray's own rule)."""
        ray = _ray(self.address)
        if not ray.is_initialized():
            with self._lock:
                if not ray.is_initialized():
                    options: dict[str, Any] = {}
                    if self.address is None:  # a Ray of this process: on loopback only
                        options.update(_node_ip_address="127.0.0.1", include_dashboard=False)
                    try:
                        ray.init(
                            # None would join $RAY_ADDRESS or the last cluster started here
                            address=self.address or "local",
                            namespace=NAMESPACE,
                            runtime_env=self.runtime_env,
                            log_to_driver=False,
                            logging_level="ERROR",
                            ignore_reinit_error=True,
                            **options,
                        )
                    except Exception as exc:  # ConnectionError, auth, a bad address
                        raise SystemUnavailableError(
                            f"cannot connect to Ray at {self.address or 'a new local Ray'}: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
        return ray

    def coordinator(self) -> Any:
        """The root's coordinator actor: found by name, or started, detached."""
        if self._coordinator is None:
            ray = self._connect()
            with self._lock:
                if self._coordinator is None:
                    from .coordinator import Coordinator

                    key = hashlib.sha256(self._url.encode()).hexdigest()[:16]
                    actor = ray.remote(Coordinator).options(
                        name=f"remoterun-runs-{key}",
                        namespace=NAMESPACE,
                        lifetime="detached",
                        get_if_exists=True,
                        max_restarts=0,
                        max_task_retries=0,
                        max_concurrency=256,
                        num_cpus=0,
                        # On the head node: Ray stops the tasks of an owner that dies,
                        # so the coordinator lives where the cluster itself does.
                        resources={"node:__internal_head__": 0.001},
                    )
                    self._coordinator = actor.remote(self.files(), self._root, self._url)
        return self._coordinator

    # ------------------------------------------------------------------ calls

    def _task_options(self, op: dict) -> dict:
        resources = {**self.resources, **(op.get("resources") or {})}
        return {"max_retries": 0, **ray_options(resources)}

    def _function_holder(self, op: dict, fn_bytes: bytes) -> list:
        """The function for a task, as a one-item list (so that Ray does not fetch it
        before the worker knows it needs it): a Ray object put once per function."""
        key = op["fn_key"]
        if len(fn_bytes) <= _INLINE_FUNCTION:
            # Small: sent with each call (a reference inside the arguments costs Ray a
            # borrower's bookkeeping per call, more than a few KB of bytes).
            return [fn_bytes]
        ref = self._functions.get(key)
        if ref is None:
            ref = self._connect().put(fn_bytes)
            if len(self._functions) > 256:
                self._functions.pop(next(iter(self._functions)))
            self._functions[key] = ref
        return [ref]

    def call(
        self, op: dict, fn_bytes: bytes, on_output: OutputHandler | None = None
    ) -> tuple[dict | None, str, BaseException | None]:
        ray = self._connect()
        from . import tasks

        holder = self._function_holder(op, fn_bytes)
        options = self._task_options(op)
        live = None
        if op["op"] == Op.MAP:
            task = _remote(ray, "map_chunk", tasks.map_chunk, options)
            ref = task.remote(op["fn_key"], holder, op["items"])
        else:
            task = _remote(ray, "call", tasks.call, options)
            live = self._live_folder() if on_output is not None else None
            # Large arguments left out of the inputs' pickle: Ray pickles task arguments
            # itself, and memoryviews cannot be pickled.
            buffers = [bytes(b) for b in op.get("buffers", ())] or None
            ref = task.remote(
                op["fn_key"], holder, op["inputs"], bool(op.get("run_args")), live, buffers
            )
        # A cancelled task awaiting this call (remoterun.aio) stops it, as Ctrl-C below.
        try:
            with aio.interruptible(lambda: ray.cancel(ref, force=True)):
                return self._reply(ray, ref, live, on_output)
        except aio.CallCancelled:  # cancelled as the task was submitted
            ray.cancel(ref, force=True)
            raise

    def _reply(
        self, ray: Any, ref: Any, live: str | None, on_output: OutputHandler | None
    ) -> tuple[dict | None, str, BaseException | None]:
        """The outcome of the call or map task ``ref``, its output printed as it comes
        when ``live`` names a folder it is copied to."""
        printed = {"stdout": 0, "stderr": 0}
        try:
            if live is None:
                reply = ray.get(ref)
            else:
                try:  # a quick call's output comes with its result
                    reply = ray.get(ref, timeout=_LIVE_AFTER)
                except ray.exceptions.GetTimeoutError:
                    self._follow(ref, live, printed, on_output)  # type: ignore[arg-type]
                    reply = ray.get(ref)
        except KeyboardInterrupt:
            ray.cancel(ref, force=True)  # Ctrl-C stops the call, as on the other systems
            raise
        except ray.exceptions.RayError as exc:
            lost = {
                "kind": Failure.REMOTE,
                "type": "remoterun.errors.WorkerLostError",
                "message": f"worker lost: its Ray task failed ({type(exc).__name__}: {exc})",
                "traceback": "",
                "exc": None,
            }
            return None, self.name, exception_from_record(lost, host=self.name)
        host = f"{self.name} node {reply.get('node', '?')}"
        if on_output is not None:
            for kind, data in reply.get("output", ()):
                rest = data[printed[kind] :]  # what was not printed while it ran
                if rest:
                    on_output(_OUTPUT_KINDS[kind], rest)
        if not reply["ok"]:
            return None, host, exception_from_record(reply["failure"], host=host)
        return reply, host, None

    def _live_folder(self) -> str | None:
        """Where a synchronous call copies its output while it runs, when the run root
        is a folder this process and the workers share (else: none, the output comes
        with the result)."""
        if not self.files().local:
            return None
        return f"{self._root}/.calls/{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def _follow(self, ref: Any, live: str, printed: dict, on_output: OutputHandler) -> None:
        """Print what a running call writes (its live folder) until it returns."""
        ray = self._connect()
        try:
            while not ray.wait([ref], timeout=0.05)[0]:
                for stream in ("stdout", "stderr"):
                    try:
                        with open(os.path.join(live, stream), "rb") as f:
                            f.seek(printed[stream])
                            data = f.read()
                    except FileNotFoundError:
                        continue
                    if data:
                        printed[stream] += len(data)
                        on_output(_OUTPUT_KINDS[stream], data)
        finally:
            import shutil

            shutil.rmtree(live, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def cached_hit(self, request: dict) -> dict | None:
        # The run root is readable from here: a hit needs no Ray at all.
        return hit_reply(self.folder(request["name"]), request, self._root)

    def wait_for_end(self, name: str, root: str, timeout: float) -> bool:
        """Return once the run ``name`` has its end recorded, or after ``timeout`` s;
        False when nothing tracks it (its record is read again, after a pause)."""
        return self._remote_op("wait_for_end", name, timeout) != "untracked"

    def _request(self, op: dict, on_output: OutputHandler | None = None) -> dict:
        kind = op["op"]
        if kind == Op.STATUS:
            name = op["name"]
            folder = self.folder(name)
            reply = folder.read_with_outcome(op.get("want_outcome", False))
            config = reply["config"]
            if config is None or config.status != "RUNNING":
                return reply  # a record that is not RUNNING is final: no Ray needed
            # Whether its task still runs is the coordinator's to say (it records a lost
            # worker itself): asked at most once a second per run.
            now = time.monotonic()
            if now - self._checked.get(name, 0.0) < _LIVENESS_EVERY:
                return reply
            self._note_checked(name)
            return self._remote_op("status", name, op.get("want_outcome", False))
        if kind == Op.CANCEL:
            return {"config": self._remote_op("cancel", op["name"])}
        if kind == Op.SUBMIT:
            # Waiting happens here, not in the coordinator (whose threads serve everyone):
            # the run's logs are printed as they come meanwhile.
            wait, want_outcome = op.get("wait"), op.get("want_outcome")
            op = dict(op, wait=False, want_outcome=False)
            resources = {**self.resources, **(op.get("resources") or {})}
            if resources:
                op["resources"] = resources
            reply = self._remote_op("submit", op)
            name = op["name"]
            self._note_checked(name)  # it was just started or found
            if wait and reply["action"] == Action.START:
                self._follow_run(name, on_output)
                reply.update(self.folder(name).read_with_outcome(bool(want_outcome)))
            elif want_outcome and reply.get("config") is not None:
                config = reply["config"]
                if config.terminal:
                    reply.update(self.folder(name).read_outcome(config))
            return reply
        if kind == Op.PING:
            return self._remote_op("ping")
        raise RemoterunError(f"{self.name} does not do {kind!r}")

    def _note_checked(self, name: str) -> None:
        if len(self._checked) > 4096:  # the oldest looks are of runs long over
            self._checked.clear()
        self._checked[name] = time.monotonic()

    def _follow_run(self, name: str, on_output: OutputHandler | None) -> None:
        """Wait for a run started here to end, printing its logs as they grow."""
        folder = self.folder(name)
        printed = {"stdout": 0, "stderr": 0}
        while True:
            state = self._remote_op("wait_for_end", name, 0.25)
            if on_output is not None:
                for stream in ("stdout", "stderr"):
                    data = folder.read_log(stream, printed[stream])
                    if data:
                        printed[stream] += len(data)
                        on_output(_OUTPUT_KINDS[stream], data)
            if state != "running":
                return

    def _remote_op(self, method: str, *args: Any) -> Any:
        ray = self._connect()
        try:
            return ray.get(getattr(self.coordinator(), method).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, RemoterunError):
                raise cause from None
            raise
        except ray.exceptions.ActorDiedError:
            self._coordinator = None  # started again at the next use
            raise

    def close(self) -> None:
        """Nothing to release: Ray's connection is the process's."""


_remotes: dict[tuple, Any] = {}


def _remote(ray: Any, name: str, fn: Any, options: dict) -> Any:
    key = (name, repr(sorted(options.items())))
    task = _remotes.get(key)
    if task is None:
        task = ray.remote(fn).options(**options) if options else ray.remote(fn)
        _remotes[key] = task
    return task


def _rebuild(address: str | None, options: dict) -> RaySystem:
    return RaySystem(address, **options)


#: ``rr.ray(address=None, *, runs=None, runtime_env=None, ...)``: see ``RaySystem``.
ray = RaySystem
