"""Runs passed as arguments to a remote function: waited for, then passed by reference
(a ``RunArgument`` that the executing host reads from its own disk) or as their result,
read and checked here."""

from __future__ import annotations

from typing import Any, Callable

from . import fingerprint
from .agent.runfolder import RunArgument
from .errors import RemoterunError
from .run import Run, RunStatus

# A System (``remoterun.systems``): the layer above.
System = Any


def settle(fn: Callable, args: tuple, kwargs: dict) -> None:
    """Wait for the runs passed as arguments to finish; raise if one did not complete."""
    if not any(isinstance(v, Run) for v in (*args, *kwargs.values())):
        return
    named = [(f"args[{i}]", v) for i, v in enumerate(args)] + list(kwargs.items())
    bound = fingerprint.bind_arguments(fn, args, kwargs)
    for position, value in named:
        if not isinstance(value, Run):
            continue
        # the parameter's name when it binds to one (not through *args or **kwargs)
        name = next((k for k, v in bound.items() if v is value), position)
        status = value.wait()
        if status is not RunStatus.COMPLETED:
            raise RemoterunError(
                f"argument {name!r} of {getattr(fn, '__qualname__', fn)!r} is run "
                f"{value.name!r}, which {status}: it has no result to pass on "
                f"({value.config.error or status}). Nothing was started."
            ) from value.exception()


def pass_runs(args: tuple, kwargs: dict, target: System | None) -> tuple[tuple, dict, list[Run]]:
    """The arguments as they travel: a (finished) Run becomes a reference that the host
    reads from its own disk when ``target`` holds the run's folder, else its result,
    read here. Also returns the Runs that were passed."""
    if not any(isinstance(v, Run) for v in (*args, *kwargs.values())):
        return args, kwargs, []
    used: list[Run] = []

    def passed(value: Any) -> Any:
        if not isinstance(value, Run):
            return value
        used.append(value)
        # A run whose record must be signed is read (and checked) here, never by path.
        if target is not None and target.reads_locally(value.folder) and not value.needs_signature:
            return RunArgument(value.folder.path, value.config.attempt, value.url)
        return value.read_result()

    return (
        tuple(passed(a) for a in args),
        {k: passed(v) for k, v in kwargs.items()},
        used,
    )


def has_references(args: tuple, kwargs: dict) -> bool:
    """Whether a Run argument travels as a reference for the host to read."""
    return any(isinstance(v, RunArgument) for v in (*args, *kwargs.values()))


def value_of_run(run: Run, values: dict[str, Any]) -> Any:
    """A run's result for ``map`` (read once per run, kept in ``values``)."""
    if run.url not in values:
        if run.wait() is not RunStatus.COMPLETED:
            raise RemoterunError(
                f"run {run.name!r} is {run.status}: it has no result to map over. "
                "Nothing was started."
            )
        values[run.url] = run.read_result()
    return values[run.url]
