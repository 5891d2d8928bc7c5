"""remoterun on Ray against raw Ray, on a real two-node Ray cluster on 127.0.0.1.

    .venv/bin/python bench/ray_rows.py              # ~1-2 min: starts and stops its cluster
    .venv/bin/python bench/ray_rows.py --quick      # fewer samples, 1,000 bulk calls
    .venv/bin/python bench/ray_rows.py --json /tmp/ray_rows.json

The cluster comes from tests/ray_servers.py (one CPU per node). This process is the Ray
driver: ``ray.init(address=..., namespace="remoterun-bench", log_to_driver=False)``; the
Ray system of remoterun reuses that connection. Every row times the same trivial function
(``inc``), defined here, so both sides pickle it by value.

Rows (remoterun | raw Ray baseline):
  sync call            ``fn(x)``                        | ``ray.get(f.remote(x))``
  recorded run         ``fn.run(x, run_name=u).result()`` | ``ray.get(f.remote(x))``
  get_or_call hit      ``fn.get_or_call(x, run_name=n)``  | a synchronous actor call
  bulk / map           ``fn.map(range(N))``            | ``ray.get([f.remote(i) ...])``,
                                                          and tasks of 64 calls each
Times are medians (p90 in brackets) of calls timed one by one after warm-up; rates are
one timed batch. ratio = remoterun / baseline: above 1 means slower for times, faster for
rates. Without ``remoterun.ray`` the remoterun column says n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # ray_servers.py

ROWS: list[dict[str, Any]] = []  # measure, unit, remoterun, baseline (each a result or a note)


def inc(x: int) -> int:
    return x + 1


def _inc_chunk(xs) -> list[int]:
    return [inc(x) for x in xs]


def measure(label: str, fn: Callable[[int], Any], n: int, warmup: int = 20) -> dict[str, float]:
    """Median and p90 of ``fn(i)`` in seconds, over ``n`` calls timed one by one."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    times.sort()
    out = {"median": statistics.median(times), "p90": times[int(0.9 * (n - 1))], "n": n}
    print(f"  {label}: median {out['median'] * 1e3:.2f} ms, p90 {out['p90'] * 1e3:.2f} ms")
    return out


def rate(label: str, batch: Callable[[int], Any], n: int, warmup: int = 200) -> dict[str, float]:
    """Items per second of one ``batch(n)`` (it must process n items), after a small one."""
    batch(min(warmup, n))
    t = time.perf_counter()
    batch(n)
    s = time.perf_counter() - t
    print(f"  {label}: {n} in {s:.2f} s = {n / s:,.0f}/s")
    return {"rate": n / s, "seconds": s, "n": n}


def add_row(measure_name: str, unit: str, remoterun: Any, baseline: Any, base_label: str) -> None:
    ROWS.append(
        {
            "measure": measure_name,
            "unit": unit,
            "remoterun": remoterun,
            "baseline": baseline,
            "baseline_label": base_label,
        }
    )


# --------------------------------------------------------------------------- raw Ray


def raw_ray(n_lat: int, n_bulk: int) -> dict[str, dict]:
    import ray

    f = ray.remote(max_retries=0)(inc)

    @ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
    class Pinger:
        def ping(self, x: int) -> int:
            return x + 1

    print("raw Ray:")
    ray.get([f.remote(i) for i in range(200)])  # start the workers on both nodes
    out = {"sync": measure("ray.get(f.remote(x))", lambda x: ray.get(f.remote(x)), n_lat, 50)}

    def bulk(n: int) -> None:
        assert ray.get([f.remote(i) for i in range(n)]) == [i + 1 for i in range(n)]

    out["bulk"] = rate(f"{n_bulk} tasks submitted in bulk", bulk, n_bulk)
    f_chunk = ray.remote(max_retries=0)(_inc_chunk)

    def chunked(n: int) -> None:
        refs = [f_chunk.remote(range(i, min(i + 64, n))) for i in range(0, n, 64)]
        assert [y for ys in ray.get(refs) for y in ys] == [i + 1 for i in range(n)]

    out["chunked"] = rate(f"{n_bulk} calls in tasks of 64", chunked, n_bulk)
    actor = Pinger.remote()
    ray.get(actor.ping.remote(0))
    out["actor"] = measure("sync actor call", lambda x: ray.get(actor.ping.remote(x)), n_lat, 50)
    ray.kill(actor)
    return out


# --------------------------------------------------------------------------- remoterun


