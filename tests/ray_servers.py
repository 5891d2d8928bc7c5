"""A real two-node Ray cluster on 127.0.0.1 for the tests and benchmarks (Linux only).

    cluster = start_ray_cluster()          # or: with start_ray_cluster() as cluster: ...
    env = {**os.environ, **cluster.env()}  # a driver: ray.init(address=cluster.address)
    cluster.kill_worker_node()             # SIGKILL the second node's raylet
    cluster.stop()

Two ``ray start`` processes of the **running interpreter's** Ray (``bin/ray`` next to
``sys.executable``), so Ray's workers run this Python and can ``import remoterun``. Each
node has its own ``--temp-dir`` under a short ``/tmp/rr-ray-XXXXXXXX`` (Unix socket paths
must stay under 108 bytes), every port is chosen free, and every host is 127.0.0.1. The
head has the custom resource ``node_a``, the second node ``node_b``: pin a task with
``.options(resources={"node_b": 0.01})``.

Ray quirks handled here (Ray 2.60):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps 127.0.0.1 as is in the head's and the
  drivers' addresses (otherwise Ray rewrites it to the outward interface address, where
  nothing listens), but it makes ``ray start --address`` abort ("Multi-node Ray clusters
  are not supported"). The second node therefore runs the Ray CLI through
  ``_LOOPBACK_CLI``, which patches only that rewrite (a private function: check it on Ray
  upgrades).
- Token auth with a per-cluster token file (``RAY_AUTH_TOKEN_PATH``); ``RAY_AUTH_MODE`` is
  always set, since without it ``ray start`` turns auth on when ``~/.ray/auth_token``
  exists. Nothing in ``$HOME`` is read or written. Every ``RAY_*`` variable of the caller
  is dropped from the daemons' environment.
- Never ``ray stop``: it kills every Ray process of the machine. Each ``ray start`` runs in
  a session of its own, and every daemon carries ``RR_RAY_CLUSTER=<id>`` in its
  environment (Ray's workers inherit both); teardown signals only those processes:
  raylets, then the rest, then the GCS, SIGKILL after a grace period.
- A cluster left behind by a process that died (a killed pytest) is stopped by the next
  ``start_ray_cluster``: its folder names the process that started it.
- A driver in this process: ``os.environ.update(c.env())`` **before** ``import ray``
  (Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import).
- A driver must not outlive the GCS: Ray ends a driver process whose GCS has been gone
  for 60 s. Call ``ray.shutdown()`` before ``stop()``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"
MARKER_VAR = "RR_RAY_CLUSTER"  # in the environment of every process of one cluster
ROOT_PREFIX = "rr-ray-"
_LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# `python -c _LOOPBACK_CLI start --address=127.0.0.1:P ...`: the Ray CLI with loopback
# hosts kept as loopback (see the module docstring).
_LOOPBACK_CLI = """\
import sys
from ray._private import services
def _keep_loopback(host):
    if not host:
        raise ValueError(f"Malformed host: {host}")
    return "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else host
services.resolve_ip_for_localhost = _keep_loopback
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""

# A driver that waits until `n` nodes are alive and prints their ids by custom resource.
_WAIT_NODES = """\
import json, os, sys, time
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + float(sys.argv[2])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[1]):
        break
    if time.time() > deadline:
        sys.exit(f"only {len(alive)} nodes alive")
    time.sleep(0.2)
ids = {r: n["NodeID"] for n in alive for r in n["Resources"] if r.startswith("node_")}
ips = sorted({n["NodeManagerAddress"] for n in alive})
print("NODES " + json.dumps({"ids": ids, "ips": ips}))
"""


class RayClusterError(RuntimeError):
    """The cluster did not start; the message has the tail of its logs."""


def ray_executable() -> str:
    """The ``ray`` CLI of the running interpreter (its virtual environment's)."""
    cand = Path(sys.executable).with_name("ray")
    if not cand.exists():
        raise RayClusterError(f"no `ray` next to {sys.executable}: install the `ray` extra")
    return str(cand)


