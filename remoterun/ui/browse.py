"""What the run browser shows, as JSON-ready dicts: no web server here.

A ``Browser`` holds the run stores it was given (a system, or each host of a cluster,
through that system's own connection) and answers the page's questions: a page of runs
(filtered, sorted), one run's record and logs, metrics, a lineage graph, and, when
allowed, the actions. Nothing here unpickles a run's pickles: the page shows records,
logs and metrics, which are JSON and text, and a summary of the inputs read from the
pickle's opcodes (``pickletools``), which runs no code of the pickle's.

A large store is shown page by page: its listing is one request, and only the records
of the page asked for are read before the answer; the others are read in the background,
so the first page of 10,000 runs comes at once and the whole table sorts once all are in.
"""

from __future__ import annotations

import datetime
import io
import logging
import pickletools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..agent.record import TERMINAL
from ..errors import RemoterunError, RunNotFoundError
from ..folder import storage_reason
from ..run import Run

logger = logging.getLogger(__name__)

#: How long a store's listing is reused before it is listed again (new runs appear), at
#: least; a store whose listing is slow (10,000 runs on S3) is listed LIST_SLOWDOWN times
#: less often than it takes.
LIST_EVERY = 2.0
LIST_SLOWDOWN = 10
#: Records read in one batch, in the background, after the first page.
BATCH = 200
#: The most of a log one answer carries.
LOG_CHUNK = 1 << 20
#: The most runs one lineage graph walks.
GRAPH_MAX = 300
SORT_KEYS = ("name", "status", "function", "host", "start", "duration", "source")

ACTIONS = ("cancel", "rerun", "copy")


class ActionRefused(RemoterunError):
    """An action the server was not started to allow, or one not confirmed."""


@dataclass
class Source:
    """One run store the page shows: a system (one host of a cluster) and its label."""

    key: str
    label: str
    system: Any
    names: list[str] | None = None
    listed_at: float = 0.0
    listing_took: float = 0.0
    summaries: dict[str, dict] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    filling: bool = False
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.names is not None and all(n in self.summaries for n in self.names)


def sources_of(systems: list[tuple[str, Any]]) -> list[Source]:
    """A Source for each system, or for each host of a cluster of several."""
    found = []
    for i, (label, system) in enumerate(systems):
        hosts = getattr(system, "hosts", None)
        if hosts and len(hosts) > 1:
            for j, host in enumerate(hosts):
                found.append(Source(f"{i}.{j}", f"{label} ({host.host_label()})", host))
        else:
            found.append(Source(str(i), label, system))
    return found


