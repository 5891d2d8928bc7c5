"""``@rr.function`` and RemoteFunction: a plain function made remotely executable.

Every way of calling one is written once here over the System primitives: a synchronous
call (``fn(...)``, the fast path without a folder unless ``run_name`` is given), an
asynchronous run (``fn.run``), the cached forms (``get_or_call``, ``get_or_run``) and
``map``; and each of them awaitable (``acall``, ``arun``, ``aget_or_call``,
``aget_or_run``, ``amap``: see ``aio.py``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import cloudpickle

from . import aio, arguments, context, fingerprint, lineage
from .agent import layout
from .agent.protocol import STDOUT, Action, Mode, Op
from .errors import (
    CacheMismatchError,
    RemoterunError,
    RunNotFinishedError,
    RunNotFoundError,
    SerializationError,
    exception_from_record,
)
from .fingerprint import Explanation
from .folder import check_run_name
from .registry import resolve, share_list
from .run import Run, RunStatus, current_run
from .sharing import SHARE_TRUST_ENV as SHARE_TRUST_ENV
from .sharing import SHARED, SharedStores
from .sharing import TRUSTS as SHARE_TRUSTS
from .version import __version__

# A System (``remoterun.systems``): the layer above this one, which makes functions for
# commands; typed loosely here, so that this module does not import it.
System = Any

logger = logging.getLogger(__name__)

_MISMATCH_POLICIES = ("error", "rerun", "ignore")


class RemoteFunction:
    """A function that runs on a system. Create with ``rr.function``."""

    def __init__(
        self,
        fn: Callable,
        *,
        system: Any = None,
        name: str | None = None,
        cache: bool = False,
        on_mismatch: str = "error",
        ignore: Sequence[str] = (),
        share: Any = None,
        version: str | None = None,
        share_trust: str | None = None,
        run_type: str = "function",
        cmds: Sequence[str] = (),
        resources: dict[str, Any] | None = None,
    ):
        """See ``rr.function`` for the options. ``run_type`` and ``cmds`` are what the
        records of its runs say they ran (``system.run`` makes ``"command"`` functions)."""
        if isinstance(fn, RemoteFunction):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"rr.function needs a callable, not {type(fn).__name__}")
        if on_mismatch not in _MISMATCH_POLICIES:
            raise ValueError(
                f"on_mismatch must be one of {_MISMATCH_POLICIES}, not {on_mismatch!r}"
            )
        self.fn = fn
        functools.update_wrapper(self, fn)
        self.name = layout.safe_prefix(name or getattr(fn, "__name__", "fn"))
        self.cache = cache
        self.on_mismatch = on_mismatch
        self.ignore = tuple(ignore)
        self.share = share_list(share)
        if share_trust is not None and share_trust not in SHARE_TRUSTS:
            raise ValueError(f"share_trust must be one of {SHARE_TRUSTS}, not {share_trust!r}")
        self.share_trust = share_trust
        self._system_spec = system
        self._system: System | None = None
        self.run_type = run_type
        self.cmds = list(cmds)
        self.version = version
        self.resources = dict(resources) if resources else None

    def __repr__(self) -> str:
        return f"<RemoteFunction {self.name} on {self._system_name()}>"

    def _repr_html_(self) -> str:
        """How Jupyter shows it: its name, whether it is ``async def``, its system."""
        from . import display  # start-up time: html and datetime, for notebooks only

        return display.function_line(
            self.name, _qualified_name(self.fn), self._system_name(), _is_async(self.fn)
        )

    def _system_name(self) -> str:
        spec = self._system_spec if self._system_spec is not None else "here"
        return spec if isinstance(spec, str) else getattr(spec, "name", repr(spec))

    def _options(self) -> dict[str, Any]:
        """The options it was made with, but its system."""
        return {
            "name": self.name,
            "cache": self.cache,
            "on_mismatch": self.on_mismatch,
            "ignore": self.ignore,
            "share": self.share,
            "version": self.version,
            "share_trust": self.share_trust,
            "run_type": self.run_type,
            "cmds": self.cmds,
            "resources": self.resources,
        }

    def __reduce__(self) -> tuple:
        return (_rebuild, (self.fn, self._system_spec, self._options()))

    @property
    def system(self) -> System:
        """The system calls run on (resolved on first use)."""
        if self._system is None:
            self._system = resolve(self._system_spec if self._system_spec is not None else "here")
        return self._system

    def to(self, system: Any, *, resources: dict[str, Any] | None = None) -> RemoteFunction:
        """The same function, running on ``system`` (with other ``resources``, if given)."""
        options = self._options()
        if resources is not None:
            options["resources"] = resources
        return RemoteFunction(self.fn, system=system, **options)

    def options(self, **changes: Any) -> RemoteFunction:
        """The same function with some options changed (``resources=``, ``cache=``, ...)."""
        options = {**self._options(), **changes}
        return RemoteFunction(self.fn, system=options.pop("system", self._system_spec), **options)

    # ------------------------------------------------------------------ calling

    def __call__(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Any:
        """Run on the system and return the value, streaming stdout and stderr here.

        With ``run_name`` the call is recorded as that run (an earlier run of the name is
        kept under ``attempts/``); without, nothing is written.
        """
        arguments.settle(self.fn, args, kwargs)
        return self.invoke(args, kwargs, run_name=run_name, stream=True)

    def run(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Run:
        """Start a recorded run and return its Run as soon as it is RUNNING.

        The run is detached: it goes on if this process exits.
        """
        arguments.settle(self.fn, args, kwargs)
        reply = self._submit(args, kwargs, run_name, mode=Mode.NEW, wait=False)
        run = self._run_handle(reply)
        _link(lineage_kind(reply), run)
        return run

    def get_or_call(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Any:
        """The result of the run ``run_name`` if it COMPLETED, else execute and record it.

        A RUNNING run is waited for; a FAILED or CANCELLED one executes again (the earlier
        attempt is kept). Raises CacheMismatchError when arguments are given and differ
        from the recorded run's (see ``on_mismatch``). With ``cache=True`` the name may be
        left out: it is derived from the code and the arguments.
        """
        sharing = self._sharing()
        if sharing:
            sharing.trust()  # share= without the team key: refused before anything
        arguments.settle(self.fn, args, kwargs)
        arg_fp = self._arguments_fingerprint(args, kwargs)  # hashed once per call
        reply = self._submit(
            args,
            kwargs,
            self._cached_name(args, kwargs, run_name, arg_fp),
            mode=Mode.GET,
            wait=True,
            on_output=print_output,
            arg_fp=arg_fp,
        )
        if reply["action"] == SHARED:
            value = reply["run"].outcome_of(reply)
            _link(lineage.USED, reply["run"])
            return value
        if reply["action"] == Action.ATTACH:
            return self._run_handle(reply).result()  # linked as used by result()
        if current_run() is not None:  # linked whether it completed or not
            _link(lineage_kind(reply), self._run_handle(reply))
        value = self._outcome(reply)
        if reply["action"] == Action.START and sharing:
            sharing.publish(self._run_handle(reply))
        return value

    def get_or_run(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Run:
        """The Run of that name if it is COMPLETED or RUNNING, else start it; as
        ``get_or_call`` but returns at once."""
        sharing = self._sharing()
        if sharing:
            sharing.trust()
        arguments.settle(self.fn, args, kwargs)
        arg_fp = self._arguments_fingerprint(args, kwargs)
        name = self._cached_name(args, kwargs, run_name, arg_fp)
        reply = self._submit(args, kwargs, name, mode=Mode.GET, wait=False, arg_fp=arg_fp)
        if reply["action"] == SHARED:
            _link(lineage.USED, reply["run"])
            return reply["run"]
        run = self._run_handle(reply)
        if reply["action"] == Action.START and sharing:
            run.on_completed(sharing.publish)  # published once it has COMPLETED
        # A run attached to while RUNNING is linked as used once its result is read.
        _link(lineage_kind(reply), run)
        return run

    def explain(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Explanation:
        """Whether ``get_or_call(*args, **kwargs)`` would be a cache hit, and if not, what
        changed against the nearest earlier COMPLETED run of this function: which
        function or constant of the code, which argument, the version. Executes nothing.
        """
        arguments.settle(self.fn, args, kwargs)
        arg_fp = self._arguments_fingerprint(args, kwargs)
        name = self._cached_name(args, kwargs, run_name, arg_fp)
        system = self.system.placement(name)
        wanted = self._record(args, kwargs, system, arg_fp=arg_fp)["fingerprint"]
        try:
            run = system.get_run(name)
        except RunNotFoundError:
            run = None
        return fingerprint.explain(
            name,
            wanted,
            completed=run if run is not None and run.status is RunStatus.COMPLETED else None,
            runs=system.runs,
            fn_name=self.name,
            fn_qualname=_qualified_name(self.fn),
            with_arguments=bool(args or kwargs),
        )

    def map(
        self,
        *iterables: Iterable[Any],
        return_exceptions: bool = False,
        chunk_size: int | None = None,
        progress: bool | None = None,
    ) -> list[Any]:
        """Call the function on each item (``zip`` of the iterables), over every core of the
        system (every host of a cluster), and return the results in input order.

        Items travel in chunks, one request each, so short calls are not bound by round
        trips. With ``return_exceptions`` a failed item's exception takes its place in the
        list; otherwise the first failure is raised. A progress bar is shown on a terminal
        (``progress=True`` forces it, ``False`` hides it).
        """
        mapping = _Mapping(self, iterables, return_exceptions, chunk_size)
        if not mapping.chunks:
            return []
        mapping.bar = _progress_bar(len(mapping.results), self.name, progress)
        workers = min(mapping.slots, len(mapping.chunks))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix=f"map-{self.name}") as pool:
                futures = [pool.submit(mapping.run_chunk, i) for i in range(len(mapping.chunks))]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            if mapping.bar is not None:
                mapping.bar.close()
        return mapping.results

    # ------------------------------------------------------------------ awaiting

    async def acall(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Any:
        """``fn(*args, run_name=..., **kwargs)``, awaited. The call blocks a thread of a
        bounded pool (``REMOTERUN_ASYNC_THREADS``), never the event loop. Cancelling the
        awaiting task stops the call on the host, as Ctrl-C does; a recorded run
        (``run_name``) goes on, since it is detached."""
        return await aio.blocking(functools.partial(self, *args, run_name=run_name, **kwargs))

    async def arun(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Run:
        """``run(...)``, awaited: the Run, once it is RUNNING (``await`` it for its result)."""
        return await aio.blocking(functools.partial(self.run, *args, run_name=run_name, **kwargs))

    async def aget_or_call(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Any:
        """``get_or_call(...)``, awaited (see ``acall`` for cancelling)."""
        call = functools.partial(self.get_or_call, *args, run_name=run_name, **kwargs)
        return await aio.blocking(call)

    async def aget_or_run(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> Run:
        """``get_or_run(...)``, awaited."""
        call = functools.partial(self.get_or_run, *args, run_name=run_name, **kwargs)
        return await aio.blocking(call)

    async def amap(
        self,
        *iterables: Iterable[Any],
        return_exceptions: bool = False,
        chunk_size: int | None = None,
        progress: bool | None = None,
    ) -> list[Any]:
        """``map(...)``, awaited: its chunks are calls of the bounded pool, as many at once
        as ``map`` runs. Cancelling the awaiting task stops the chunks in flight."""
        import asyncio

        mapping = await aio.blocking(
            functools.partial(_Mapping, self, iterables, return_exceptions, chunk_size)
        )
        if not mapping.chunks:
            return []
        mapping.bar = _progress_bar(len(mapping.results), self.name, progress)
        slots = asyncio.Semaphore(min(mapping.slots, len(mapping.chunks)))
        failed = asyncio.Event()

        async def run_chunk(index: int) -> None:
            async with slots:
                if failed.is_set():  # as map: chunks not started yet start nothing
                    return
                try:
                    await aio.blocking(functools.partial(mapping.run_chunk, index))
                except Exception:
                    failed.set()
                    raise

        tasks = [asyncio.ensure_future(run_chunk(i)) for i in range(len(mapping.chunks))]
        try:
            await asyncio.wait(tasks)  # after a failure, the chunks running finish
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            if mapping.bar is not None:
                mapping.bar.close()
        # The first failure in input order, as map raises it (each one looked at, so
        # that asyncio reports none as never retrieved).
        failures = [task.exception() for task in tasks]
        for failure in failures:
            if failure is not None:
                raise failure
        return mapping.results

    # ------------------------------------------------------------------ internals

    def invoke(
        self, args: tuple, kwargs: dict, *, run_name: str | None = None, stream: bool = True
    ) -> Any:
        """``fn(*args, run_name=..., **kwargs)``, with the arguments as a tuple and a dict,
        and the output streamed here only when ``stream``."""
        on_output = print_output if stream else None
        if run_name is not None:
            reply = self._submit(
                args, kwargs, run_name, mode=Mode.NEW, wait=True, on_output=on_output
            )
            _link(lineage_kind(reply), self._run_handle(reply))
            return self._outcome(reply)
        fn_bytes, fn_key = self._pickle_function()
        system = self.system
        # Runs passed as arguments are read on the host when it is known to hold them.
        target = system.placement(None) if len(getattr(system, "hosts", ())) <= 1 else None
        args, kwargs, passed = arguments.pass_runs(args, kwargs, target)
        for run in passed:  # no run of its own records them: the current run used them
            _link(lineage.USED, run)
        # Large arguments travel beside the pickle, from their own memory: nothing large
        # is copied here, so an event loop in another thread is not held up by it.
        buffers: list = []
        inputs = _pickle_inputs(self.fn, args, kwargs, buffers)
        op: dict[str, Any] = {"op": Op.CALL, "fn_key": fn_key, "inputs": inputs}
        if buffers:
            op["buffers"] = buffers
        if self.resources:
            op["resources"] = self.resources
        if passed and arguments.has_references(args, kwargs):
            op["run_args"] = True
        reply, _, error = system.call(op, fn_bytes, on_output)  # the least-loaded host
        del inputs, op, buffers  # the arguments' pickle is let go before the result's
        if error is not None:  # raised outside any except block: its cause is the RemoteError
            raise error
        # Large buffers of the result (numpy arrays) are views of the reply: not copied.
        return cloudpickle.loads(reply["result"], buffers=reply.get("buffers") or ())

    def _submit(
        self,
        args: tuple,
        kwargs: dict,
        run_name: str | None,
        *,
        mode: str,
        wait: bool,
        on_output: Callable[[int, bytes], None] | None = None,
        arg_fp: dict[str, Any] | None = None,
    ) -> dict:
        generated = run_name is None
        if not generated:
            check_run_name(run_name)
        # The host that holds the run decides it; a generated name goes where load is least.
        system = self.system.placement(run_name)
        try:
            # A hit needs only the arguments' fingerprint; the code's (a walk over all
            # the code the function reaches) is added when the run is to be recorded.
            record = self._record(args, kwargs, system, with_code=mode != Mode.GET, arg_fp=arg_fp)
        except SerializationError:
            if mode != Mode.GET:
                self._payload(args, kwargs, system)  # an argument that cannot travel says so
            raise
        request: dict[str, Any] = {
            "op": Op.SUBMIT,
            "root": system.root,
            "mode": mode,
            "wait": wait,
            "want_outcome": wait,
            "exclusive": generated,
            "lookup": mode == Mode.GET and not args and not kwargs,
            "on_mismatch": self.on_mismatch,
            "record": record,
        }
        if self.resources:
            request["resources"] = self.resources
        if mode == Mode.GET:
            # A cache hit needs neither the function nor the inputs: send them only when
            # the host answers that the run has to execute.
            request["payload_omitted"] = True
        else:
            # After the record: fingerprinting an argument may pickle it, and that copy is
            # gone before the inputs' pickle is made, so a run holds one copy, not two.
            request.update(self._payload(args, kwargs, system))
        for _ in range(100):
            request["name"] = layout.generate_run_name(self.name) if generated else run_name
            reply = system.cached_hit(request) or system.request(
                request, on_output, run_name=request["name"]
            )
            reply["system"] = system
            action = reply["action"]
            if action == Action.NEED_PAYLOAD:
                # A miss here: a teammate may have published the run to a shared store.
                shared = self._sharing().hit(request, _qualified_name(self.fn), self.on_mismatch)
                if shared is not None:
                    return shared
                request.update(self._payload(args, kwargs, system))
                request["record"]["fingerprint"].update(self._code_record())
                request.pop("payload_omitted", None)
                continue
            if action == Action.EXISTS and generated:
                continue
            break
        if action == Action.MISMATCH:
            differences = tuple(reply.get("differences") or ())
            raise CacheMismatchError(
                f"run {reply['name']!r} on {system.name} was made from other arguments: "
                f"{', '.join(differences)} differ. Use another run_name, or "
                "on_mismatch='rerun' to execute again, or 'ignore' to take the cached run",
                run_name=reply["name"],
                differences=differences,
            )
        if action == Action.BUSY:
            raise RunNotFinishedError(
                f"run {reply['name']!r} is already RUNNING on {system.name}: wait for it with "
                "get_or_call / get_or_run, or cancel it before starting it again"
            )
        return reply

    # ------------------------------------------------------------------ shared stores

    def _sharing(self) -> SharedStores:
        """The function's shared stores, then its system's."""
        return SharedStores(self.share, self.system, self.share_trust)

    def _run_handle(self, reply: dict) -> Run:
        system = reply["system"]
        config = reply.get("config")
        folder = system.folder(reply["name"], reply.get("root"))
        # The handle is this attempt's: a later re-execution of the name does not change it.
        return Run(folder, system, config, attempt=(config or {}).get("attempt"))

    def _outcome(self, reply: dict) -> Any:
        return self._run_handle(reply).outcome_of(reply)

    def _arguments_fingerprint(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        if self.run_type != "function":
            return None
        return fingerprint.argument_fingerprint(self.fn, args, kwargs, ignore=self.ignore)

    def _cached_name(
        self, args: tuple, kwargs: dict, run_name: str | None, arg_fp: dict | None = None
    ) -> str:
        if run_name is not None:
            return run_name
        if not self.cache:
            raise RemoterunError(
                f"{self.name}.get_or_call/get_or_run need a run_name=, or the function must "
                "be made with rr.function(..., cache=True) to derive one from code and arguments"
            )
        arguments = arg_fp or fingerprint.argument_fingerprint(
            self.fn, args, kwargs, ignore=self.ignore
        )
        return fingerprint.cached_run_name(self.name, self.fn, self.version, arguments)

    def _code_record(self) -> dict[str, Any]:
        return fingerprint.code_record(self.fn, self.version)

    def _record(
        self,
        args: tuple,
        kwargs: dict,
        system: System,
        with_code: bool = True,
        arg_fp: dict[str, Any] | None = None,
    ) -> dict:

        call_fingerprint: dict[str, Any] = self._code_record() if with_code else {}
        if self.run_type == "function":
            call_fingerprint.update(
                arg_fp
                or fingerprint.argument_fingerprint(self.fn, args, kwargs, ignore=self.ignore)
            )
        parent = current_run()
        record = {
            "run_type": self.run_type,
            "fn_name": self.name,
            "fn_qualname": _qualified_name(self.fn),
            "cmds": list(self.cmds),
            "fingerprint": call_fingerprint,
            "creator": context.creator(),
            "remoterun_version": __version__,
            "system": system.name,
            "parent": parent.url if parent is not None else None,
        }
        used = [
            (run.url, run.config.attempt)
            for run in (*args, *kwargs.values())
            if isinstance(run, Run)
        ]
        if used:
            record.update(lineage.record_fields(used))
        return record

    def _payload(self, args: tuple, kwargs: dict, system: System) -> dict[str, Any]:
        args, kwargs, passed = arguments.pass_runs(args, kwargs, system)
        payload: dict[str, Any] = {
            "fn": self._pickle_function()[0],
            "inputs": _pickle_inputs(self.fn, args, kwargs),
        }
        if passed and arguments.has_references(args, kwargs):
            payload["run_args"] = True
        return payload

    def _pickle_function(self) -> tuple[bytes, str]:
        data = fingerprint.dumps_by_value(self.fn, self.fn, "the function")
        return data, hashlib.blake2b(data, digest_size=16).hexdigest()


class _Mapping:
    """One ``map``: its items in chunks (each chunk one request to an agent), and the
    results in input order as the chunks come back."""

    def __init__(
        self,
        remote: RemoteFunction,
        iterables: Sequence[Iterable[Any]],
        return_exceptions: bool,
        chunk_size: int | None,
    ):
        self.remote = remote
        self.return_exceptions = return_exceptions
        self.bar: Any = None
        items = list(zip(*iterables))
        self.results: list[Any] = [None] * len(items)
        self.chunks: list[list[tuple]] = []
        if not items:
            return
        runs = [a for item in items for a in item if isinstance(a, Run)]
        if runs:
            # Runs among the items travel as their results, read here once each.
            values: dict[str, Any] = {}
            items = [
                tuple(arguments.value_of_run(a, values) if isinstance(a, Run) else a for a in item)
                for item in items
            ]
            for run in runs:
                _link(lineage.USED, run)
        self.system = remote.system
        self.slots = max(1, self.system.parallelism())
        self.size = chunk_size or max(1, min(64, -(-len(items) // (self.slots * 4))))
        self.chunks = [items[i : i + self.size] for i in range(0, len(items), self.size)]
        self.fn_bytes, self.fn_key = remote._pickle_function()

    def run_chunk(self, index: int) -> None:
        """Call the function on the chunk ``index`` and put its results in place; raise
        its first failure unless ``return_exceptions``."""
        chunk, start, fn = self.chunks[index], index * self.size, self.remote.fn
        data = fingerprint.dumps_by_value(chunk, fn, "the arguments of", *chunk)
        op = {"op": Op.MAP, "fn_key": self.fn_key, "items": data}
        if self.remote.resources:
            op["resources"] = self.remote.resources
        reply, host, failed = self.system.call(op, self.fn_bytes, print_output)
        if failed is not None:  # the chunk as a whole could not run
            if not self.return_exceptions:
                raise failed
            self.results[start : start + len(chunk)] = [failed] * len(chunk)
        else:
            for offset, (ok, payload) in enumerate(reply["outcomes"]):
                if ok:
                    self.results[start + offset] = cloudpickle.loads(payload)
                    continue
                item_exc = exception_from_record(payload, host=host)
                if not self.return_exceptions:
                    raise item_exc
                self.results[start + offset] = item_exc
        if self.bar is not None:
            self.bar.update(len(chunk))


def print_output(kind: int, data: bytes) -> None:
    """Write a function's streamed output to this process's stdout or stderr."""
    stream = sys.stdout if kind == STDOUT else sys.stderr
    try:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()
    except (OSError, ValueError):
        pass


def _qualified_name(fn: Callable) -> str:
    """``module.qualname`` of the function (of a callable object's class)."""
    target = inspect.unwrap(fn)
    if not hasattr(target, "__qualname__"):
        target = type(target)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


def _progress_bar(total: int, name: str, wanted: bool | None) -> Any:
    """A tqdm bar: a widget in a Jupyter notebook (``tqdm.auto``), else on stderr when it
    is a terminal; ``wanted`` True forces it, False hides it. None when not shown."""
    if wanted is False or (wanted is None and not (_in_notebook() or sys.stderr.isatty())):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"map {name}", unit="call")


