"""joblib.Memory cache hit, measured inside joblib's own virtual environment.

Run by ``peers.run_peer`` with bench/.venvs/joblib/bin/python; prints one JSON line:
``{"samples": [seconds, ...], "version": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import joblib


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-joblib-") as location:
        cached = joblib.Memory(location, verbose=0).cache(inc)
        cached(1)  # the one execution; every later call is a hit
        for _ in range(opts.warmup):
            cached(1)
        samples = []
        for _ in range(opts.n):
            start = time.perf_counter()
            cached(1)
            samples.append(time.perf_counter() - start)
    print(json.dumps({"samples": samples, "version": joblib.__version__}))


if __name__ == "__main__":
    main()
