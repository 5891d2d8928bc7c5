"""Measures against a moto S3 server on 127.0.0.1: moving runs to S3, reading them back.

Baselines: a plain s3fs ``put`` of the same bytes (what ``run.to("s3")`` must keep up
with), and a plain s3fs ``cat`` of a small object (the floor of loading a result).
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import tasks
from harness import Context, Row, as_rate, baseline_row, measure, ratio_at_least

import remoterun as rr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

BIG = 100 << 20


def moto(ctx: Context) -> Any:
    """The moto server, with the AWS variables that point s3fs at it."""

    def start() -> tuple[Any, Callable[[], None]]:
        from servers import MotoS3Server

        server = MotoS3Server().start()
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())

        def stop() -> None:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            server.stop()

        return server, stop

    return ctx.resource("moto", start)


def _bucket(server: Any) -> str:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    server.filesystem().mkdir(name)
    return name


def s3_to(ctx: Context) -> list[Row]:
    """``run.to("s3")`` of a run folder holding a 100 MB result, against ``s3fs.put``."""
    server = moto(ctx)
    bucket = _bucket(server)
    here = rr.LocalSystem(root=tempfile.mkdtemp(prefix="rr-bench-s3-"))
    name = f"{ctx.prefix}-big"
    rr.function(tasks.zeros, system=here)(BIG, run_name=name)
    run = here.get_run(name)
    size = sum(p.stat().st_size for p in Path(run.folder.path).rglob("*") if p.is_file())
    fs = server.filesystem()
    result = Path(run.folder.path, "result.pkl")
    n = ctx.n(5, 2)
    copies = iter(range(1000))

    def rr_copy() -> None:
        run.to("s3", path=f"{bucket}/runs/{next(copies)}/{name}")

    def s3fs_put() -> None:
        fs.put_file(str(result), f"{bucket}/plain/{uuid.uuid4().hex}")

    rr_stats = as_rate(measure(rr_copy, n, warmup=1), size / 1e6)
    return [
        baseline_row(
            "s3: run.to('s3') 100 MB",
            "MB/s",
            rr_stats,
            "s3fs put_file of the same bytes",
            lambda: as_rate(measure(s3fs_put, n, warmup=1), result.stat().st_size / 1e6),
            ratio_at_least(0.7, "≥ 70% of put"),
        )
    ]


def s3_result(ctx: Context) -> list[Row]:
    """``rr.run(path=s3 URL).result()`` of a small run, against an s3fs ``cat``."""
    server = moto(ctx)
    bucket = _bucket(server)
    name = f"{ctx.prefix}-small"
    rr.function(tasks.inc)(1, run_name=name)
    url = f"s3://{bucket}/runs/{name}"
    rr.local().get_run(name).to(url)
    fs = server.filesystem()
    n = ctx.n(100, 20)
    rr_stats = measure(lambda: rr.run(path=url).result(), n, warmup=3)
    return [
        baseline_row(
            "s3: rr.run(path).result()",
            "s",
            rr_stats,
            "s3fs cat of result.pkl",
            lambda: measure(lambda: fs.cat_file(f"{bucket}/runs/{name}/result.pkl"), n, 3),
        )
    ]


MEASURES: dict[str, Callable[[Context], list[Row]]] = {
    "s3.to": s3_to,
    "s3.result": s3_result,
}