def remoterun_ray(address: str, runs: str, n_lat: int, n_bulk: int) -> dict[str, Any]:
    """remoterun's side; a note (str) instead of numbers where it cannot run yet."""
    try:
        import remoterun as rr
        import remoterun.systems.ray  # noqa: F401

        make_system = rr.ray
    except (ImportError, AttributeError) as exc:
        note = f"n/a (no remoterun.ray yet: {type(exc).__name__})"
        return dict.fromkeys(("sync", "recorded", "hit", "map"), note)

    system = make_system(address=address, runs=runs)
    fn = rr.function(inc, system=system)
    print("remoterun on Ray:")
    out: dict[str, Any] = {}

    def attempt(key: str, thunk: Callable[[], Any]) -> None:
        try:
            out[key] = thunk()
        except Exception as exc:  # the backend is work in progress: keep the other rows
            out[key] = f"error: {type(exc).__name__}: {str(exc)[:60]}"
            print(f"  {key}: {out[key]}")

    attempt("sync", lambda: measure("fn(x)", fn, n_lat))
    tag = uuid.uuid4().hex[:8]
    attempt(
        "recorded",
        lambda: measure(
            "fn.run(x, run_name=unique).result()",
            lambda x: fn.run(x, run_name=f"bench-{tag}-{uuid.uuid4().hex[:12]}").result(),
            n_lat,
        ),
    )
    hit_name = f"bench-hit-{tag}"

    def hits() -> dict[str, float]:
        fn.get_or_call(1, run_name=hit_name)  # the miss that records it
        call = lambda x: fn.get_or_call(1, run_name=hit_name)  # noqa: E731
        return measure("fn.get_or_call(1, run_name=n) hit", call, n_lat)

    attempt("hit", hits)

    def mapped(n: int) -> None:
        assert fn.map(range(n), progress=False) == [i + 1 for i in range(n)]

    attempt("map", lambda: rate(f"fn.map of {n_bulk} calls", mapped, n_bulk))
    return out


# --------------------------------------------------------------------------- table


def _cell(value: Any, unit: str) -> str:
    if isinstance(value, str):
        return value
    if unit == "ms":
        return f"{value['median'] * 1e3:.2f} ms (p90 {value['p90'] * 1e3:.2f})"
    return f"{value['rate']:,.0f} /s"


def _ratio(row: dict) -> str:
    a, b = row["remoterun"], row["baseline"]
    if isinstance(a, str) or isinstance(b, str):
        return "-"
    key = "median" if row["unit"] == "ms" else "rate"
    return f"{a[key] / b[key]:.2f}"


def print_table() -> None:
    rows = [
        (
            r["measure"],
            _cell(r["remoterun"], r["unit"]),
            f"{_cell(r['baseline'], r['unit'])}  [{r['baseline_label']}]",
            _ratio(r),
        )
        for r in ROWS
    ]
    head = ("measure", "remoterun", "raw Ray baseline", "ratio")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="50 samples, 1,000 bulk calls")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    n_lat, n_bulk = (50, 1_000) if args.quick else (200, 10_000)
    # SIGTERM (a `timeout`) unwinds like Ctrl-C, so the cluster is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from ray_servers import start_ray_cluster

    scratch = Path(tempfile.mkdtemp(prefix="rr-bench-ray-"))
    os.environ["REMOTERUN_HOME"] = str(scratch / "home")  # nothing of ~/.remoterun is used
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; starting cluster")
    try:
        cluster = start_ray_cluster()
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    print(f"cluster {cluster.address} up in {cluster.timings['start_total_s']:.1f} s")
    # Before `import ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported
    # (set later, ray.init rewrites 127.0.0.1 to the outward address and hangs for minutes).
    for key in [k for k in os.environ if k.startswith("RAY_")]:
        del os.environ[key]
    os.environ.update(cluster.env())
    try:
        import ray
        from ray_servers import gcs_reachable

        assert gcs_reachable(cluster.address), cluster.address  # ray.init would hang
        t = time.perf_counter()
        ray.init(
            address=cluster.address,
            namespace="remoterun-bench",
            log_to_driver=False,
            logging_level="ERROR",
        )
        print(f"ray.init {time.perf_counter() - t:.2f} s (Ray {ray.__version__})")
        raw = raw_ray(n_lat, n_bulk)
        rr = remoterun_ray(cluster.address, str(scratch / "runs"), n_lat, n_bulk)
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # before the GCS goes: Ray ends drivers that lose it
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    add_row("sync call", "ms", rr["sync"], raw["sync"], "ray.get(f.remote(x))")
    add_row(
        "recorded run, start to result", "ms", rr["recorded"], raw["sync"], "ray.get(f.remote(x))"
    )
    add_row("get_or_call hit", "ms", rr["hit"], raw["actor"], "sync actor call")
    add_row(
        f"map / bulk of {n_bulk:,} small calls", "rate", rr["map"], raw["bulk"], "bulk f.remote"
    )
    add_row(f"map / bulk of {n_bulk:,} small calls", "rate", rr["map"], raw["chunked"], "64 a task")
    add_row("sync actor call (raw only)", "ms", "-", raw["actor"], "ray.get(a.ping.remote(x))")
    print_table()
    timings = cluster.timings
    print(f"\ncluster start {timings['start_total_s']:.1f} s, stop {timings['stop_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
