"""remoterun quickstart, on this machine: nothing to set up.

Run it twice. The first time the cached steps execute; the second time every one of them
is a cache hit, answered from the run folders under ~/.remoterun/runs (or
$REMOTERUN_HOME/runs).
"""

from __future__ import annotations

import time

import remoterun as rr


@rr.function
def train(lr: float, epochs: int = 3) -> dict:
    """A stand-in for real work: prints progress and returns a score."""
    for epoch in range(epochs):
        print(f"  [train] epoch {epoch + 1}/{epochs} lr={lr}")
        time.sleep(0.05)
    return {"lr": lr, "score": round(1 - lr / 2, 3)}


@rr.function(cache=True)
def square(x: int) -> int:
    print(f"  [square] computing {x}**2")
    return x * x


def was_cached(name: str) -> bool:
    return rr.run(name=name).status is rr.RunStatus.COMPLETED


def main() -> None:
    hits, executed = [], []

    print("1. A plain call runs on the local system, streams its output, records nothing:")
    print("  ->", train(0.1, epochs=1))

    print("2. get_or_run: an asynchronous Run handle, cached or new:")
    (hits if was_cached("quickstart-async") else executed).append("quickstart-async")
    run = train.get_or_run(0.2, run_name="quickstart-async")
    print(f"  {run.name} is {run.status}; waiting for it...")
    print("  ->", run.result(timeout=60))

    print("3. get_or_call: the cached result, or a synchronous call that records it:")
    (hits if was_cached("quickstart-cached") else executed).append("quickstart-cached")
    print("  ->", train.get_or_call(0.3, run_name="quickstart-cached"))

    print("4. cache=True derives the run name from the code and the arguments:")
    before = {r.name for r in rr.local().runs()}
    print("  ->", square.get_or_call(12))
    new = {r.name for r in rr.local().runs()} - before
    (executed if new else hits).append("square(12)")

    print("5. A finished run, loaded by name, tells what it did:")
    done = rr.local().get_run("quickstart-cached")
    print(f"  status={done.status} inputs={done.inputs()} folder={done.url}")
    print("  its stdout:")
    for line in done.logs():
        print("   ", line, end="")

    print()
    print(f"cache hits: {', '.join(hits) or 'none'}")
    print(f"executed:   {', '.join(executed) or 'nothing (run it again: all hits)'}")


if __name__ == "__main__":
    main()
