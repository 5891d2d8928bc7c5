"""The measuring harness: timing, statistics, result rows, the table and the JSON file.

Times are kept in seconds and rates in units per second; only the table formats them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# ---------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Median and 90th percentile of ``n`` samples.

    For a rate (calls/s, MB/s) ``p90`` is the rate at the slow end: the rate of the
    90th-percentile duration, so for every measure ``p90`` is the worse tail.
    """

    median: float
    p90: float
    n: int


def percentile(sorted_samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted samples, by linear interpolation."""
    if not sorted_samples:
        raise ValueError("no samples")
    pos = (len(sorted_samples) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_samples[low] + (sorted_samples[high] - sorted_samples[low]) * (pos - low)


def stats_of(samples: list[float]) -> Stats:
    """Stats of durations (seconds)."""
    ordered = sorted(samples)
    return Stats(percentile(ordered, 0.5), percentile(ordered, 0.9), len(ordered))


def measure(fn: Callable[[], Any], n: int, warmup: int = 3) -> Stats:
    """Call ``fn`` ``warmup`` times untimed, then ``n`` times, each timed alone."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return stats_of(samples)


def as_rate(durations: Stats, amount: float) -> Stats:
    """Turn the durations of a batch of ``amount`` units into units per second."""
    return Stats(amount / durations.median, amount / durations.p90, durations.n)


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Target:
    """A SPEC §9 target: its text, and a test on (remoterun, baseline) stats."""

    text: str
    check: Callable[[Stats, Optional[Stats]], Optional[bool]]


def at_most(seconds: float, text: str) -> Target:
    return Target(text, lambda rr, base: rr.median <= seconds)


def at_least(rate: float, text: str) -> Target:
    return Target(text, lambda rr, base: rr.median >= rate)


def ratio_at_least(fraction: float, text: str) -> Target:
    return Target(
        text, lambda rr, base: None if base is None else rr.median / base.median >= fraction
    )


def ratio_at_most(fraction: float, text: str) -> Target:
    return Target(
        text, lambda rr, base: None if base is None else rr.median / base.median <= fraction
    )


@dataclass
class Row:
    """One line of the table: a remoterun measure against one baseline."""

    measure: str
    unit: str  # "s" (lower is better), "calls/s" or "MB/s" (higher is better)
    rr: Stats | None = None
    rr_note: str = ""
    baseline: str = ""
    base: Stats | None = None
    base_note: str = ""
    target: Target | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.rr is None or self.base is None or self.base.median == 0:
            return None
        return self.rr.median / self.base.median

    @property
    def met(self) -> bool | None:
        if self.target is None or self.rr is None:
            return None
        return self.target.check(self.rr, self.base)

    def to_json(self) -> dict[str, Any]:
        def stats(s: Stats | None) -> dict[str, float] | None:
            return None if s is None else {"median": s.median, "p90": s.p90, "n": s.n}

        return {
            "measure": self.measure,
            "unit": self.unit,
            "remoterun": stats(self.rr),
            "remoterun_note": self.rr_note or None,
            "baseline": self.baseline or None,
            "baseline_stats": stats(self.base),
            "baseline_note": self.base_note or None,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "met": self.met,
            **({"extra": self.extra} if self.extra else {}),
        }


# ---------------------------------------------------------------------------- building rows


def short(exc: BaseException) -> str:
    """An exception in one short line, for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:70]


def rr_side(fn: Callable[[], Stats]) -> tuple[Stats | None, str]:
    """Run remoterun's side of a measure: (stats, "") or (None, why not)."""
    try:
        return fn(), ""
    except Exception as exc:  # noqa: BLE001 - the row says why
        if "rr.cluster not available" in str(exc):
            return None, "n/a (rr.cluster not available)"
        return None, f"error ({short(exc)})"


def measure_pair(
    a: Callable[[], Any], b: Callable[[], Any], n: int, warmup: int = 3
) -> tuple[Stats, Stats]:
    """Time ``a`` and ``b`` in alternation, call by call: both see the same load, so
    their ratio holds even on a busy machine."""
    for _ in range(warmup):
        a()
        b()
    samples_a, samples_b = [], []
    for _ in range(n):
        start = time.perf_counter()
        a()
        middle = time.perf_counter()
        b()
        samples_a.append(middle - start)
        samples_b.append(time.perf_counter() - middle)
    return stats_of(samples_a), stats_of(samples_b)


def side_by_side(
    rr_setup: Callable[[], Callable[[], Any]],
    base: Callable[[], Any],
    n: int,
    warmup: int,
) -> tuple[Stats | None, str, Callable[[], Stats]]:
    """remoterun's call (made by ``rr_setup()``) and its floor ``base``, timed by
    ``measure_pair``. Returns remoterun's (stats, note) and a callable giving the floor's
    stats for ``baseline_row``. A side that cannot run is timed apart or noted."""
    try:
        base()
    except Exception as exc:  # noqa: BLE001 - the baseline's row says why
        failed = exc

        def raise_it() -> Stats:
            raise failed

        rr_stats, note = rr_side(lambda: measure(rr_setup(), n, warmup))
        return rr_stats, note, raise_it
    pair: list[Stats] = []

    def both() -> Stats:
        pair.extend(measure_pair(rr_setup(), base, n, warmup))
        return pair[0]

    rr_stats, note = rr_side(both)
    if not pair:
        return rr_stats, note, lambda: measure(base, n, warmup)
    return rr_stats, note, lambda: pair[1]


def baseline_row(
    measure_name: str,
    unit: str,
    rr_stats: Stats | None,
    name: str,
    base: Callable[[], Stats],
    target: Target | None = None,
    rr_note: str = "",
) -> Row:
    """A row whose baseline may fail to run: its failure goes into the row, not up.

    ``rr_note`` says why remoterun's side has no stats (``rr_stats`` None)."""
    row = Row(measure_name, unit, rr=rr_stats, rr_note=rr_note, baseline=name, target=target)
    try:
        row.base = base()
    except Exception as exc:  # noqa: BLE001 - a missing peer is a note in the table
        row.base_note = f"n/a ({short(exc)})"
    return row


# ---------------------------------------------------------------------------- output


def fmt_value(value: float, unit: str) -> str:
    """A duration as ms (µs below 0.1 ms, s above 10 s); a rate with its unit."""
    if unit == "s":
        if value < 1e-4:
            return f"{value * 1e6:.1f} µs"
        if value < 10:
            return f"{value * 1e3:.3g} ms" if value < 1e-2 else f"{value * 1e3:.1f} ms"
        return f"{value:.1f} s"
    return f"{value:,.0f} {unit}"


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = ["measure", "remoterun", "p90", "baseline", "baseline med", "ratio", "target", "met?"]
    lines = [header]
    for row in rows:
        if row.rr is not None:
            rr_med, rr_p90 = fmt_value(row.rr.median, row.unit), fmt_value(row.rr.p90, row.unit)
        else:
            rr_med, rr_p90 = row.rr_note or "-", ""
        base = fmt_value(row.base.median, row.unit) if row.base else (row.base_note or "-")
        ratio = f"{row.ratio:.3g}" if row.ratio is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        target = row.target.text if row.target else "-"
        lines.append([row.measure, rr_med, rr_p90, row.baseline or "-", base, ratio, target, met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(line)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    """Write the rows and facts about this run to ``path`` (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        **meta,
        "rows": [row.to_json() for row in rows],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------- context


class Context:
    """What the measures share: repetition counts, and resources started once, lazily,
    and stopped in reverse order by ``close()`` (servers, workers, clusters)."""

    def __init__(self, quick: bool, prefix: str):
        self.quick = quick
        self.prefix = prefix  # makes this run's run names unique
        self._resources: dict[str, Any] = {}
        self._closers: list[tuple[str, Callable[[], None]]] = []
        self.memo: dict[str, Any] = {}  # baselines measured once, shown in several rows

    def n(self, full: int, quick: int) -> int:
        """A repetition count: ``quick`` under --quick, else ``full``."""
        return quick if self.quick else full

    def resource(self, key: str, start: Callable[[], tuple[Any, Callable[[], None]]]) -> Any:
        """The resource ``key``, started by ``start() -> (value, stop)`` on first use.

        A start that fails is remembered: the next ask raises the same error at once.
        """
        if key not in self._resources:
            try:
                value, stop = start()
            except Exception as exc:
                self._resources[key] = exc
                raise
            self._resources[key] = value
            self._closers.append((key, stop))
        value = self._resources[key]
        if isinstance(value, Exception):
            raise value
        return value

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time, the same value after (errors are remembered)."""
        if key not in self.memo:
            try:
                self.memo[key] = compute()
            except Exception as exc:
                self.memo[key] = exc
        value = self.memo[key]
        if isinstance(value, Exception):
            raise value
        return value

    def close(self) -> None:
        """Stop every resource, newest first; a failing stop does not skip the others."""
        while self._closers:
            key, stop = self._closers.pop()
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - report, go on cleaning up
                print(f"[bench] stopping {key} failed: {exc!r}", file=sys.stderr)
        self._resources.clear()
