"""The ``remoterun`` command: list, show, graph, follow, cancel, copy and remove runs, and
browse them in a web page (``remoterun ui``).

A SYSTEM is ``here`` (the default), a cluster saved with ``cluster.save()``, or a folder
path / fsspec URL holding run folders. A RUN is a name on ``--system`` (``-s``), or the URL
of a run's own folder (``s3://bucket/runs/exp1``).

Exit codes: 0 done, 1 a run failed or was not found, a system or store answered with
an error, or a command was refused; 2 the command line was wrong. Every error is one line
on stderr (``REMOTERUN_DEBUG=1`` shows an unexpected one's traceback as well).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, Callable, NoReturn

try:
    import click
except ImportError as exc:  # pragma: no cover - the message is the point
    raise SystemExit(
        f"the remoterun command needs the cli extra: pip install 'remoterun[cli]' ({exc})"
    ) from None

import remoterun as rr
from remoterun.agent import integrity
from remoterun.agent.runfolder import RunFolder
from remoterun.errors import (
    CorruptRunError,
    RemoterunError,
    RunNotFoundError,
    SystemUnavailableError,
)
from remoterun.folder import fs_of, storage_reason
from remoterun.systems.base import parse_record, record_problem

FAILED = 1


def _system(spec: str) -> Any:
    """The system SYSTEM names; UsageError for a name or protocol that names none."""
    from remoterun.systems import resolve, saved_cluster

    if "://" in spec:
        import fsspec

        protocol = spec.split("://", 1)[0]
        if protocol not in fsspec.available_protocols():
            raise click.UsageError(
                f"{spec!r}: {protocol!r} is not a protocol fsspec knows (s3://, gs://, "
                "file://, a folder path, ...)"
            )
    elif spec not in ("here", "local") and not spec.startswith(("/", ".", "~")):
        if saved_cluster(spec) is None:
            raise click.UsageError(
                f"no system named {spec!r}: use 'here', a folder path or URL, or a cluster "
                "saved with cluster.save() (see 'remoterun clusters')"
            )
        return rr.cluster(spec)
    try:
        return resolve(spec)
    except RemoterunError:
        raise
    except Exception as exc:  # an fsspec backend connects as it is made (ftp, ssh)
        raise SystemUnavailableError(f"cannot open {spec}: {_one_line(exc)}") from exc


def _is_path(spec: str) -> bool:
    return "://" in spec or "/" in spec


def _locate(spec: str, system: str) -> rr.Run:
    """The run that RUN names, not read yet: a run folder's URL or path, else a name on
    ``system``."""
    if not _is_path(spec):
        named = _system(system)
        return rr.Run(named.folder(spec), named)
    try:
        return rr.run(path=spec)
    except RemoterunError:
        raise
    except Exception as exc:  # the URL's filesystem connects as it is made
        raise SystemUnavailableError(f"cannot open {spec}: {_one_line(exc)}") from exc


def _run(spec: str, system: str) -> rr.Run:
    """The run that RUN names, with its record read. Raises RunNotFoundError when there
    is none, CorruptRunError when what is there is not a remoterun run's folder."""
    found = _locate(spec, system)
    try:
        if _is_path(spec):
            found.refresh()
        else:  # the system's own lookup: on every host of a cluster
            found = found.system.get_run(spec)
    except RunNotFoundError:
        raise
    except Exception:
        _record_of(found.folder)  # raises, naming what is wrong, if the folder is it
        raise
    if not found.config:
        _record_of(found.folder)
        raise RunNotFoundError(f"no run at {found.url}")
    problem = record_problem(found.config, found.name)
    if problem:
        raise CorruptRunError(f"{found.url} is not a run: {problem}", url=found.url)
    return found


def _record_of(folder: RunFolder) -> dict:
    """The record in ``folder``'s config.json, read from its filesystem directly. Raises
    RunNotFoundError when nothing is there, CorruptRunError naming why it is no run's."""
    try:
        data = folder.read_record_bytes()
    except RemoterunError as exc:
        if not isinstance(exc.__cause__, NotADirectoryError):
            raise
        data = None
    if data is None:
        try:
            kind = fs_of(folder.files).info(folder.path).get("type")
        except FileNotFoundError:
            raise RunNotFoundError(f"no run at {folder.url}") from None
        why = f"it has no {folder.RECORD_FILE}" if kind == "directory" else "it is a file"
        raise CorruptRunError(f"{folder.url} is not a run: {why}", url=folder.url)
    return parse_record(data, folder.name, folder.url)