def _in_notebook() -> bool:
    """Whether this is a Jupyter kernel (IPython already imported, under a kernel app)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _is_async(fn: Callable) -> bool:
    """Whether calling ``fn`` gives a coroutine (an ``async def`` function, or a callable
    object whose ``__call__`` is one), which the host runs to its end."""
    target = inspect.unwrap(fn)
    call = target if inspect.isroutine(target) else type(target).__call__
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)


def _rebuild(fn: Callable, system: Any, options: dict) -> RemoteFunction:
    return RemoteFunction(fn, system=system, **options)


def function(
    fn: Callable | None = None,
    *,
    system: Any = None,
    name: str | None = None,
    cache: bool = False,
    on_mismatch: str = "error",
    ignore: Sequence[str] = (),
    share: Any = None,
    version: str | None = None,
    share_trust: str | None = None,
    resources: dict[str, Any] | None = None,
) -> Any:
    """Make ``fn`` a RemoteFunction; as a decorator with or without arguments.

    Args:
        system: where it runs: ``"here"`` (default), a System, or a cluster name.
        name: the prefix of its generated run names (default: the function's name).
        cache: derive the run name of ``get_or_call``/``get_or_run`` from the code and
            the arguments when no ``run_name`` is given.
        on_mismatch: what ``get_or_*`` do when a recorded run of that name was made from
            other arguments: ``"error"`` (raise CacheMismatchError), ``"rerun"``, ``"ignore"``.
        ignore: parameter names left out of the argument fingerprint.
        share: shared stores (a folder URL such as ``"s3://team/runs"``, or a list): on a
            miss in the system's own runs, ``get_or_*`` take a COMPLETED run of the name
            from there instead of executing, and publish the runs they execute there.
        version: stands for the code in the fingerprint (``cache=True`` names): bump it
            to invalidate, keep it to reuse runs across code edits.
        share_trust: ``"signed"`` (default): a run is taken from a shared store only when
            it is signed with the team key (``remoterun keygen`` or
            ``$REMOTERUN_SIGNING_KEY``), and share= without a key is refused;
            ``"writers"``: trust everyone who can write to the store (digests are still
            checked). ``$REMOTERUN_SHARE_TRUST`` sets it for every function.
        resources: what each call needs on a Ray system (``{"num_cpus": 1, "num_gpus":
            1, "memory": bytes, "custom": {"name": amount}}``); other systems ignore it.
    """
    options = dict(
        system=system,
        name=name,
        cache=cache,
        on_mismatch=on_mismatch,
        ignore=ignore,
        share=share,
        version=version,
        share_trust=share_trust,
        resources=resources,
    )
    if fn is None:
        return lambda f: RemoteFunction(f, **options)
    return RemoteFunction(fn, **options)


# --------------------------------------------------------------------------- lineage


def lineage_kind(reply: dict) -> str | None:
    """How a submit's run relates to the run that made the request: it was started
    (``produced``), found COMPLETED (``used``), or neither yet (attached to)."""
    action = reply.get("action")
    if action == Action.START:
        return lineage.PRODUCED
    if action in (Action.HIT, SHARED):
        return lineage.USED
    return None


def _link(kind: str | None, run: Run) -> None:
    outer = current_run()
    if kind is not None and outer is not None:
        lineage.note(kind, run, outer=outer)


# --------------------------------------------------------------------------- pickling


def _pickle_inputs(fn: Callable, args: tuple, kwargs: dict, buffers: list | None = None) -> bytes:
    """cloudpickle of ``{"args": [...], "kwargs": {...}}``; a failure names the argument.
    With ``buffers``, large buffers are left out of it and appended there."""
    inputs = {"args": list(args), "kwargs": dict(kwargs)}
    try:
        return fingerprint.dumps_by_value(
            inputs, fn, "the arguments of", *args, *kwargs.values(), buffers=buffers
        )
    except SerializationError as exc:
        for name, value in fingerprint.bind_arguments(fn, args, kwargs).items():
            try:
                cloudpickle.dumps(value)
            except Exception as inner:
                raise SerializationError(
                    f"argument {name!r} of {getattr(fn, '__qualname__', fn)!r} cannot be "
                    f"pickled ({type(value).__name__}): {inner}. Nothing was started."
                ) from inner
        raise exc
