"""remoterun's benchmark suite (SPEC §9): remoterun against its baselines, in one run.

    .venv/bin/python bench/run.py [--quick] [--json PATH] [--only NAME,...]

Prints a table (median, p90, baseline median, ratio remoterun/baseline, SPEC target, met?)
and writes the same rows as JSON (default bench/results/latest.json). ``--only`` takes
measure names or prefixes: ``local``, ``ssh.sync``, ... (``--list`` shows them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

MeasureFn = Callable[[harness.Context], "list[harness.Row]"]


def all_measures() -> dict[str, MeasureFn]:
    import async_bench
    import cache_bench
    import local_bench
    import s3_bench
    import ssh_bench
    import ui_bench

    return {
        **local_bench.MEASURES,
        **cache_bench.MEASURES,
        **ssh_bench.MEASURES,
        **s3_bench.MEASURES,
        **async_bench.MEASURES,
        **ui_bench.MEASURES,
    }


def select(measures: dict[str, MeasureFn], only: str | None) -> dict[str, MeasureFn]:
    """The measures named (or prefixed: ``local`` = ``local.*``) by ``--only``."""
    if not only:
        return measures
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = {
        name: fn
        for name, fn in measures.items()
        if any(name == w or name.startswith(w + ".") for w in wanted)
    }
    unknown = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in measures)]
    if unknown:
        raise ValueError(f"unknown measure(s) {', '.join(unknown)}; known: {', '.join(measures)}")
    return chosen


def leftover_children() -> list[str]:
    """Processes this one started that are still alive (there should be none)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from servers import descendants

    found = []
    for pid in descendants(os.getpid()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(f"{pid} {stat.split('(', 1)[1].split(')')[0]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~1 min)")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    parser.add_argument("--only", help="comma-separated measure names or prefixes")
    parser.add_argument("--list", action="store_true", help="list the measures and exit")
    opts = parser.parse_args(argv)

    try:
        measures = select(all_measures(), opts.only)
    except ValueError as exc:
        parser.error(str(exc))
    if opts.list:
        print("\n".join(measures))
        return 0
    home = tempfile.mkdtemp(prefix="bench-remoterun-home-")
    os.environ["REMOTERUN_HOME"] = home  # read by remoterun at each use

    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        print(
            f"[bench] note: load average {load_start[0]:.1f} at start: numbers will be noisy",
            file=sys.stderr,
        )
    ctx = harness.Context(quick=opts.quick, prefix=f"b{os.getpid()}-{int(time.time())}")
    rows: list[harness.Row] = []
    started = time.perf_counter()
    try:
        for name, fn in measures.items():
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                rows.extend(fn(ctx))
            except Exception as exc:  # noqa: BLE001 - one broken measure must not stop the rest
                rows.append(harness.Row(name, "s", rr_note=f"error ({type(exc).__name__}: {exc})"))
            print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        ctx.close()
        import remoterun as rr

        rr.local().close()
        shutil.rmtree(home, ignore_errors=True)
    elapsed = time.perf_counter() - started

    print(harness.table(rows))
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; ratio = remoterun / baseline medians")
    harness.write_json(
        opts.json,
        rows,
        {
            "quick": opts.quick,
            "seconds": elapsed,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "measures": list(measures),
        },
    )
    print(f"written to {opts.json}")
    left = leftover_children()
    if left:
        print(f"[bench] WARNING: child processes left: {', '.join(left)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
