"""How much client memory a call holds beyond its argument, measured in a client process of
its own: the peak resident size (``VmHWM``, reset before each call) less the size before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import client_env, system_code

MB = 1 << 20
SIZE = 64 * MB
# Imports, pages the call touches once, paramiko's buffers: not proportional to SIZE.
NOISE = 20 * MB

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak counters"
)

CLIENT = """
import json, os, sys
import remoterun as rr

def resident(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def growth(call):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current size
    before = resident("VmRSS")
    call()
    return resident("VmHWM") - before

def size(value):
    return len(value)

def echo(value):
    return value

class Box:  # fingerprinted by its pickle, as any object remoterun has no hash for
    def __init__(self, data):
        self.data = data

def box_size(box):
    return len(box.data)

def frame_size(frame):
    return int(frame.memory_usage(index=False).sum())

measured = {}
sized, echoed = rr.function(size, system=s), rr.function(echo, system=s)
sized(b"warm"), echoed(b"warm"), sized.get_or_call(b"warm", run_name="warm")
x = os.urandom(1 << 16) * (SIZE >> 16)
measured["fn(x, run_name=)"] = growth(lambda: sized(x, run_name="called"))
measured["fn.run(x).result()"] = growth(lambda: sized.run(x, run_name="started").result())
measured["fn.get_or_call(x) that executes"] = growth(lambda: sized.get_or_call(x, run_name="got"))
measured["fn.get_or_call(x) that hits"] = growth(lambda: sized.get_or_call(x, run_name="got"))
measured["fn(x) returning x"] = growth(lambda: echoed(x))
measured["fn(x)"] = growth(lambda: sized(x))
boxed = rr.function(box_size, system=s)
boxed(Box(b"warm"), run_name="warm-box")
box = Box(x)
measured["fn(Box(x), run_name=)"] = growth(lambda: boxed(box, run_name="boxed"))
del x, box
if PANDAS:
    import numpy, pandas
    frame = pandas.DataFrame({"a": numpy.ones(SIZE // 8)})
    framed = rr.function(frame_size, system=s)
    framed(frame.iloc[:2], run_name="warm-frame")
    measured["fn(frame, run_name=)"] = growth(lambda: framed(frame, run_name="framed"))
print(json.dumps(measured))
"""


def test_a_recorded_run_holds_one_copy_of_its_argument(system):
    """A recorded run pickles its argument once, like a plain call: hashing it for the
    run's fingerprint copies nothing (or, for an object hashed by its pickle, is done
    before the inputs are pickled), and the pickle is let go before a result is read."""
    local = type(system).__name__ == "LocalSystem"  # the test hosts' Python has no pandas
    code = system_code(system) + f"SIZE = {SIZE}\nPANDAS = {local}\n" + CLIENT
    out = subprocess.run(
        [sys.executable, "-c", code], env=client_env(), capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.splitlines()[-1])
    limits = {call: 1.2 * SIZE + NOISE for call in measured}
    # The argument's pickle and the result (the reply's bytes, then the value): two copies.
    limits["fn(x) returning x"] = 2.2 * SIZE + NOISE
    # A synchronous call sends a large argument from its own memory, beside the pickle.
    limits["fn(x)"] = 0.2 * SIZE + NOISE
    # A hit hashes the argument and pickles nothing.
    limits["fn.get_or_call(x) that hits"] = 0.2 * SIZE + NOISE
    over = {
        call: f"{measured[call] / MB:.0f} MB > {limit / MB:.0f} MB"
        for call, limit in limits.items()
        if measured[call] > limit
    }
    assert not over, f"peak growth with a {SIZE // MB} MB argument: {over}"