class Browser:
    """The run browser's answers over ``systems`` (label, System) pairs.

    ``allow_actions``: whether cancel, re-run and copy may be asked for at all.
    """

    def __init__(self, systems: list[tuple[str, Any]], *, allow_actions: bool = False):
        self.sources = sources_of(systems)
        self.allow_actions = allow_actions
        self._by_key = {s.key: s for s in self.sources}
        # Runs reached through lineage graphs, by URL: only these may be opened by URL.
        self._linked: dict[str, Run] = {}
        self._linked_lock = threading.Lock()
        self._closed = threading.Event()
        self._fillers: list[threading.Thread] = []

    def close(self) -> None:
        """Stop reading records in the background (after the batch being read)."""
        self._closed.set()
        for filler in self._fillers:
            filler.join(timeout=60)

    # ------------------------------------------------------------------ the runs

    def runs(
        self,
        *,
        offset: int = 0,
        limit: int = 50,
        sort: str = "start",
        desc: bool = True,
        status: str = "",
        query: str = "",
    ) -> dict:
        """A page of runs: ``{"runs": [...], "total", "known", "complete", ...}``.

        Until every record of a store is read, the page is made of the records read so
        far (at least as many as the page needs, read now, in listing order) and
        ``complete`` is false: ask again for the whole table's order.
        """
        limit = max(1, min(int(limit), 500))
        offset = max(0, int(offset))
        sort = sort if sort in SORT_KEYS else "start"
        problems = []
        for source in self.sources:
            try:
                self._list(source)
                self._read_some(source, offset + limit)
                if not source.complete:  # after the page's own records: no contention
                    self._fill_in_background(source)
            except Exception as exc:  # one store's failure is that store's only
                source.problem = f"{source.label}: {_one_line(exc)}"
            if source.problem:
                problems.append(source.problem)
        rows = [row for s in self.sources for row in list(s.summaries.values())]
        total = sum(len(s.names or ()) for s in self.sources)
        wanted = status.upper()
        needle = query.strip().lower()
        if wanted:
            rows = [r for r in rows if r["status"] == wanted]
        if needle:
            rows = [r for r in rows if needle in _haystack(r)]
        rows.sort(key=_sort_key(sort), reverse=desc)
        page = rows[offset : offset + limit]
        self._refresh_going(page)
        return {
            "runs": page,
            "matching": len(rows),
            "total": total,
            "known": sum(len(s.summaries) for s in self.sources),
            "complete": all(s.complete for s in self.sources),
            "problems": problems,
            "sources": [{"key": s.key, "label": s.label} for s in self.sources],
        }

    def _list(self, source: Source) -> None:
        """List the store again when its listing is older than LIST_EVERY."""
        every = max(LIST_EVERY, LIST_SLOWDOWN * source.listing_took)
        if source.names is not None and time.monotonic() - source.listed_at < every:
            return
        start = time.monotonic()
        names = source.system.run_names()
        with source.lock:
            source.names = names
            source.listed_at = time.monotonic()
            source.listing_took = source.listed_at - start
            source.problem = None
            present = set(names)
            for gone in [n for n in source.summaries if n not in present]:
                del source.summaries[gone]

    def _read_some(self, source: Source, count: int) -> None:
        """Make sure at least ``count`` records of the store are read (in listing order)."""
        missing = [n for n in source.names or () if n not in source.summaries]
        need = count - len(source.summaries)
        if need > 0 and missing:
            self._read(source, missing[:need])

    def _read(self, source: Source, names: list[str]) -> None:
        runs = source.system.read_runs(names)
        with source.lock:
            for run in runs:
                source.summaries[run.name] = summary(run, source)

    def _fill_in_background(self, source: Source) -> None:
        with source.lock:
            if source.filling:
                return
            source.filling = True

        def fill() -> None:
            try:
                while not self._closed.is_set():
                    missing = [n for n in source.names or () if n not in source.summaries]
                    if not missing:
                        return
                    self._read(source, missing[:BATCH])
            except Exception as exc:
                source.problem = f"{source.label}: {_one_line(exc)}"
                logger.warning("cannot read the runs of %s: %s", source.label, exc)
            finally:
                source.filling = False

        filler = threading.Thread(target=fill, name=f"remoterun-ui-fill-{source.key}", daemon=True)
        self._fillers.append(filler)
        filler.start()

    def _refresh_going(self, rows: list[dict]) -> None:
        """Read again the records of the rows not finished yet (finding out a dead
        worker), so that a status changes on the page without a reload."""
        going: dict[str, list[str]] = {}
        for row in rows:
            if row["status"] not in TERMINAL:
                going.setdefault(row["source"], []).append(row["name"])
        for key, names in going.items():
            source = self._by_key[key]
            try:
                self._read(source, names)
            except Exception as exc:
                source.problem = f"{source.label}: {_one_line(exc)}"
                continue
            fresh = source.summaries
            for row in rows:
                if row["source"] == key and row["name"] in fresh:
                    row.update(fresh[row["name"]])

    # ------------------------------------------------------------------ one run

    def handle(self, key: str | None, name: str | None, url: str | None = None) -> Run:
        """The run the page names: by store and name, or by the URL of a run that a
        lineage graph reached. RunNotFoundError for anything else."""
        if url:
            with self._linked_lock:
                found = self._linked.get(url)
            if found is None:
                raise RunNotFoundError(f"no run at {url} in a graph shown here")
            return found
        source = self._by_key.get(key or "")
        if source is None or not name:
            raise RunNotFoundError(f"no store {key!r} here")
        return Run(source.system.folder(name), source.system)

    def run(self, key: str | None, name: str | None, url: str | None = None) -> dict:
        """One run: record, params, tags, metrics, inputs summary, attempts, error."""
        found = self.handle(key, name, url)
        config = found.refresh().config
        if not config:
            raise RunNotFoundError(f"no run at {found.url}")
        attempts = []
        for earlier in found.attempts():
            record = earlier.config
            attempts.append(
                {
                    "attempt": record.attempt,
                    "status": record.status,
                    "start": record.start_time,
                    "end": record.end_time,
                    "error": record.error,
                    "url": earlier.url,
                }
            )
        return {
            "name": found.name,
            "url": found.url,
            "source": key,
            "status": config.status,
            "terminal": config.terminal,
            "function": config.fn_qualname or config.fn_name or config.run_type,
            "host": config.host,
            "start": config.start_time,
            "end": config.end_time,
            "duration": _duration(config),
            "attempt": config.attempt,
            "params": config.params,
            "tags": config.tags,
            "metrics": sorted(config.metrics),
            "error": config.error,
            "error_type": config.get("error_type"),
            "traceback": config.error_traceback,
            "parent": config.parent,
            "upstream": list(config.get("upstream") or []),
            "downstream": list(config.get("downstream") or []),
            "inputs": inputs_summary(found),
            "attempts": attempts,
            "record": config,
            "actions": list(ACTIONS) if self.allow_actions else [],
        }

    def log(self, key: str | None, name: str | None, stream: str, offset: int, url=None) -> dict:
        """The ``stream`` log from ``offset``: whole lines while the run goes on (the
        rest once it is over), and the offset to ask from next."""
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
        found = self.handle(key, name, url)
        status = found.refresh().config.status  # before reading: nothing is missed
        data = found.folder.read_log(stream, max(0, int(offset)))[:LOG_CHUNK]
        terminal = status in TERMINAL
        if not terminal and len(data) < LOG_CHUNK:
            data = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        return {
            "text": data.decode("utf-8", "replace"),
            "offset": int(offset) + len(data),
            "status": status,
            "terminal": terminal and len(data) < LOG_CHUNK,
        }

    def metrics(self, refs: list[tuple[str, str]]) -> dict:
        """The metrics of each run: ``{"runs": [{"name", "source", "metrics": {key:
        {"steps": [...], "values": [...]}}}]}``; single numbers are ``"value"``."""
        out = []
        for key, name in refs:
            found = self.handle(key, name)
            config = found.refresh().config
            series: dict[str, Any] = {}
            steps_of = config.get("metric_steps") or {}
            for metric, values in config.metrics.items():
                if not isinstance(values, list):
                    series[metric] = {"value": _number(values)}
                    continue
                steps = steps_of.get(metric) or []
                xs = [
                    steps[i] if i < len(steps) and steps[i] is not None else i
                    for i in range(len(values))
                ]
                series[metric] = {"steps": xs, "values": [_number(v) for v in values]}
            out.append(
                {"name": found.name, "source": key, "status": config.status, "metrics": series}
            )
        return {"runs": out}

    def graph(self, key: str | None, name: str | None, url: str | None = None) -> dict:
        """The run's lineage graph: nodes (name, status, function, how to open it) and
        edges ``{"from", "to", "kind"}``."""
        found = self.handle(key, name, url)
        linked = found.graph(max_runs=GRAPH_MAX)
        nodes = []
        for node_url, run in linked.nodes.items():
            config = run.config
            ref = self._ref_of(run)
            if ref is None:
                with self._linked_lock:
                    self._linked[node_url] = run
            nodes.append(
                {
                    "id": node_url,
                    "name": run.name,
                    "status": config.get("status", "?"),
                    "function": config.fn_name or config.run_type,
                    "source": ref[0] if ref else None,
                    "url": node_url,
                    "root": node_url == found.url,
                }
            )
        edges = [{"from": a, "to": b, "kind": kind} for a, b, kind in linked.edges]
        return {"nodes": nodes, "edges": edges}

    def _ref_of(self, run: Run) -> tuple[str, str] | None:
        """(store key, name) when the run's folder is in one of the stores shown."""
        for source in self.sources:
            try:
                if source.system.folder(run.name).url == run.url:
                    return source.key, run.name
            except Exception:
                continue
        return None

    # ------------------------------------------------------------------ actions

    def act(
        self,
        action: str,
        key: str | None,
        name: str | None,
        *,
        confirm: str | None,
        target: str | None = None,
        url: str | None = None,
        resolve: Callable[[str], Any] | None = None,
    ) -> dict:
        """Cancel, re-run or copy a run. ActionRefused unless the browser allows actions
        and ``confirm`` repeats the run's name (the page asks the user first)."""
        if not self.allow_actions:
            raise ActionRefused(
                "this page is read-only: start it with `remoterun ui --allow-actions` to "
                "cancel, re-run or copy runs"
            )
        if action not in ACTIONS:
            raise ActionRefused(f"no action {action!r}; there are {', '.join(ACTIONS)}")
        found = self.handle(key, name, url)
        if confirm != found.name:
            raise ActionRefused(f"{action} of {found.name!r} was not confirmed")
        if action == "cancel":
            return {"status": str(found.cancel())}
        if action == "rerun":
            new = found.rerun()
            return {"name": new.name, "url": new.url, "source": self._ref_of(new)}
        if not target:
            raise ActionRefused("copy needs a destination: a store URL or a system")
        destination = resolve(target) if resolve is not None else target
        copied = found.to(destination, progress=None)
        return {"url": copied.url}


