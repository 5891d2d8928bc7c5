"""Measures on this machine: remoterun's local system against local baselines.

Baselines: the raw pipe floor (``floors.pipe_worker``), a naive ``subprocess.run`` per
call, ``ProcessPoolExecutor`` for map, joblib.Memory and execnet in their own venvs.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import cloudpickle
import floors
import peers
import tasks
from harness import (
    Context,
    Row,
    Stats,
    as_rate,
    at_most,
    baseline_row,
    measure,
    measure_pair,
    side_by_side,
    stats_of,
)

import remoterun as rr

MAP_ITEMS = 2000

# The naive way: a new interpreter per call, the call cloudpickled (base64) on its argv.
NAIVE = (
    "import base64, sys, cloudpickle; "
    "f, a = cloudpickle.loads(base64.b64decode(sys.argv[1])); "
    "sys.stdout.write(base64.b64encode(cloudpickle.dumps(f(*a))).decode())"
)


def pickled_call(fn: Callable, *args: Any) -> str:
    """``(fn, args)`` cloudpickled by value and base64-encoded, for a command line."""
    return base64.b64encode(floors.dumps_call(fn, args)).decode()


def naive_local_call() -> int:
    """One call in a fresh ``python -c`` (cloudpickle), as a script without a worker would."""
    out = subprocess.run(
        [sys.executable, "-c", NAIVE, pickled_call(tasks.inc, 1)],
        capture_output=True,
        check=True,
    ).stdout
    return cloudpickle.loads(base64.b64decode(out))


def pipe_floor(ctx: Context) -> floors.FrameWorker:
    def start() -> tuple[floors.FrameWorker, Callable[[], None]]:
        worker = floors.pipe_worker()
        assert worker.call(tasks.inc, 1) == 2
        return worker, worker.close

    return ctx.resource("pipe-floor", start)


def naive_local(ctx: Context) -> Stats:
    return ctx.once(
        "naive-local",
        lambda: measure(naive_local_call, ctx.n(30, 6), warmup=2),
    )


def execnet_popen(ctx: Context) -> dict[str, Any]:
    n = ctx.n(1000, 200)
    return ctx.once(
        "execnet-popen", lambda: peers.run_peer("execnet", "peer_execnet.py", "--n", str(n))
    )


# ---------------------------------------------------------------------------- measures


def local_sync(ctx: Context) -> list[Row]:
    """Synchronous call of a trivial function: ``rr.function(f)(1)``."""
    n = ctx.n(3000, 500)

    def rr_call() -> Callable[[], Any]:
        f = rr.function(tasks.inc)
        return lambda: f(1)

    rr_stats, note, floor = side_by_side(
        rr_call, lambda: pipe_floor(ctx).call(tasks.inc, 1), n, warmup=50
    )
    name = "local: sync call"
    return [
        baseline_row(name, "s", rr_stats, "raw pipe floor (cloudpickled call)", floor, None, note),
        baseline_row(
            name, "s", rr_stats, "naive subprocess.run per call", lambda: naive_local(ctx)
        ),
        baseline_row(
            name,
            "s",
            rr_stats,
            "execnet popen channel",
            lambda: stats_of(execnet_popen(ctx)["calls"]),
        ),
    ]


def local_recorded(ctx: Context) -> list[Row]:
    """Recorded run, start to result: ``f(1, run_name=unique)``."""
    f = rr.function(tasks.inc)
    names = (f"{ctx.prefix}-rec-{i}" for i in range(10_000))
    rr_stats = measure(lambda: f(1, run_name=next(names)), ctx.n(100, 15), warmup=3)
    return [
        baseline_row(
            "local: recorded run",
            "s",
            rr_stats,
            "naive subprocess.run per call",
            lambda: naive_local(ctx),
            at_most(5e-3, "≤ 5 ms"),
        )
    ]


def local_hit(ctx: Context) -> list[Row]:
    """``get_or_call`` hit after one execution."""
    f = rr.function(tasks.inc)
    name = f"{ctx.prefix}-hit"
    f.get_or_call(1, run_name=name)
    n = ctx.n(2000, 300)
    rr_stats = measure(lambda: f.get_or_call(1, run_name=name), n, warmup=20)

    def joblib_hit() -> Stats:
        data = peers.run_peer("joblib", "peer_joblib.py", "--n", str(n))
        return stats_of(data["samples"])

    return [
        baseline_row(
            "local: get_or_call hit",
            "s",
            rr_stats,
            "joblib.Memory hit",
            joblib_hit,
            at_most(0.3e-3, "≤ 0.3 ms"),
        )
    ]


def local_map(ctx: Context) -> list[Row]:
    """``fn.map`` of 2,000 trivial calls, in calls/s."""
    f = rr.function(tasks.inc)
    items = list(range(MAP_ITEMS))
    n = ctx.n(7, 3)
    rr_stats = as_rate(measure(lambda: f.map(items), n, warmup=1), MAP_ITEMS)

    def floor() -> Stats:
        worker = pipe_floor(ctx)
        return as_rate(
            measure(lambda: [worker.call(tasks.inc, i) for i in items], n, warmup=1), MAP_ITEMS
        )

    def pool() -> Stats:
        with ProcessPoolExecutor(2) as executor:
            return as_rate(
                measure(lambda: list(executor.map(tasks.inc, items, chunksize=64)), n, 1),
                MAP_ITEMS,
            )

    name = f"local: map {MAP_ITEMS:,} calls"
    return [
        baseline_row(name, "calls/s", rr_stats, "raw pipe floor, one call at a time", floor),
        baseline_row(name, "calls/s", rr_stats, "ProcessPoolExecutor(2).map, chunks of 64", pool),
    ]


def local_import(ctx: Context) -> list[Row]:
    """``python -c "import remoterun"`` minus ``python -c pass`` (medians, interleaved)."""
    runs, warmup = ctx.n(15, 6), 2
    bare: list[float] = []
    full: list[float] = []
    # As installed: bytecode cached (the warm-up runs write it, whatever this shell says).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for i in range(warmup + runs):
        for code, samples in (("pass", bare), ("import remoterun", full)):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    bare_stats, full_stats = stats_of(bare), stats_of(full)
    over = Stats(full_stats.median - bare_stats.median, full_stats.p90 - bare_stats.median, runs)
    row = Row(
        "import remoterun, over bare python",
        "s",
        rr=over,
        baseline="bare `python -c pass`",
        base=bare_stats,
        target=at_most(60e-3, "≤ 60 ms over bare"),
        extra={"with_import_median": full_stats.median},
    )
    return [row]


def local_digest(ctx: Context) -> list[Row]:
    """What checking digests costs (issue 10): the SHA-256 check of a 10 MB result
    against unpickling it, and a ``get_or_call`` hit that returns those 10 MB (digest
    checked) against reading ``result.pkl`` and unpickling it with nothing checked."""
    from remoterun.agent import integrity

    f = rr.function(tasks.zeros)
    name = f"{ctx.prefix}-digest"
    f.get_or_call(10_000_000, run_name=name)
    run = rr.local().get_run(name)
    path = os.path.join(run.folder.path, "result.pkl")
    with open(path, "rb") as fh:
        data = fh.read()
    n = ctx.n(60, 15)
    check = measure(lambda: integrity.digest_problem(run.config, "result.pkl", data), n)

    def read_and_load() -> Any:
        with open(path, "rb") as fh:
            return cloudpickle.loads(fh.read())

    hit, plain = measure_pair(lambda: f.get_or_call(10_000_000, run_name=name), read_and_load, n)
    return [
        baseline_row(
            "local: SHA-256 check of a 10 MB result",
            "s",
            check,
            "cloudpickle.loads of the same bytes",
            lambda: measure(lambda: cloudpickle.loads(data), n),
        ),
        baseline_row(
            "local: get_or_call hit, 10 MB result (digest checked)",
            "s",
            hit,
            "read result.pkl + cloudpickle.loads, unchecked",
            lambda: plain,
        ),
    ]


MEASURES: dict[str, Callable[[Context], list[Row]]] = {
    "local.sync": local_sync,
    "local.recorded": local_recorded,
    "local.hit": local_hit,
    "local.map": local_map,
    "local.import": local_import,
    "local.digest": local_digest,
}