def _one_line(exc: BaseException) -> str:
    """An error of a layer below (OSError, botocore, paramiko, ...) as one line."""
    text = " ".join(storage_reason(exc).split())
    kind = type(exc).__name__
    return text if kind in text or isinstance(exc, RemoterunError) else f"{kind}: {text}"


def _fail(message: str) -> NoReturn:
    click.echo(f"remoterun: {message}", err=True)
    sys.exit(FAILED)


def _handled(body: Callable[..., Any]) -> Callable[..., Any]:
    """Report every error as one line and exit code 1, never as a traceback (usage
    errors keep click's exit code 2)."""
    import functools

    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return body(*args, **kwargs)
        except click.UsageError:
            raise
        except RemoterunError as exc:
            _fail(str(exc))
        except Exception as exc:  # the layers below: a store, a host, a bad URL
            if os.environ.get("REMOTERUN_DEBUG"):
                raise
            _fail(_one_line(exc))

    return wrapper


class _WarningLines(logging.Handler):
    """remoterun's warnings (an entry a listing skipped, ...) as one line each on
    stderr: a command line configures logging, the library does not."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo("remoterun: " + " ".join(record.getMessage().split()), err=True)


def _table(columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; tab-separated lines (with a header) when piped."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    click.echo("\t".join(columns))
    for row in rows:
        click.echo("\t".join(row))


def _when(text: str | None) -> str:
    if not text:
        return "-"
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(config: dict) -> str:
    try:
        start = datetime.datetime.fromisoformat(config["start_time"].replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return "-"
    end_text = config.end_time
    end = (
        datetime.datetime.fromisoformat(end_text.replace("Z", "+00:00"))
        if end_text
        else datetime.datetime.now(datetime.timezone.utc)
    )
    seconds = max((end - start).total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TB"


def _folder_sizes(runs: list[rr.Run]) -> dict[str, int]:
    """Each run's folder size by URL, from one recursive listing of each root rather
    than one per run. A size is a nicety: a root that cannot be listed gives none."""
    groups: dict[tuple[int, str], list[rr.Run]] = {}
    for run in runs:
        groups.setdefault((id(run.system), run.root), []).append(run)
    sizes: dict[str, int] = {}
    for group in groups.values():
        prefix = group[0].root.rstrip("/") + "/"
        try:
            found = fs_of(group[0].folder.files).find(prefix.rstrip("/"), detail=True)
        except Exception:
            continue
        totals = dict.fromkeys((run.name for run in group), 0)
        for path, info in found.items():
            top = path[len(prefix) :].split("/", 1)[0] if path.startswith(prefix) else ""
            if top in totals and info.get("type") != "directory":
                totals[top] += int(info.get("size") or 0)
        sizes.update((run.url, totals[run.name]) for run in group)
    return sizes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rr.__version__, prog_name="remoterun")
def main() -> None:
    """Runs recorded by remoterun: list, show, follow, cancel, copy, remove, browse (ui).

    SYSTEM is 'here' (default), a cluster saved with cluster.save(), or a folder
    path / URL such as s3://bucket/runs. Exit codes: 0 ok, 1 failed, not found or refused,
    2 usage.
    """
    log = logging.getLogger("remoterun")
    if not any(isinstance(h, _WarningLines) for h in log.handlers):
        log.addHandler(_WarningLines(logging.WARNING))
        log.propagate = False


system_option = click.option(
    "-s", "--system", default="here", show_default=True, help="where the run is"
)


@main.command("ls")
@click.argument("system", default="here")
@click.option("--no-size", is_flag=True, help="skip folder sizes (faster on S3)")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="the first N runs by name only: N records read, not all (a large store)",
)
@_handled
def ls(system: str, no_size: bool, limit: int | None) -> None:
    """List the runs of SYSTEM: name, status, function, start, duration, size.

    What is not a run (a stray file, a folder without a readable record) is left out,
    with a line on stderr for each."""
    named = _system(system)
    if limit is None:
        found = named.runs()
    else:  # one listing per store, then the records of the first names only
        stores = getattr(named, "hosts", None) or [named]  # each host of a cluster
        first = sorted((n, i) for i, store in enumerate(stores) for n in store.run_names())
        found = [
            run
            for i, store in enumerate(stores)
            for run in store.read_runs([n for n, j in first[:limit] if j == i])
        ]
    runs = sorted(found, key=lambda r: (r.config.start_time or "", r.name))
    sizes = {} if no_size else _folder_sizes(runs)
    rows = []
    for run in runs:
        config = run.config
        rows.append(
            [
                run.name,
                str(config.get("status", "?")),
                str(config.fn_name or config.run_type or "-"),
                _when(config.start_time),
                _duration(config),
                "-" if no_size else _size(sizes.get(run.url)),
            ]
        )
    _table(["name", "status", "function", "start", "duration", "size"], rows)


@main.command()
@click.argument("run")
@system_option
@click.option("--json", "as_json", is_flag=True, help="the whole config.json")
@_handled
def show(run: str, system: str, as_json: bool) -> None:
    """Show a run's record and lineage."""
    found = _run(run, system)
    config = found.config
    if as_json:
        click.echo(json.dumps(config, indent=1, sort_keys=True, default=str))
        return
    fields = [
        ("name", found.name),
        ("url", found.url),
        ("status", config.get("status")),
        ("function", config.fn_name or "-"),
        ("commands", "; ".join(config.get("cmds") or []) or "-"),
        ("host", config.host),
        ("started", _when(config.start_time)),
        ("ended", _when(config.end_time)),
        ("duration", _duration(config)),
        ("attempt", config.attempt),
        ("error", config.error or "-"),
        ("tags", json.dumps(config.tags)),
        ("params", json.dumps(config.params)),
        ("metrics", json.dumps(config.metrics)),
    ]
    for key, value in fields:
        click.echo(f"{key:<9} {value}")
    for key in ("upstream", "downstream"):
        links = config.get(key) or []
        click.echo(f"{key:<9} {len(links)} run(s)")
        for link in links:
            click.echo(f"  {link}")
    if config.status == "FAILED":
        sys.exit(FAILED)


