"""``remoterun ui`` over a store of 10,000 runs: how soon its first page is there.

The page lists the store once and reads the records of its own page only (the rest in
the background), so it does not wait for every record. Baselines, in the same run:
``System.runs()``, which reads every record (what ``remoterun ls`` does), and the bare
listing of the store's root (the floor: one ``ls``). Locally the store is a folder; on
S3 a bucket of the moto server on 127.0.0.1 (see ``s3_bench``).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from typing import Any, Callable

from harness import Context, Row, Stats, at_most, baseline_row, measure, stats_of
from s3_bench import moto

import remoterun as rr
from remoterun.agent.record import RunRecord
from remoterun.systems.storage import StorageSystem
from remoterun.ui.browse import Browser

RUNS = 10_000
PAGE = 50


def _records(count: int) -> dict[str, bytes]:
    """``count`` finished runs' records by run name, as workers write them."""
    out = {}
    for i in range(count):
        name = f"train-{i:05d}"
        record = RunRecord.new(name, "function", 1, fn_name="train").running(host="gpu-1")
        record.set_tag("lr", round(0.001 * (i % 10 + 1), 4))
        record.add_metric("loss", 1.0 / (i % 7 + 1), 0)
        out[name] = record.completed().encode()
    return out


def _first_pages(system: Any, n: int) -> Stats:
    """Time ``n`` cold first pages (a new Browser each, nothing listed before), after one
    untimed; the background reading each starts is stopped, untimed, before the next."""
    samples = []
    for i in range(n + 1):
        system.filesystem().invalidate_cache()
        browser = Browser([("store", system)])
        start = time.perf_counter()
        answer = browser.runs(limit=PAGE)
        took = time.perf_counter() - start
        browser.close()
        assert len(answer["runs"]) == PAGE and answer["total"] == RUNS, answer["total"]
        if i:
            samples.append(took)
    return stats_of(samples)


def _rows(ctx: Context, where: str, system: Any, goal: float) -> list[Row]:
    n = ctx.n(7, 3)
    fs = system.filesystem()
    rr_stats = _first_pages(system, n)
    target = at_most(goal, f"≤ {goal:g} s")

    def every_record() -> None:
        fs.invalidate_cache()
        assert len(system.runs()) == RUNS

    def listing() -> None:
        fs.invalidate_cache()
        fs.ls(system.root, detail=True)

    measure_name = f"ui: first page of {RUNS:,} runs, {where}"
    return [
        baseline_row(
            measure_name,
            "s",
            rr_stats,
            "System.runs(): every record, as remoterun ls reads them",
            lambda: measure(every_record, 1, warmup=0),  # ~100 s on moto
            target,
        ),
        baseline_row(
            measure_name,
            "s",
            rr_stats,
            "the store's listing alone (one ls)",
            lambda: measure(listing, n, warmup=1),
            target,
        ),
    ]


def ui_page_local(ctx: Context) -> list[Row]:
    root = tempfile.mkdtemp(prefix="rr-bench-ui-")
    system = rr.LocalSystem(root=root)
    for name, data in _records(RUNS).items():
        folder = system.folder(name)
        folder.files.mkdir(folder.path)
        folder.write_record_bytes(data)
    return _rows(ctx, "local folder", system, 1.0)


def ui_page_s3(ctx: Context) -> list[Row]:
    server = moto(ctx)
    bucket = f"bench-ui-{uuid.uuid4().hex[:10]}"
    fs = server.filesystem()
    fs.mkdir(bucket)
    records = _records(RUNS)
    system = StorageSystem(f"s3://{bucket}/runs")
    fs.pipe({system.folder(name).record_path: data for name, data in records.items()})
    return _rows(ctx, "S3 (moto on 127.0.0.1)", system, 2.0)


MEASURES: dict[str, Callable[[Context], list[Row]]] = {
    "ui.page_local": ui_page_local,
    "ui.page_s3": ui_page_s3,
}
