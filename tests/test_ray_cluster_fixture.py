"""The two-node Ray cluster of ray_servers.py itself: both nodes up on 127.0.0.1, this
interpreter (and so remoterun) in Ray's workers, and a teardown that leaves nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed (pip install 'remoterun[ray]')", allow_module_level=True)
# Not imported here: Ray reads its variables (token, loopback) when it is imported, and
# test_ray.py's driver sets them first. This module's drivers are subprocesses.

from ray_servers import gcs_reachable, listening_addresses, ray_cluster, start_ray_cluster  # noqa: E402

import remoterun  # noqa: E402

LOOPBACKS = {"127.0.0.1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster() as c:
        yield c


WHERE = """
import json, os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], namespace="rr-fixture", log_to_driver=False)

@ray.remote(num_cpus=1, max_retries=0)
def where():
    import remoterun
    return {"node": ray.get_runtime_context().get_node_id(),
            "marker": os.environ.get("RR_RAY_CLUSTER"),
            "python": sys.executable, "remoterun": remoterun.__file__}

out = {r: ray.get(where.options(resources={r: 0.01}).remote()) for r in ("node_a", "node_b")}
alive = [n for n in ray.nodes() if n["Alive"]]
out["nodes"] = sorted((n["NodeID"], n["NodeManagerAddress"]) for n in alive)
print("RESULT " + json.dumps(out))
ray.shutdown()
"""


def test_a_driver_runs_a_task_on_each_node_with_remoterun_importable(cluster):
    r = cluster.run_driver(WHERE, timeout=90)
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["nodes"] == sorted([i, "127.0.0.1"] for i in cluster.node_ids.values())
    assert out["node_a"]["node"] == cluster.node_ids["node_a"]
    assert out["node_b"]["node"] == cluster.node_ids["node_b"]
    assert cluster.node_ids["node_a"] != cluster.node_ids["node_b"]
    for node in ("node_a", "node_b"):
        # the workers run this interpreter, of this environment (python or python3 in it)
        worker_python = out[node]["python"]
        assert os.path.dirname(worker_python) == os.path.dirname(sys.executable)
        assert os.path.samefile(worker_python, sys.executable)
        assert out[node]["remoterun"] == remoterun.__file__
        assert out[node]["marker"] == cluster.cluster_id  # what teardown finds workers by


HOLD = """
import os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], namespace="rr-fixture", log_to_driver=False)

@ray.remote(num_cpus=0, max_restarts=0)
class Holder:
    def pid(self):
        return os.getpid()

holders = [Holder.options(resources={r: 0.01}).remote() for r in ("node_a", "node_b")]
print("READY", os.getpid(), *ray.get([h.pid.remote() for h in holders]), flush=True)
sys.stdin.read()  # hold the driver and its actors until the test closes stdin
ray.shutdown()
"""


def test_everything_listens_on_loopback_only(cluster):
    env = cluster.env()
    assert env["RAY_ADDRESS"] == cluster.address == f"127.0.0.1:{cluster.gcs_port}"
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).read_text() != ""
    assert len(str(cluster.root)) <= len("/tmp/rr-ray-XXXXXXXX")
    # a driver and an actor on each node running: their gRPC servers listen too
    driver = subprocess.Popen(
        [sys.executable, "-c", HOLD],
        env=cluster.driver_env(),
        cwd=cluster.root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = driver.stdout.readline()
        assert line.startswith("READY"), line
        driver_pid, *actor_pids = map(int, line.split()[1:])
        listening = listening_addresses([*cluster.pids(), driver_pid])
    finally:
        driver.communicate("", timeout=60)
    ports = {port for _, port, _ in listening}
    assert cluster.gcs_port in ports
    assert {pid for _, _, pid in listening} >= {driver_pid, *actor_pids}
    assert {addr for addr, _, _ in listening} <= LOOPBACKS, listening


def _ps() -> dict[int, tuple[int, str, str]]:
    """pid -> (session, state, start time) of every process, as ``ps`` shows them."""
    ps = subprocess.run(
        ["ps", "-eo", "pid=,sess=,stat=,lstart="], capture_output=True, text=True, check=True
    )
    rows = {}
    for line in ps.stdout.splitlines():
        pid, sess, stat, *start = line.split()
        rows[int(pid)] = (int(sess), stat, " ".join(start))
    return rows


def test_kill_worker_node_then_stop_leaves_no_process(cluster):
    other = start_ray_cluster()
    try:
        before = {pid: row for pid, row in _ps().items() if pid in other.pids()}
        assert len(before) >= 10  # GCS, 2 raylets, agents, log monitors, idle workers
        raylet = other.kill_worker_node()
        assert raylet in before and raylet not in other.pids()
        assert gcs_reachable(other.address)  # the head lives on
    finally:
        other.stop()
    assert other.pids() == []
    assert not other.root.exists()

    def left(rows, zombies):
        return [
            (pid, row)
            for pid, row in rows.items()
            if ((pid in before and before[pid][2] == row[2]) or row[0] in other.sids())
            and (zombies or not row[1].startswith("Z"))
        ]

    assert left(_ps(), zombies=False) == []  # nothing of it runs
    deadline = time.monotonic() + 15  # PID 1 reaps the orphans' zombies within ~2 s
    while left(_ps(), zombies=True) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left(_ps(), zombies=True) == []
    # the other cluster's teardown left this one alone
    assert gcs_reachable(cluster.address)
    assert cluster.raylet_pid("worker") is not None