@main.command()
@click.argument("run")
@system_option
@click.option("--dot", is_flag=True, help="print it in Graphviz's dot language")
@_handled
def graph(run: str, system: str, dot: bool) -> None:
    """Show the runs linked to a run: the steps it produced and the runs it used."""
    found = _run(run, system)
    linked = found.graph()
    click.echo(linked.to_dot() if dot else str(linked), nl=not dot)


@main.command()
@click.argument("run")
@system_option
@click.option("-f", "--follow", is_flag=True, help="keep following while the run is going")
@click.option("--stderr", "stream", flag_value="stderr", help="stderr instead of stdout")
@click.option("--stdout", "stream", flag_value="stdout", default=True, hidden=True)
@_handled
def logs(run: str, system: str, follow: bool, stream: str) -> None:
    """Print a run's output; with -f, follow it until the run ends."""
    found = _run(run, system)
    for chunk in found.logs(follow=follow, stream=stream):
        click.echo(chunk, nl=False)
        sys.stdout.flush()
    if found.refresh().status is rr.RunStatus.FAILED:
        sys.exit(FAILED)


@main.command()
@click.argument("run")
@system_option
@click.option("--grace", default=3.0, show_default=True, help="seconds between TERM and KILL")
@_handled
def cancel(run: str, system: str, grace: float) -> None:
    """Stop a running run's processes and record it CANCELLED."""
    found = _run(run, system)
    if not (found.system and found.system.executes) and not _on_this_machine(found):
        _fail(
            f"cannot cancel {found.url}: {found.system.name if found.system else 'its store'}"
            " only stores runs; cancel it on the system that runs it (-s CLUSTER, or here)"
        )
    status = found.cancel(grace=grace)
    click.echo(f"{found.name}: {status}")


@main.command()
@click.argument("src")
@click.argument("dst")
@system_option
@click.option("--overwrite", is_flag=True, help="replace another run of the name at DST")
@click.option("--wait", is_flag=True, help="wait for a running run to finish first")
@_handled
def cp(src: str, dst: str, system: str, overwrite: bool, wait: bool) -> None:
    """Copy the run SRC (a name on --system, or a run folder URL) to DST (a SYSTEM, or a
    run folder URL ending in the run's name)."""
    found = _run(src, system)
    from remoterun.systems import saved_cluster

    target: Any = dst
    if saved_cluster(dst) is not None:
        target = rr.cluster(dst)
    copied = found.to(target, wait=wait, overwrite=overwrite, progress=None)
    click.echo(copied.url)


