"""execnet channel round trips, measured inside execnet's own virtual environment.

Run by ``peers.run_peer`` with bench/.venvs/execnet/bin/python and a gateway spec
(``popen``, or ``ssh_config=FILE//ssh=ALIAS//python=/usr/bin/python3``); prints one JSON
line: ``{"start": s, "calls": [s, ...], "bytes": [s, ...], "mb": n, "version": "..."}``.
``start`` is gateway start plus the first call; ``calls`` a trivial call's round trip;
``bytes`` the round trip of ``--mb`` MB sent and echoed back in one message.
"""

from __future__ import annotations

import argparse
import json
import time

import execnet

# The remote side: a loop answering ("inc", x) with x + 1 and ("echo", data) with data.
REMOTE = """
while True:
    item = channel.receive()
    if item is None:
        break
    op, value = item
    channel.send(value + 1 if op == "inc" else value)
"""


def timed(fn, n: int, warmup: int) -> list[float]:
    # harness.measure's loop again: this script runs in the peer's own virtual
    # environment, where neither remoterun nor the harness is importable.
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="popen")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--mb", type=int, default=0)
    parser.add_argument("--mb-n", type=int, default=2)
    opts = parser.parse_args()
    start = time.perf_counter()
    gateway = execnet.makegateway(opts.spec)
    try:
        channel = gateway.remote_exec(REMOTE)

        def call() -> None:
            channel.send(("inc", 1))
            assert channel.receive() == 2

        call()
        started = time.perf_counter() - start
        calls = timed(call, opts.n, opts.warmup)
        sizes: list[float] = []
        if opts.mb:
            data = bytes(opts.mb * 1_000_000)

            def echo() -> None:
                channel.send(("echo", data))
                assert len(channel.receive()) == len(data)

            sizes = timed(echo, opts.mb_n, 1)
        channel.send(None)
        channel.waitclose(30)
    finally:
        gateway.exit()
    result = {"start": started, "calls": calls, "bytes": sizes, "mb": opts.mb}
    print(json.dumps({**result, "version": execnet.__version__}))


if __name__ == "__main__":
    main()