# --------------------------------------------------------------------------- rows


def summary(run: Run, source: Source) -> dict:
    """A run's row in the table."""
    config = run.config
    return {
        "name": run.name,
        "source": source.key,
        "system": source.label,
        "status": config.status,
        "function": config.fn_name or config.run_type or "",
        "host": config.host or "",
        "start": config.start_time or "",
        "end": config.end_time or "",
        "duration": _duration(config),
        "tags": config.tags,
        "error": (config.error or "").splitlines()[0][:200] if config.error else "",
        "metrics": sorted(config.metrics),
    }


def _haystack(row: dict) -> str:
    tags = " ".join(f"{k}={v}" for k, v in row["tags"].items())
    return f"{row['name']} {row['function']} {row['host']} {tags}".lower()


def _sort_key(sort: str) -> Callable[[dict], Any]:
    if sort == "duration":
        return lambda r: (r["duration"] if r["duration"] is not None else -1.0, r["name"])
    field_name = "system" if sort == "source" else sort
    return lambda r: (str(r.get(field_name) or ""), r["name"])


def _duration(config: Any) -> float | None:
    """Seconds from start to end (to now while it goes on); None before it starts."""
    start = _moment(config.start_time)
    if start is None:
        return None
    end = _moment(config.end_time) or datetime.datetime.now(datetime.timezone.utc)
    return max((end - start).total_seconds(), 0.0)


