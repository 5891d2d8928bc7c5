"""Lineage: which runs a run produced and which finished runs it used.

A run that executes (a recorded function, or a ``with rr.run(...)`` block) links the runs
it touches in its own record: ``downstream`` lists the runs it started (each of them
names it as ``parent``), ``upstream`` the finished runs whose results it used (cache
hits, shared-store hits, results it read, runs passed as arguments). ``links`` keeps
both in the order they happened, with the attempt of each linked run.

Why the graph has no cycle. A "used" edge U → O is written only while O is RUNNING and
U is COMPLETED, so U ended before O ends: along used edges end times strictly increase.
A "produced" edge P → C is written when C is started by P and C's record names P as its
one parent, so produced edges form a forest. Links name attempts, so a name executed
again is another node.

Links are URLs. A ``file://`` link means a path on the machine that holds the record
holding it (the host that ran the run), and on this machine when it is not found there.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

from . import registry
from .agent import layout
from .agent.procs import HOSTNAME
from .agent.runfolder import RunFolder
from .errors import RemoterunError, RunNotFoundError
from .folder import LOCAL, folder_protocols, open_folder, storage_options_of

# Runs are handled through their public surface, and the handles a record links to are
# made with ``holder.at(folder, system)``: this module sits below ``run``.
Run = Any

USED = "used"
PRODUCED = "produced"

# --------------------------------------------------------------------------- recording


def note(kind: str, run: Run, attempt: int | None = None, *, outer: Run | None) -> None:
    """Link ``run`` to ``outer`` (the run executing this code, if any), as ``used`` or
    ``produced``.

    A run is never linked to itself; a run the current run produced is not linked again
    as used (its parent link says it already). A link already made costs nothing; one
    that cannot be written is logged, never raised: the work it records has happened.
    """
    if outer is None:
        return
    url = run.url
    if url == outer.url:
        return
    if attempt is None:
        attempt = (run.known_config or {}).get("attempt")
    key = (outer.execution, url, attempt, kind)
    if key in _noted:
        return

    try:
        outer.update_record(lambda record: record.link(url, kind, attempt))
    except (RemoterunError, OSError) as exc:
        import logging

        logging.getLogger(__name__).warning(
            "could not link run %s to run %s as %s: %s", url, outer.url, kind, exc
        )
        return
    if len(_noted) > 10_000:
        _noted.clear()
    _noted.add(key)


# Links this process has written, so that a run that reads the same result again and
# again (a hit in a loop) rewrites its record once, not each time.
_noted: set[tuple] = set()


def record_fields(used: list[tuple[str, int | None]]) -> dict[str, Any]:
    """The ``upstream``/``links`` fields of a new run's record that used these runs."""
    links = [{"url": url, "kind": USED, "attempt": attempt} for url, attempt in used]
    return {"upstream": list(dict.fromkeys(url for url, _ in used)), "links": links}


def check_not_self(run: Run, outer: Run | None) -> None:
    """Refuse to wait for the run executing this very code (``outer``): it would wait
    forever."""
    if outer is not None and outer.url == run.url and not run.done():
        raise RemoterunError(
            f"run {run.name!r} cannot wait for itself: it is the run executing this code. "
            "Call the function under another run_name"
        )


# --------------------------------------------------------------------------- resolving


