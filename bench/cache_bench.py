"""Content-cache measures (issue 5): fingerprinting a 50-function call tree, and a
``cache=True`` hit, against what peers hash (the decorated function's source only) and
against a named hit."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import tasks
from harness import Context, Row, at_most, baseline_row, measure, measure_pair

import remoterun as rr
from remoterun import fingerprint

TREE_SIZE = 50


def _tree_module(folder: Path) -> Any:
    """A new module of the user's own: f0 calls f1 and f2, ..., down to f49."""
    name = f"rr_bench_tree_{uuid.uuid4().hex[:10]}"
    last = TREE_SIZE - 1
    lines = [f"def f{last}(x):\n    return x\n"]
    lines += [
        f"def f{i}(x):\n    return f{i + 1}(x) + f{min(i + 2, last)}(x)\n" for i in range(last)
    ]
    (folder / f"{name}.py").write_text("\n".join(lines))
    importlib.invalidate_caches()
    return importlib.import_module(name)


def _source_hash(fn: Callable) -> str:
    """What joblib.Memory and Prefect's default cache key hash: the function's own source."""
    return hashlib.md5(inspect.getsource(fn).encode()).hexdigest()


def fingerprint_tree(ctx: Context) -> list[Row]:
    """``fingerprint.code_fingerprint`` of a function reaching 50 functions: warm (as at every
    call of a cached step: the walk is redone, each function's digest is cached) and
    cold (the first call in a process)."""
    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, folder)
        try:
            warm_mod = _tree_module(Path(folder))
            assert len(fingerprint.code_components(warm_mod.f0)) == TREE_SIZE
            n = ctx.n(300, 50)
            warm, source = measure_pair(
                lambda: fingerprint.code_fingerprint(warm_mod.f0),
                lambda: _source_hash(warm_mod.f0),
                n,
                warmup=5,
            )
            cold_mods = [_tree_module(Path(folder)) for _ in range(ctx.n(30, 8))]
            cold = measure(
                lambda: fingerprint.code_fingerprint(cold_mods.pop().f0), len(cold_mods), 0
            )
        finally:
            sys.path.remove(folder)
    name = f"fingerprint of a {TREE_SIZE}-function call tree"
    baseline = "hash of the function's own source (joblib, Prefect)"
    return [
        baseline_row(f"{name}, warm", "s", warm, baseline, lambda: source, at_most(5e-3, "< 5 ms")),
        baseline_row(f"{name}, cold", "s", cold, baseline, lambda: source, at_most(5e-3, "< 5 ms")),
    ]


def content_hit(ctx: Context) -> list[Row]:
    """``get_or_call`` hit of a ``cache=True`` function (the name derived from code and
    arguments) against a hit by ``run_name``; and with a 10 MB numpy array argument
    against hashing its bytes alone."""
    cached = rr.function(tasks.inc, cache=True)
    named = rr.function(tasks.inc)
    name = f"{ctx.prefix}-named-hit"
    cached.get_or_call(1)
    named.get_or_call(1, run_name=name)
    n = ctx.n(2000, 300)
    hit, by_name = measure_pair(
        lambda: cached.get_or_call(1), lambda: named.get_or_call(1, run_name=name), n, warmup=20
    )
    rows = [
        baseline_row(
            "local: content-cache hit (cache=True)",
            "s",
            hit,
            "get_or_call hit by run_name",
            lambda: by_name,
            at_most(0.3e-3, "≤ 0.3 ms (the hit target)"),
        )
    ]
    try:
        import numpy
    except ImportError:
        return rows
    array = numpy.random.default_rng(0).random(10 * 2**20 // 8)
    total = rr.function(numpy.sum, name="total", cache=True)
    total.get_or_call(array)
    n = ctx.n(40, 10)
    array_hit, floor = measure_pair(
        lambda: total.get_or_call(array),
        lambda: hashlib.blake2b(memoryview(array).cast("B"), digest_size=16).digest(),
        n,
        warmup=3,
    )
    rows.append(
        baseline_row(
            "local: content-cache hit, 10 MB numpy argument",
            "s",
            array_hit,
            "blake2b of the array's bytes",
            lambda: floor,
        )
    )
    return rows


MEASURES: dict[str, Callable[[Context], list[Row]]] = {
    "cache.fingerprint": fingerprint_tree,
    "cache.hit": content_hit,
}
