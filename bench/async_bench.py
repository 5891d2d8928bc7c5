"""Awaited calls in flight at once (``acall`` + ``asyncio.gather``) against the same calls
made one after another, on this machine and on a warm SSH host.

The bound: calls overlap up to the number in flight at once, the smaller of the
threads that carry awaited calls (``REMOTERUN_ASYNC_THREADS``, default 16) and what the
system runs at once (an SSH host: ``max_sessions - 2`` = 8 agent channels; this machine:
one agent process per call in flight). So ``n`` calls of ``d`` seconds take about
``ceil(n / k) * d``, not ``n * d``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Callable

import ssh_bench
import tasks
from harness import Context, Row, Target, stats_of

import remoterun as rr
from remoterun import aio

CALL_SECONDS = 0.2
SSH_SESSIONS = 10  # rr.cluster's max_sessions default: 8 agent channels per host


def overlap_rows(ctx: Context, where: str, system: Any, at_once: int) -> list[Row]:
    """One row: ``n`` awaited calls at once against the same ``n`` one after another."""
    n = ctx.n(100, 20)
    sleeper = rr.function(tasks.sleep_for, system=system)
    sleeper(0.0)  # warm: connected, an agent started

    async def together() -> None:
        await asyncio.gather(*(sleeper.acall(CALL_SECONDS) for _ in range(n)))

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    asyncio.run(together())  # warm: the agents of every slot started
    concurrent = stats_of([timed(lambda: asyncio.run(together())) for _ in range(ctx.n(3, 1))])
    one_by_one = stats_of([timed(lambda: [sleeper(CALL_SECONDS) for _ in range(n)])])
    bound = math.ceil(n / at_once) * CALL_SECONDS
    return [
        Row(
            f"{n} awaited calls of {CALL_SECONDS} s at once ({where}, {at_once} in flight)",
            "s",
            rr=concurrent,
            baseline=f"the same {n} calls one after another",
            base=one_by_one,
            target=Target(
                f"≈ ceil(n / {at_once}) × {CALL_SECONDS} s = {bound:.1f} s (≤ ×1.5)",
                lambda rr_stats, base: rr_stats.median <= 1.5 * bound,
            ),
            extra={"calls": n, "in_flight": at_once, "bound_s": bound},
        )
    ]


def async_local(ctx: Context) -> list[Row]:
    return overlap_rows(ctx, "this machine", rr.local(), aio.threads())


def async_ssh(ctx: Context) -> list[Row]:
    cluster = ssh_bench.warm_cluster(ctx)
    return overlap_rows(ctx, "SSH host", cluster, min(aio.threads(), SSH_SESSIONS - 2))


MEASURES: dict[str, Callable[[Context], list[Row]]] = {
    "async.local": async_local,
    "async.ssh": async_ssh,
}
