"""A three-step pipeline (prepare -> train -> evaluate) whose steps are cached by content.

    python examples/pipeline.py                 # steps run on this machine
    python examples/pipeline.py --system NAME   # steps run on a cluster saved with .save()

Run it twice: the second time nothing executes. Then change a helper, say the body of
``fit_line``, and run it again: exactly the steps that depend on it (train, and evaluate,
which uses train's model) execute, and ``explain`` says why. A comment or docstring edit
changes nothing. Each run of the script is recorded as the run ``pipeline`` (earlier
ones are kept as its attempts); the script prints its graph and writes it as
``pipeline.dot`` for Graphviz.
"""

from __future__ import annotations

import argparse
import random

import remoterun as rr

# ---------------------------------------------------------------- helpers the steps use


def noisy_line(n: int, seed: int = 7) -> list[tuple[float, float]]:
    """Points near y = 3x + 1."""
    rng = random.Random(seed)
    return [(x / n, 3 * x / n + 1 + rng.gauss(0, 0.1)) for x in range(n)]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares: (slope, intercept)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    return slope, my - slope * mx


def mean_abs_error(model: tuple[float, float], points: list[tuple[float, float]]) -> float:
    slope, intercept = model
    return sum(abs(slope * x + intercept - y) for x, y in points) / len(points)


# ---------------------------------------------------------------- the steps


@rr.function(cache=True)
def prepare(n: int) -> list[tuple[float, float]]:
    print(f"preparing {n} points")
    return noisy_line(n)


@rr.function(cache=True)
def train(points: list[tuple[float, float]]) -> tuple[float, float]:
    print(f"fitting {len(points)} points")
    return fit_line(points)


@rr.function(cache=True)
def evaluate(model: tuple[float, float], points: list[tuple[float, float]]) -> float:
    return round(mean_abs_error(model, points), 6)


def step(fn: rr.RemoteFunction, *args: object) -> rr.Run:
    """Say whether the step is cached (and if not, why), then get it or run it."""
    why = fn.explain(*args)
    if not why.hit:
        print(why)
    run = fn.get_or_run(*args)  # a Run handle: passed to the next step as it is
    run.wait()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="here", help="'here', or a saved cluster's name")
    parser.add_argument("-n", type=int, default=200, help="how many points to prepare")
    options = parser.parse_args()
    system = rr.local() if options.system == "here" else rr.cluster(options.system)
    steps = [f.to(system) for f in (prepare, train, evaluate)]
    try:
        with rr.run(name="pipeline") as pipeline:
            points = step(steps[0], options.n)
            model = step(steps[1], points)  # train reads prepare's result where it lives
            score = step(steps[2], model, points)
            print(f"model {model.result()}, mean absolute error {score.result()}")
        executed = [r.config["fn_name"] for r in pipeline.children()]
        cached = [r.config["fn_name"] for r in pipeline.upstream()]
        print(f"executed: {', '.join(executed) or 'nothing'}")
        print(f"cached: {', '.join(cached) or 'nothing'}")
        graph = pipeline.graph()
        print(graph)
        with open("pipeline.dot", "w") as f:
            f.write(graph.to_dot())
    finally:
        system.close()


if __name__ == "__main__":
    main()