@main.command()
@click.argument("run")
@system_option
@click.option("--force", is_flag=True, help="remove it even while it is RUNNING")
@_handled
def rm(run: str, system: str, force: bool) -> None:
    """Remove a run's folder (with its earlier attempts).

    Only a remoterun run's folder is removed: one whose config.json is a run's record
    of the folder's own name. Anything else is refused, --force or not."""
    try:
        found = _run(run, system)
    except CorruptRunError as exc:
        _fail(f"{exc}; nothing was removed")
    status = found.status
    if not status.terminal and not force:
        _fail(f"run {found.name!r} is {status}: cancel it first, or pass --force")
    try:
        found.folder.remove()
    except FileNotFoundError:
        raise RunNotFoundError(f"no run at {found.url}") from None
    click.echo(f"removed {found.url}")


@main.command()
@click.option("--timeout", default=5.0, show_default=True, help="seconds to wait per host")
@_handled
def clusters(timeout: float) -> None:
    """The clusters saved on this machine, and whether each answers."""
    from remoterun.systems import saved_cluster, saved_clusters

    rows = []
    for name in saved_clusters():
        options = saved_cluster(name) or {}
        hosts = options.get("hosts") or [options.get("host") or name]
        try:
            cluster = rr.cluster(name, **{**options, "connect_timeout": timeout})
            cluster.parallelism()
            state = "answers"
            cluster.close()
        except RemoterunError as exc:
            state = f"no answer: {str(exc).splitlines()[0]}"
        rows.append([name, ", ".join(str(h) for h in hosts), state])
    _table(["cluster", "hosts", "state"], rows)


@main.command()
@click.option("--force", is_flag=True, help="replace an existing key file")
@click.option(
    "--path",
    type=click.Path(dir_okay=False),
    default=None,
    help="where to write it  [default: $REMOTERUN_HOME/signing.key]",
)
@_handled
def keygen(force: bool, path: str | None) -> None:
    """Write a new team signing key, readable by you only.

    Runs are signed with it, and runs taken from a shared store are trusted only when
    signed with it: give the same key to everyone who shares runs with you. Replacing
    it (--force) makes the runs signed with the old one untrusted."""
    target = os.path.abspath(os.path.expanduser(path or integrity.key_file()))
    try:
        written = integrity.write_key_file(target, force=force)
    except FileExistsError:
        _fail(
            f"{target} exists already: keep it, or pass --force to replace it (runs "
            "signed with the old key would no longer be trusted)"
        )
    except OSError as exc:
        _fail(f"cannot write {target}: {exc}")
    click.echo(written)
    click.echo(
        "share this file with your team, e.g. as REMOTERUN_SIGNING_KEY; never commit it",
        err=True,
    )
    if os.environ.get(integrity.KEY_ENV):
        click.echo(
            f"note: ${integrity.KEY_ENV} is set here, and is used instead of any key file",
            err=True,
        )


@main.command()
@click.argument("systems", metavar="[SYSTEM]...", nargs=-1)
@click.option("--port", default=0, show_default="a free one", help="port on 127.0.0.1")
@click.option("--no-browser", is_flag=True, help="print the link only; open no browser")
@click.option(
    "--allow-actions", is_flag=True, help="allow cancel, re-run and copy (each asks first)"
)
@_handled
def ui(systems: tuple[str, ...], port: int, no_browser: bool, allow_actions: bool) -> None:
    """Browse the runs of SYSTEMs (default: here) in a web page: runs with live
    statuses, one run's record and live logs, metric plots, lineage graphs.

    It is served on 127.0.0.1 only, behind a random token in the link it prints (and
    opens), and is read-only unless --allow-actions. Ctrl-C stops it."""
    try:
        from remoterun.ui.server import serve
    except ImportError as exc:
        _fail(f"remoterun ui needs the ui extra: pip install 'remoterun[ui]' ({exc})")
    from remoterun.systems import saved_cluster

    def destination(spec: str) -> Any:
        return rr.cluster(spec) if saved_cluster(spec) is not None else spec

    opened = [(spec, _system(spec)) for spec in systems or ("here",)]
    try:
        serve(
            opened,
            port=port,
            open_browser=not no_browser,
            allow_actions=allow_actions,
            resolve=destination,
            echo=click.echo,
        )
    except KeyboardInterrupt:  # Ctrl-C is how it is stopped
        click.echo("remoterun ui stopped")


def _on_this_machine(run: rr.Run) -> bool:
    return run.folder.local


if __name__ == "__main__":  # pragma: no cover
    main()