def resolve(holder: Run, url: str, attempt: int | None = None) -> Run | None:
    """The Run a link in ``holder``'s record names, at its attempt; None when it cannot be
    reached from here (an SSH host no open cluster connects to)."""
    scheme, _, rest = url.partition("://")
    if not rest:
        scheme, rest = "file", url
    name = posixpath.basename(rest.rstrip("/"))
    try:
        layout.check_run_name(name)
    except ValueError:
        return None
    run: Run | None = None
    if scheme == "file":
        path = "/" + rest.lstrip("/")
        host = _host_of(holder)
        if host is not None:  # a path on the host that holds the record
            candidate = holder.at(host.folder(name, posixpath.dirname(path)), host)
            try:
                if candidate.folder.exists():
                    run = candidate
            except RemoterunError:  # not readable there: written by a client
                pass
        system = holder.system
        shared = getattr(system, "root_is_shared", False)
        # A root every node and the client read (Ray): a path under it is that run.
        if run is None and shared and path.startswith(system.root.rstrip("/") + "/"):
            run = holder.at(system.folder(name, posixpath.dirname(path)), system)
        if run is None:  # on this machine: only a record written here
            local = _at_attempt(holder.at(RunFolder(LOCAL, path)), attempt)
            host = (local.known_config or {}).get("host")
            return local if host in (None, _this_host()) else None
    elif scheme == "ssh":
        host = _open_host(holder, rest.split("/", 1)[0])
        if host is None:
            return None
        run = holder.at(host.folder(name, "/" + posixpath.dirname(rest.split("/", 1)[1])), host)
    elif scheme in _STORES:
        options = storage_options_of(holder.folder)
        same = scheme in folder_protocols(holder.folder)
        run = holder.at(open_folder(url, **(options if same else {})))
    else:  # a link never makes remoterun reach out to an arbitrary kind of URL
        return None
    return _at_attempt(run, attempt)


def _this_host() -> str:
    return HOSTNAME


def _host_of(holder: Run) -> Any:
    """The SSH host that holds ``holder``'s folder, if it is on one: its system's, or for
    a run loaded by an ``ssh://`` URL, the host that URL was opened through."""
    system = holder.system
    if system is not None and system.executes and hasattr(system, "host_label"):
        return None if holder.folder.local else system
    scheme, _, rest = holder.url.partition("://")
    return registry.open_host(rest.split("/", 1)[0]) if scheme == "ssh" else None


# Where a link may point besides file:// and ssh://: stores that hold runs.
_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


def _open_host(holder: Run, label: str) -> Any:
    host = _host_of(holder)
    if host is not None and host.host_label() == label:
        return host
    return registry.open_host(label)


def _at_attempt(run: Run, attempt: int | None) -> Run:
    """The run at that attempt, its record read: its own folder while the attempt is
    current, else the archived ``attempts/<n>/``."""
    config = run.folder.read_record()
    if attempt is not None and config is not None and config.attempt not in (attempt, None):
        archived_folder = run.folder.attempt(attempt)
        archived = run.at(archived_folder, None, archived_folder.read_record())
        if archived.known_config is not None:
            return archived
    return run.at(run.folder, run.system, config)


def links(run: Run, kind: str | None = None) -> Iterator[tuple[str, str, int | None]]:
    """``(kind, url, attempt)`` of each link in the run's record, in order."""
    config = run.config
    seen = set()
    for link in config.get("links") or ():
        if kind is None or link.get("kind") == kind:
            seen.add(link.get("url"))
            yield link.get("kind"), link.get("url"), link.get("attempt")
    # Records written without "links" (by hand, or older) still list their URLs.
    for key, link_kind in (("downstream", PRODUCED), ("upstream", USED)):
        if kind is None or kind == link_kind:
            for url in config.get(key) or ():
                if url not in seen:
                    yield link_kind, url, None


def linked(run: Run, kind: str | None = None) -> list[Run]:
    """The runs of the run's links, in order; links that cannot be reached are left out."""
    found = []
    for _, url, attempt in links(run, kind):
        other = resolve(run, url, attempt)
        if other is not None and other.known_config is not None:
            found.append(other)
    return found


def steps(run: Run) -> list[Run]:
    """Every run the run produced or used, and through the runs it produced, theirs:
    depth first, in the order they were linked."""
    found: list[Run] = []
    seen = {run.url}

    def visit(current: Run) -> None:
        for kind, url, attempt in links(current):
            other = resolve(current, url, attempt)
            if other is None or other.known_config is None or other.url in seen:
                continue
            seen.add(other.url)
            found.append(other)
            if kind == PRODUCED:
                visit(other)

    visit(run)
    return found