def _moment(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    """A metric value for a plot: NaN and infinities (kept as text) as gaps."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(storage_reason(exc).split())
    return text if isinstance(exc, RemoterunError) else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- inputs


def inputs_summary(run: Run) -> dict:
    """What the run's ``inputs.pkl`` holds, without unpickling it: its size, whether it
    matches the digest its record names, the argument fingerprint, and the classes it
    names (read from its opcodes; no code of the pickle's runs)."""
    config = run.config
    out: dict[str, Any] = {"fingerprint": (config.fingerprint or {}).get("args")}
    try:
        data = run.folder.read_pickle("inputs")
    except Exception as exc:
        out["problem"] = _one_line(exc)
        return out
    if data is None:
        out["present"] = False
        return out
    out.update(present=True, size=len(data))
    try:
        run.folder.check_digest(config, "inputs", data, legacy_ok=True)
        out["digest"] = "matches the record"
    except RemoterunError as exc:
        out["digest"] = str(exc).splitlines()[0]
    out["classes"] = pickle_classes(data)
    return out


def pickle_classes(data: bytes, limit: int = 40) -> list[str]:
    """The ``module.name`` of every global a pickle refers to (its classes and
    functions), in order of first use, read from its opcodes only."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings = [*strings[-1:], str(arg)]
                continue
            if opcode.name == "GLOBAL":
                qualified = str(arg).replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                qualified = ".".join(strings)
            else:
                if opcode.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    strings = []
                continue
            strings = []
            if qualified not in found:
                found.append(qualified)
                if len(found) >= limit:
                    break
    except Exception:  # a damaged pickle: what was read so far
        pass
    return found
