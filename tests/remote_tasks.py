"""Functions the tests run remotely. A module of the user's own: shipped by value."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


class CustomError(Exception):
    """An exception type of the user's own, to check it comes back as itself."""


def add(a, b=2):
    print(f"adding {a} and {b}")
    return a + b


def record_call(marker, value, delay=0.0):
    """Append one line to ``marker`` per execution, so tests can count executions."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    print(f"executing with {value}")
    time.sleep(delay)
    return value * 2


def record_call_again(marker, value, delay=0.0):
    """Another function of the same arguments as record_call."""
    return ("again", record_call(marker, value, delay))


def big_bytes(size):
    return b"x" * size


def length(data):
    return len(data)


def executions(marker) -> int:
    try:
        with open(marker) as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


def fail(message):
    print("about to fail", flush=True)
    raise CustomError(message)


def fail_then_succeed(marker):
    """Fails on its first execution, succeeds after."""
    first = executions(marker) == 0
    with open(marker, "a") as f:
        f.write("x\n")
    if first:
        raise CustomError("first attempt fails")
    return "second attempt"


def wait_for_file(path, timeout=30.0):
    print("started", flush=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    print("saw the file", flush=True)
    return "finished"


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with(code):
    sys.exit(code)


def hard_exit():
    os._exit(3)


def spawn_sleeper(pidfile):
    """Start a child process in the run's process group, then sleep."""
    child = subprocess.Popen(["sleep", "60"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
    time.sleep(60)


def note_pid_then_sleep(pidfile, seconds=60):
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def pollute(folder):
    """Leave state behind in the process that runs this call."""
    os.environ["REMOTERUN_TEST_LEAK"] = "leaked"
    os.chdir(folder)
    sys.modules["remoterun_test_leak"] = sys  # as an import would
    return os.getpid()


def observe():
    return (
        os.environ.get("REMOTERUN_TEST_LEAK"),
        os.getcwd(),
        "remoterun_test_leak" in sys.modules,
    )


def log_some_metrics():
    import remoterun as rr

    run = rr.current_run()
    run.log_metric("loss", 0.5, step=1)
    run.log_metric("loss", 0.25, step=2)
    run.log_metric("acc", 0.9, single_value=True)
    run.set_tag("kind", "toy")
    run.log_params({"lr": 0.1, "layers": [2, 3]})
    try:
        run.log_metric("loss", "low")
    except TypeError as exc:
        return str(exc)
    return "accepted a string"


def write_to_fds():
    os.write(1, b"raw write to fd 1\n")
    subprocess.run(["echo", "from a child process"], check=True)
    sys.stderr.write("to stderr\n")
    return "result intact"


def unpicklable_result():
    return threading.Lock()


def no_args():
    return "no args"


def sleep_then_whoami(_item=None):
    """Long enough that a map keeps several hosts busy at once."""
    import getpass

    time.sleep(0.1)
    return getpass.getuser()


def describe_current_run():
    """What rr.current_run() says where the function runs (fsspec may be absent there)."""
    import remoterun as rr

    run = rr.current_run()
    if run is None:
        return None
    return run.name, run.status.value, run.inputs()


def identity(value):
    return value


def forks_then_dies():
    """Leaves a child holding the worker's inherited pipes, then dies without an outcome."""
    if os.fork() == 0:
        time.sleep(20)
        os._exit(0)
    os._exit(3)


def _refuse_to_load():
    raise RuntimeError("this argument cannot be loaded here")


class LoadsBadly:
    """Pickles fine, fails when unpickled on the executing side."""

    def __reduce__(self):
        return (_refuse_to_load, ())


# --------------------------------------------------------------------------- pipelines


def make_list(n):
    return list(range(n))


def total(xs):
    return sum(xs)


def scaled_total(xs, factor):
    return sum(xs) * factor


def nested_pipeline(root, n):
    """A remote function calling remote functions on its own host: a three-step
    pipeline whose steps are cached and linked to it."""
    import remoterun as rr

    here = rr.LocalSystem(root=root)
    make = rr.function(make_list, system=here, cache=True)
    add_up = rr.function(total, system=here, cache=True)
    scale = rr.function(scaled_total, system=here, cache=True)
    data = make.get_or_run(n)
    summed = add_up.get_or_call(data)
    return scale.get_or_call(data, summed)


def wait_for_myself(root):
    """Asks for the run executing it: must be refused, not wait forever."""
    import remoterun as rr

    me = rr.current_run()
    fn = rr.function(total, system=rr.LocalSystem(root=root))
    return fn.get_or_call(run_name=me.name)  # a lookup by name: attaches to itself


def total_of_all(*lists):
    return sum(sum(xs) for xs in lists)


def ray_node():
    """The id of the Ray node this runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def print_slowly(n, delay):
    for i in range(n):
        print(f"line {i}", flush=True)
        time.sleep(delay)
    return n


def count_then_sleep(marker, pidfile, seconds=120):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def start_child_on(system):
    """Start a run from inside a run: its child, linked to it."""
    import remoterun as rr

    child = rr.function(add, system=system).run(1)
    child.wait(timeout=60)
    return child.name


async def async_add(a, b=2):
    """An async def function: the host runs it in an event loop of its own."""
    import asyncio

    await asyncio.sleep(0.01)
    print(f"async adding {a} and {b}")
    return a + b


async def async_fail(message):
    import asyncio

    await asyncio.sleep(0)
    raise CustomError(message)


def meet(folder, count, timeout=60.0):
    """Arrive in ``folder`` and wait until ``count`` calls have: calls that do not run at
    the same time never all meet, and time out."""
    with open(os.path.join(folder, f"{os.getpid()}-{threading.get_ident()}"), "w"):
        pass
    deadline = time.monotonic() + timeout
    while len(os.listdir(folder)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {count} calls met")
        time.sleep(0.01)
    return len(os.listdir(folder))


def print_lines(count, gate):
    """Print ``count`` lines, the last only once ``gate`` exists (a follower sees the
    first ones while the run is still going)."""
    for i in range(count - 1):
        print(f"line {i}", flush=True)
    wait_for_file(gate)
    print(f"line {count - 1}", flush=True)
    return count


def sha256(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()