def find_step(run: Run, name: str) -> Run:
    """The step (see ``steps``) whose run name is ``name``, else the only step of the
    function ``name``."""
    all_steps = steps(run)
    for step in all_steps:
        if step.name == name:
            return step
    of_function = [s for s in all_steps if s.config.fn_name == name]
    if len(of_function) == 1:
        return of_function[0]
    if of_function:
        names = ", ".join(s.name for s in of_function)
        raise RemoterunError(
            f"run {run.name!r} has {len(of_function)} steps of {name!r} ({names}): "
            "ask for one by its run name"
        )
    known = ", ".join(s.name for s in all_steps) or "none"
    raise RunNotFoundError(f"run {run.name!r} has no step named {name!r} (its steps: {known})")


# --------------------------------------------------------------------------- the graph


class RunGraph:
    """The runs linked to a run: ``nodes`` (URL → Run) and ``edges``, each
    ``(from_url, to_url, kind)`` with kind ``"produced"`` (a run started another) or
    ``"used"`` (a run used another's result)."""

    def __init__(self, root: Run, nodes: dict[str, Run], edges: list[tuple[str, str, str]]):
        self.root = root
        self.nodes = nodes
        self.edges = edges

    def __repr__(self) -> str:
        return f"<RunGraph of {self.root.name!r}: {len(self.nodes)} runs, {len(self.edges)} links>"

    def __str__(self) -> str:
        lines = [f"{_label(run)}" for run in self.nodes.values()]
        names = {url: run.name for url, run in self.nodes.items()}
        for src, dst, kind in self.edges:
            arrow = "--produced-->" if kind == PRODUCED else "--used by-->"
            lines.append(f"  {names.get(src, src)} {arrow} {names.get(dst, dst)}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """The graph in Graphviz's dot language: produced links dashed, used links solid."""
        ids = {url: f"n{i}" for i, url in enumerate(self.nodes)}
        out = ["digraph runs {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
        for url, run in self.nodes.items():
            status = run.config.get("status", "?")
            label = f"{run.name}\\n{run.config.fn_name or run.config.get('run_type', '')}"
            out.append(
                f'  {ids[url]} [label="{_dot_escape(label)}\\n{status}", '
                f'color="{_COLORS.get(status, "black")}", tooltip="{_dot_escape(url)}"];'
            )
        for src, dst, kind in self.edges:
            style = "dashed" if kind == PRODUCED else "solid"
            out.append(f'  {ids[src]} -> {ids[dst]} [style={style}, label="{kind}"];')
        out.append("}")
        return "\n".join(out) + "\n"


_COLORS = {"COMPLETED": "darkgreen", "FAILED": "red", "CANCELLED": "gray", "RUNNING": "blue"}


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n")


def _label(run: Run) -> str:
    config = run.config
    what = config.fn_name or config.run_type or "?"
    return f"{run.name} [{what}, {config.get('status', 'unknown')}]"


def graph(run: Run, max_runs: int = 1000) -> RunGraph:
    """Walk the links of ``run`` (the runs it produced and the runs it used) and of every
    run they reach, transitively, up to ``max_runs`` runs. Parents are not followed: the
    graph of a step is the step and what it touched; ask its ``parent()`` for more.
    Links that cannot be reached from here are left out."""
    nodes: dict[str, Run] = {run.url: run}
    edges: list[tuple[str, str, str]] = []
    queue = [run]
    while queue:
        current = queue.pop(0)
        for kind, url, attempt in links(current):
            other = resolve(current, url, attempt)
            if other is None or other.known_config is None:
                continue
            if other.url not in nodes:
                if len(nodes) >= max_runs:
                    continue
                nodes[other.url] = other
                queue.append(other)
            other = nodes[other.url]
            if kind == PRODUCED:
                edge = (current.url, other.url, kind)
            else:
                edge = (other.url, current.url, kind)
            if edge not in edges:
                edges.append(edge)
    return RunGraph(run, nodes, edges)