# --------------------------------------------------------------------------- ports


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    for host in (LOOPBACK, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _free_ports(k: int, taken: set[int]) -> list[int]:
    out: list[int] = []
    while len(out) < k:
        p = _free_port()
        if p not in taken and p not in out:
            out.append(p)
    taken.update(out)
    return out


def _free_port_range(n: int, taken: set[int], lo: int = 20000, hi: int = 32000) -> int:
    """Base of n consecutive free ports below Linux's ephemeral range (32768-60999), so
    that no port-0 bind of someone else takes one of them meanwhile."""
    for _ in range(200):
        base = random.randrange(lo, hi - n)
        ports = range(base, base + n)
        if not taken.intersection(ports) and all(_port_is_free(p) for p in ports):
            taken.update(ports)
            return base
    raise RayClusterError(f"no {n} consecutive free ports in [{lo}, {hi})")


def gcs_reachable(address: str, timeout: float = 1.0) -> bool:
    """TCP check of a GCS address: ``ray.init`` against a dead one hangs for minutes."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parens


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _has_marker(pid: int, marker: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_VAR}={marker}".encode() in env.split(b"\0")


def _matching_pids(sids: set[int], marker: str) -> list[int]:
    """Live processes in one of the sessions ``sids`` or carrying the cluster's marker."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            continue
        if int(fields[3]) in sids or _has_marker(pid, marker):
            out.append(pid)
    return out


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def _kill_cluster(sids: set[int], marker: str, grace: float) -> dict:
    """What ``ray stop`` does, for one cluster only: raylets first, the GCS last."""
    pids = _matching_pids(sids, marker)
    raylets = [p for p in pids if _comm(p) == "raylet"]
    gcs = [p for p in pids if _comm(p) == "gcs_server"]
    rest = [p for p in pids if p not in raylets and p not in gcs]
    forced = 0
    for group in (raylets, rest, gcs):
        _signal(group, signal.SIGTERM)
        left = _wait_gone(group, grace)
        if left:
            forced += len(left)
            _signal(left, signal.SIGKILL)
            _wait_gone(left, 2.0)
    # anything started meanwhile (a worker a dying raylet started), until none is left
    for _ in range(5):
        stragglers = _matching_pids(sids, marker)
        if not stragglers:
            break
        forced += len(stragglers)
        _signal(stragglers, signal.SIGKILL)
        _wait_gone(stragglers, 2.0)
    return {"found": len(pids), "forced": forced}


def listening_addresses(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket that one of ``pids`` listens on."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = pid
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                raw = bytes.fromhex(hexaddr)
                if v6:
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    addr = socket.inet_ntop(socket.AF_INET6, raw)
                else:
                    addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                out.append((addr, int(hexport, 16), inodes[cols[9]]))
    return sorted(out)


# --------------------------------------------------------------------------- the cluster

_STARTED: list[RayCluster] = []


class RayCluster:
    """A running two-node cluster; see ``start_ray_cluster``."""

    def __init__(self, root: Path, cluster_id: str, token_path: Path) -> None:
        self.root = root
        self.cluster_id = cluster_id
        self.token_path = token_path
        self.gcs_port = 0
        self.address = ""  # "127.0.0.1:<gcs port>", for ray.init(address=...)
        self.nodes: list[dict] = []  # name, temp_dir, sid, log, resource, ports
        self.node_ids: dict[str, str] = {}  # "node_a"/"node_b" -> Ray NodeID (hex)
        self.timings: dict[str, float] = {}
        self.stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        return f"<RayCluster {self.address} {state} root={self.root}>"

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The variables a driver of this cluster needs (``{**os.environ, **c.env()}``).

        In-process, set them before ``import ray``: Ray reads
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import, and without it ``ray.init`` rewrites
        127.0.0.1 to the outward address, where it retries for minutes.
        """
        return {
            _LOOPBACK_VAR: "0",  # keep 127.0.0.1 in ray.init(address=...)
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_gcs_server_port_wait_time_s": "5",  # fail in ~5 s, not 20+, if unreachable
            "RAY_ADDRESS": self.address,
        }

    def driver_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The whole environment of a driver subprocess: ours without the caller's RAY_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.pop(MARKER_VAR, None)
        env.update(self.env())
        env.update(extra or {})
        return env

    def run_driver(
        self, code: str, *args: str, timeout: float = 120.0, check: bool = True, extra_env=None
    ) -> subprocess.CompletedProcess:
        """Run ``code`` in a fresh ``python -c code *args`` driver (``RAY_ADDRESS`` is set)."""
        r = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.driver_env(extra_env),
            cwd=self.root,  # a folder of our own first on sys.path: nothing shadows the stdlib
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"driver failed (rc={r.returncode})\nSTDOUT:\n{r.stdout[-4000:]}\n"
                f"STDERR:\n{r.stderr[-4000:]}"
            )
        return r

    def sids(self) -> set[int]:
        return {n["sid"] for n in self.nodes}

    def pids(self) -> list[int]:
        """Every live process of this cluster (daemons, agents, workers, actors)."""
        return _matching_pids(self.sids(), self.cluster_id)

    def raylet_pid(self, node: str = "worker") -> int | None:
        sid = next(n["sid"] for n in self.nodes if n["name"] == node)
        for pid in self.pids():
            fields = _stat_fields(pid)
            if fields and int(fields[3]) == sid and _comm(pid) == "raylet":
                return pid
        return None

    def kill_worker_node(self) -> int:
        """SIGKILL the second node's raylet (node loss); returns its pid.

        Running tasks there fail with ``NodeDiedError`` within about 2 s; the GCS marks
        the node dead after about 15 s; its agents and workers stay until ``stop()``.
        """
        pid = self.raylet_pid("worker")
        if pid is None:
            raise RayClusterError("the worker node's raylet is not running")
        os.kill(pid, signal.SIGKILL)
        _wait_gone([pid], 5.0)
        return pid

    def log_tail(self, n: int = 40) -> str:
        out = []
        for node in self.nodes:
            p = Path(node["log"])
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {node['name']} ({p}) ---\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self, grace: float = 5.0, keep_dir: bool = False) -> dict:
        """Stop exactly this cluster's processes and remove its folder. Idempotent."""
        t0 = time.monotonic()
        res = _kill_cluster(self.sids(), self.cluster_id, grace)
        self.timings["stop_s"] = time.monotonic() - t0
        self.stopped = True
        if self in _STARTED:
            _STARTED.remove(self)
        if not keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)
        return res

    def _save_state(self) -> None:
        """Who started the cluster and its sessions, for ``_reap_orphans``."""
        state = {
            "owner_pid": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "sids": sorted(self.sids()),
            "cluster_id": self.cluster_id,
        }
        (self.root / "cluster.json").write_text(json.dumps(state))


def _reap_orphans() -> None:
    """Stop clusters whose starting process is gone (a pytest killed before teardown)."""
    for root in Path(tempfile.gettempdir()).glob(ROOT_PREFIX + "*"):
        try:
            state = json.loads((root / "cluster.json").read_text())
        except (OSError, ValueError):
            continue
        owner = state["owner_pid"]
        if _alive(owner) and _start_time(owner) == state["owner_start"]:
            continue
        _kill_cluster(set(state["sids"]), state["cluster_id"], grace=2.0)
        shutil.rmtree(root, ignore_errors=True)


@atexit.register
def _stop_all_at_exit() -> None:
    for c in list(_STARTED):
        c.stop()


def _node_flags(temp_dir: Path, cpus: int, store: int, resource: str, taken: set[int]) -> tuple:
    names = ["node_manager", "object_manager", "agent_http", "agent_grpc", "runtime_env", "metrics"]
    ports = dict(zip(names, _free_ports(len(names), taken)))
    wbase = _free_port_range(100, taken)
    flags = [
        f"--node-ip-address={LOOPBACK}",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        f"--object-store-memory={store}",
        f"--temp-dir={temp_dir}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--min-worker-port={wbase}",
        f"--max-worker-port={wbase + 99}",
        f"--resources={json.dumps({resource: 1})}",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
    ]
    ports["workers"] = wbase
    return flags, ports


def _ray_start(name: str, argv: list[str], env: dict, cwd: Path, log: Path, marker: str) -> int:
    """One ``ray start`` in a session of its own; returns the session id (its pid)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        _kill_cluster({proc.pid}, marker, grace=2.0)
        tail = log.read_text(errors="replace")[-3000:]
        raise RayClusterError(f"`ray start` of the {name} node failed (rc={rc}):\n{tail}")
    return proc.pid


def start_ray_cluster(cpus_per_node: int = 1, object_store_bytes: int = 100_000_000) -> RayCluster:
    """Start a head node (``node_a``) and a second node (``node_b``) on 127.0.0.1.

    Takes about 7-15 s on two cores, about 1.1 GB of memory. Raises RayClusterError (and
    leaves nothing running) when the cluster does not come up.
    """
    _reap_orphans()
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    c = RayCluster(root, secrets.token_hex(8), token)
    taken: set[int] = set()
    c.gcs_port, dash_port = _free_ports(2, taken)
    c.address = f"{LOOPBACK}:{c.gcs_port}"

    daemon_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    daemon_env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER_VAR: c.cluster_id,
        }
    )
    _STARTED.append(c)
    c._save_state()  # the marker alone finds its processes if this process dies now
    try:
        for name, resource in (("head", "node_a"), ("worker", "node_b")):
            temp_dir = root / name[0]  # /tmp/rr-ray-XXXXXXXX/h and .../w
            temp_dir.mkdir()
            flags, ports = _node_flags(temp_dir, cpus_per_node, object_store_bytes, resource, taken)
            env = dict(daemon_env)
            if name == "head":
                env[_LOOPBACK_VAR] = "0"
                argv = [
                    ray_executable(),
                    "start",
                    "--head",
                    f"--port={c.gcs_port}",
                    "--include-dashboard=false",
                    f"--dashboard-host={LOOPBACK}",
                    f"--dashboard-port={dash_port}",
                    *flags,
                ]
            else:  # no _LOOPBACK_VAR here: `ray start --address` aborts with it
                argv = [sys.executable, "-c", _LOOPBACK_CLI, "start", f"--address={c.address}"]
                argv += flags
            log = root / f"{name}.log"
            ts = time.monotonic()
            sid = _ray_start(name, argv, env, root, log, c.cluster_id)
            c.timings[f"start_{name}_s"] = time.monotonic() - ts
            node = {"name": name, "temp_dir": str(temp_dir), "sid": sid, "log": str(log)}
            c.nodes.append({**node, "resource": resource, "ports": ports})
            c._save_state()
        ts = time.monotonic()
        r = c.run_driver(_WAIT_NODES, "2", "60", timeout=120, check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("NODES ")]
        if r.returncode != 0 or not lines:
            raise RayClusterError(f"the cluster did not come up:\n{r.stderr[-3000:]}")
        nodes = json.loads(lines[-1][6:])
        if nodes["ips"] != [LOOPBACK] or sorted(nodes["ids"]) != ["node_a", "node_b"]:
            raise RayClusterError(f"unexpected nodes: {nodes}")
        c.node_ids = nodes["ids"]
        c.timings["wait_nodes_s"] = time.monotonic() - ts
    except BaseException as exc:
        logs = c.log_tail()
        c.stop()
        if isinstance(exc, RayClusterError):
            raise RayClusterError(f"{exc}\n{logs}") from None
        raise
    c.timings["start_total_s"] = time.monotonic() - t0
    return c


@contextlib.contextmanager
def ray_cluster(**kw) -> Iterator[RayCluster]:
    """``with ray_cluster() as c:``: a running two-node cluster, stopped afterwards."""
    c = start_ray_cluster(**kw)
    try:
        yield c
    finally:
        c.stop()


if __name__ == "__main__":  # python tests/ray_servers.py: start, show, stop
    with ray_cluster() as cl:
        print(cl, cl.node_ids)
        print("processes:", len(cl.pids()))
        print("listening:", listening_addresses(cl.pids()))
    print({k: round(v, 2) for k, v in cl.timings.items()})
