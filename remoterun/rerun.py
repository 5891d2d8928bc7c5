"""``run.rerun()``: the recorded function executed again with the recorded inputs.

The recorded bytes are sent as they are, once checked against their digests (and the
signature, where one is needed): the function is not unpickled on the client. Runs that
were passed as arguments go by reference when the executing host reads them from its
own disk, else as their results, read here.
"""

from __future__ import annotations

from typing import Any

from . import context, lineage, registry
from .agent import layout
from .agent.protocol import Action, Mode, Op
from .agent.record import COMPLETED
from .agent.runfolder import RunArgument
from .errors import RemoterunError, RunNotFinishedError
from .version import __version__

# A Run (``remoterun.run``, the layer above, whose ``rerun`` calls this module).
Run = Any

# What a re-run's record takes from its source's.
_RERUN_FIELDS = ("run_type", "fn_name", "fn_qualname", "cmds", "fingerprint")


def rerun(source: Run, run_name: str | None, system: Any, outer: Run | None) -> Run:
    """Start ``source``'s function again as a new run (see ``Run.rerun``); ``outer`` is
    the run executing this code, if any (the new run's parent)."""
    config = source.config
    if config.run_type == "context":
        raise RemoterunError(
            f"run {source.name!r} recorded a `with rr.run(...)` block: there is no "
            "function to re-run"
        )
    fn = source.read_pickle("function")
    inputs = source.read_pickle("inputs")
    raw = source.load_pickle("inputs", inputs)  # read once: which runs were passed
    if system is None:
        executes = source.system is not None and source.system.executes
        system = source.system if executes else "here"
    # The host that holds the name decides it; a generated name goes where load is least.
    target = registry.resolve(system).placement(run_name)
    used = _runs_passed(source, raw)
    by_reference = all(target.reads_locally(run.folder) and not run.needs_signature for run in used)
    if used and not by_reference:  # they travel as their results, read here
        inputs = _inputs_with_results(raw, used)
    record = {key: config.get(key) for key in _RERUN_FIELDS}
    record.update(
        creator=context.creator(),
        remoterun_version=__version__,
        parent=outer.url if outer is not None else None,
        source=source.url,
        source_attempt=config.attempt,
        system=target.name,
    )
    if used:
        record.update(lineage.record_fields([(r.url, r.config.attempt) for r in used]))
    request = {
        "run_args": bool(used) and by_reference,  # the host reads them from its disk
        "op": Op.SUBMIT,
        "mode": Mode.NEW,
        "wait": False,
        "want_outcome": False,
        "exclusive": run_name is None,
        "lookup": False,
        "record": record,
        "fn": fn,
        "inputs": inputs,
    }
    for _ in range(100):
        name = run_name or layout.generate_run_name(config.fn_name or "rerun")
        request.update(name=name, root=target.root)
        reply = target.request(request, run_name=name)
        if reply["action"] != Action.EXISTS or run_name is not None:
            break
    if reply["action"] in (Action.BUSY, Action.EXISTS):
        raise RunNotFinishedError(
            f"run {name!r} is already RUNNING on {target.name}: wait for it with "
            "get_or_call / get_or_run, or cancel it before starting it again"
        )
    reply_config = reply.get("config") or {}
    started = type(source)(
        target.folder(name, reply.get("root")),
        target,
        reply_config,
        attempt=reply_config.get("attempt"),
    )
    lineage.note(lineage.PRODUCED, started, outer=outer)
    return started


def _runs_passed(source: Run, raw: dict) -> list[Run]:
    """The runs passed to ``source`` as arguments (references in its inputs ``raw``),
    reached from here; RemoterunError for one that cannot be."""
    found = []
    for value in (*raw.get("args", ()), *raw.get("kwargs", {}).values()):
        if isinstance(value, RunArgument):
            run = lineage.resolve(source, value.url, value.attempt)
            if run is None or run.known_config is None:
                raise RemoterunError(
                    f"run {source.name!r} was passed the run {value.url} as an argument, "
                    "which cannot be reached from here: re-run it where that run is"
                )
            status = run.wait()
            if status != COMPLETED:
                raise RemoterunError(
                    f"run {source.name!r} was passed the run {run.name!r}, which {status}: "
                    "it has no result to pass on. Nothing was started."
                )
            found.append(run)
    return found


def _inputs_with_results(raw: dict, runs: list[Run]) -> bytes:
    """The inputs ``raw``, pickled again with each run argument replaced by its result
    (the user's own packages by value, as a call pickles them)."""
    results = iter([run.read_result() for run in runs])

    def value(item: Any) -> Any:
        return next(results) if isinstance(item, RunArgument) else item

    args = [value(a) for a in raw.get("args", ())]
    kwargs = {k: value(v) for k, v in raw.get("kwargs", {}).items()}
    from . import fingerprint  # start-up time: cloudpickle

    values = [*args, *kwargs.values()]
    return fingerprint.dumps_by_value(
        {"args": args, "kwargs": kwargs}, values[0] if values else None, "inputs", *values
    )
