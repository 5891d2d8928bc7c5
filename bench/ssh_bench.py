"""Measures over SSH: real sshd instances from tests/servers.py on 127.0.0.1.

Each "host" is its own sshd and Unix user (``rrbench1``, ``rrbench2``: not the tests'
users, since stopping a server kills every process of its user). The remote Python is
Debian's /usr/bin/python3, which has no cloudpickle: the naive per-call baseline gets
cloudpickle's own source uploaded once with SFTP into ~/.rrbench/site (PYTHONPATH).

remoterun's side needs ``rr.cluster`` (remoterun/systems/ssh/); until it exists its
rows say "n/a (rr.cluster not available)" and the baselines still run.
"""

from __future__ import annotations

import base64
import itertools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import floors
import peers
import tasks
from harness import (
    Context,
    Row,
    Stats,
    as_rate,
    at_least,
    at_most,
    baseline_row,
    measure,
    ratio_at_least,
    ratio_at_most,
    rr_side,
    side_by_side,
    stats_of,
)
from local_bench import MAP_ITEMS, NAIVE, pickled_call

import remoterun as rr

TESTS = Path(__file__).resolve().parent.parent / "tests"
USERS = ("rrbench1", "rrbench2")
MB = 1_000_000
BIG = 100 * MB  # the argument-and-result round trip
RESULT = 10 * MB  # the "10 MB array" result
REMOTE_SITE = ".rrbench/site"  # relative to the remote home (SFTP starts there)


# ---------------------------------------------------------------------------- servers


def server(ctx: Context, index: int) -> Any:
    """SSH host ``index`` (0 or 1): a started ``SshServer``, stopped by ``ctx.close()``."""

    def start() -> tuple[Any, Callable[[], None]]:
        if os.geteuid() != 0:
            raise RuntimeError("needs root (sshd for separate users)")
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        from servers import SshServer, ensure_openssh_server

        ensure_openssh_server()
        host = SshServer(USERS[index])
        try:
            host.start()
            host.remote_python()
            host.run("rm -rf ~/.remoterun ~/.rrbench")  # start from a clean home
        except BaseException:
            host.stop()
            raise

        def stop() -> None:
            try:
                host.run("rm -rf ~/.remoterun ~/.rrbench ~/.rrbench-1kb")  # leave no litter
            finally:
                host.stop()

        return host, stop

    return ctx.resource(f"sshd-{index}", start)


def client(ctx: Context, index: int = 0) -> Any:
    """One paramiko connection to host ``index``, TCP_NODELAY set, kept for the run."""

    def start() -> tuple[Any, Callable[[], None]]:
        import socket

        conn = server(ctx, index).connect()
        conn.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, conn.close

    return ctx.resource(f"ssh-client-{index}", start)


def channel_floor(ctx: Context, index: int = 0) -> floors.FrameWorker:
    """The raw floor: ``python3 -u -c WORKER`` on one exec channel of ``client``."""

    def start() -> tuple[floors.FrameWorker, Callable[[], None]]:
        worker = floors.channel_worker(client(ctx, index), server(ctx, index).remote_python())
        assert worker.request(b"E", b"ping") == b"ping"
        return worker, worker.close

    return ctx.resource(f"channel-floor-{index}", start)


def upload_cloudpickle(conn: Any) -> None:
    """Put this cloudpickle's source into ``~/.rrbench/site`` on the host, with SFTP."""
    source = Path(cloudpickle.__file__).parent
    sftp = conn.open_sftp()
    try:
        path = ""
        for part in (*REMOTE_SITE.split("/"), "cloudpickle"):
            path = f"{path}/{part}" if path else part
            try:
                sftp.mkdir(path)
            except OSError:
                pass  # exists
        for file in source.glob("*.py"):
            sftp.put(str(file), f"{path}/{file.name}")
    finally:
        sftp.close()


def naive_exec(ctx: Context, conn: Any | None = None) -> Callable[[], int]:
    """A call as a new exec per call: ``python3 -c NAIVE <base64 call>`` on a connection."""
    python = server(ctx, 0).remote_python()
    ctx.resource("remote-cloudpickle", lambda: (upload_cloudpickle(client(ctx)), lambda: None))
    command = (
        f"PYTHONPATH=$HOME/{REMOTE_SITE} {shlex.quote(python)} -c {shlex.quote(NAIVE)} "
        + pickled_call(tasks.inc, 1)
    )

    def call() -> int:
        _, stdout, stderr = (conn or client(ctx)).exec_command(command)
        out = stdout.read()
        if stdout.channel.recv_exit_status() != 0:
            raise RuntimeError(stderr.read().decode(errors="replace")[-200:])
        return cloudpickle.loads(base64.b64decode(out))

    return call


def naive_ssh(ctx: Context) -> Stats:
    """A new exec channel per call on the existing connection."""
    return ctx.once("naive-ssh", lambda: measure(naive_exec(ctx), ctx.n(30, 6), warmup=2))


def new_connection(ctx: Context) -> Stats:
    """Connect, authenticate, exec the naive call, close: per call."""

    def call() -> int:
        conn = server(ctx, 0).connect()
        try:
            return naive_exec(ctx, conn)()
        finally:
            conn.close()

    return ctx.once("new-connection", lambda: measure(call, ctx.n(15, 3), warmup=1))


def execnet_ssh(ctx: Context) -> dict[str, Any]:
    """execnet over the OpenSSH client (``ssh -C``): start, trivial calls, 100 MB echo."""

    def run() -> dict[str, Any]:
        host = server(ctx, 0)
        with tempfile.TemporaryDirectory(prefix="bench-execnet-") as tmp:
            config = os.path.join(tmp, "ssh_config")
            Path(config).write_text(host.ssh_config("rrbench"))
            spec = f"ssh_config={config}//ssh=rrbench//python={host.remote_python()}"
            args = ["--spec", spec, "--n", str(ctx.n(500, 100))]
            args += ["--mb", str(BIG // MB), "--mb-n", str(ctx.n(2, 1))]
            return peers.run_peer("execnet", "peer_execnet.py", *args, timeout=600)

    return ctx.once("execnet-ssh", run)


# ---------------------------------------------------------------------------- remoterun


def cluster_api() -> Callable[..., Any]:
    """``rr.cluster``, or RuntimeError("rr.cluster not available")."""
    try:
        return rr.cluster  # type: ignore[attr-defined]
    except (AttributeError, ImportError) as exc:
        raise RuntimeError("rr.cluster not available") from exc


def make_cluster(ctx: Context, name: str, index: int = 0, transport: str | None = None) -> Any:
    """``rr.cluster`` on host ``index``, with its own key and known_hosts (SPEC §2, §5);
    over ``transport`` (None: the default)."""
    host = server(ctx, index)
    options = {"transport": transport} if transport else {}
    return cluster_api()(
        name,
        host=host.host,
        user=host.user,
        port=host.port,
        key=host.client_key_path,
        known_hosts=host.known_hosts_path,
        python=host.remote_python(),
        **options,
    )


def make_pool(ctx: Context, name: str) -> Any:
    """A 2-host ``rr.cluster(name, hosts=[alias, alias], ssh_config=FILE)``.

    The hosts are aliases of a private ssh_config (HostName, Port, User, IdentityFile of
    each sshd); one known_hosts file holds both host keys.
    """
    make = cluster_api()  # before starting a second sshd for nothing
    hosts = [server(ctx, 0), server(ctx, 1)]
    folder = hosts[0].tmpdir
    aliases = [f"rrbench-{i + 1}" for i in range(len(hosts))]
    config = os.path.join(folder, "pool_ssh_config")
    Path(config).write_text("".join(h.ssh_config(a) for h, a in zip(hosts, aliases)))
    known = os.path.join(folder, "pool_known_hosts")
    Path(known).write_text("".join(h.known_hosts_line + "\n" for h in hosts))
    return make(
        name,
        hosts=aliases,
        ssh_config=config,
        known_hosts=known,
        python=hosts[0].remote_python(),
    )


def close_cluster(cluster: Any) -> None:
    """Close a cluster's connections, whatever remoterun.systems.ssh names that."""
    for name in ("close", "shutdown", "disconnect"):
        method = getattr(cluster, name, None)
        if callable(method):
            method()
            return


def warm_cluster(ctx: Context, transport: str | None = None) -> Any:
    """The cluster every warm measure uses (over ``transport``), after one call."""

    def start() -> tuple[Any, Callable[[], None]]:
        cluster = make_cluster(ctx, f"{ctx.prefix}-warm-{transport}", transport=transport)
        rr.function(tasks.inc, system=cluster)(1)
        return cluster, lambda: close_cluster(cluster)

    return ctx.resource(f"rr-cluster-{transport}", start)


_CLUSTER_NUMBERS = itertools.count()  # new clusters' names, unique in this run


def first_calls(
    ctx: Context, label: str, n: int, *, fresh: bool, transport: str | None = None
) -> Stats:
    """``n`` times: a new cluster on host 0 (over ``transport``) and its first call, timed
    together; with ``fresh``, the host's package is removed first, so the call installs it."""
    samples = []
    for _ in range(n):
        if fresh:
            server(ctx, 0).run("rm -rf ~/.remoterun/pkg")
        start = time.perf_counter()
        name = f"{ctx.prefix}-{label}-{next(_CLUSTER_NUMBERS)}"
        cluster = make_cluster(ctx, name, transport=transport)
        try:
            rr.function(tasks.inc, system=cluster)(1)
            samples.append(time.perf_counter() - start)
        finally:
            close_cluster(cluster)
    return stats_of(samples)


# ---------------------------------------------------------------------------- measures


def ssh_cold(ctx: Context) -> list[Row]:
    """Create a cluster and make its first call: on a fresh host (the agent is uploaded)
    and on a host that has it already."""
    n = ctx.n(7, 2)
    target = at_most(0.5, "≤ 0.5 s")
    fresh, fresh_note = rr_side(lambda: first_calls(ctx, "cold", n, fresh=True))
    again, again_note = rr_side(lambda: first_calls(ctx, "cold", n, fresh=False))
    fresh_name = "ssh: cold start (fresh host, agent upload)"
    new_conn = "new connection + exec per call"
    return [
        baseline_row(
            fresh_name, "s", fresh, new_conn, lambda: new_connection(ctx), target, fresh_note
        ),
        baseline_row(
            fresh_name,
            "s",
            fresh,
            "execnet ssh gateway + first call",
            lambda: stats_of([execnet_ssh(ctx)["start"]]),
            target,
            fresh_note,
        ),
        baseline_row(
            "ssh: cold start (agent already there)",
            "s",
            again,
            new_conn,
            lambda: new_connection(ctx),
            target,
            again_note,
        ),
    ]


def ssh_sync(ctx: Context) -> list[Row]:
    """Synchronous call of a trivial function on a warm cluster."""
    n = ctx.n(3000, 500)

    def rr_call() -> Callable[[], Any]:
        f = rr.function(tasks.inc, system=warm_cluster(ctx))
        return lambda: f(1)

    frame = floors.dumps_call(tasks.inc, (1,))  # a trivial call's size, echoed
    stats, note, floor = side_by_side(
        rr_call, lambda: channel_floor(ctx).request(b"E", frame), n, 50
    )
    baselines: list[tuple[str, Callable[[], Stats]]] = [
        ("raw paramiko channel echo", floor),
        ("naive ssh exec python3 -c per call", lambda: naive_ssh(ctx)),
        ("new connection + exec per call", lambda: new_connection(ctx)),
        ("execnet over ssh (-C)", lambda: stats_of(execnet_ssh(ctx)["calls"])),
    ]
    target = at_most(0.5e-3, "≤ 0.5 ms")
    return [
        baseline_row("ssh: sync call", "s", stats, name, base, target, note)
        for name, base in baselines
    ]


def ssh_result(ctx: Context) -> list[Row]:
    """A call returning 10 MB."""
    n = ctx.n(30, 6)

    def rr_call() -> Callable[[], Any]:
        f = rr.function(tasks.zeros, system=warm_cluster(ctx))
        return lambda: f(RESULT)

    stats, note, floor = side_by_side(rr_call, lambda: channel_floor(ctx).zeros(RESULT), n, 2)
    return [
        baseline_row(
            "ssh: call returning 10 MB",
            "s",
            stats,
            "raw channel: 10 MB reply",
            floor,
            at_most(60e-3, "≤ 60 ms"),
            note,
        )
    ]


def ssh_recorded(ctx: Context) -> list[Row]:
    """Recorded run, start to result."""
    names = (f"{ctx.prefix}-rec-{i}" for i in range(10_000))

    def runs() -> Stats:
        f = rr.function(tasks.inc, system=warm_cluster(ctx))
        return measure(lambda: f(1, run_name=next(names)), ctx.n(100, 15), 3)

    stats, note = rr_side(runs)
    return [
        baseline_row(
            "ssh: recorded run",
            "s",
            stats,
            "naive ssh exec python3 -c per call",
            lambda: naive_ssh(ctx),
            at_most(5e-3, "≤ 5 ms"),
            note,
        )
    ]


def ssh_hit(ctx: Context) -> list[Row]:
    """``get_or_call`` hit on the cluster after one execution."""
    n = ctx.n(1000, 200)

    def hits() -> Stats:
        f = rr.function(tasks.inc, system=warm_cluster(ctx))
        name = f"{ctx.prefix}-hit"
        f.get_or_call(1, run_name=name)
        return measure(lambda: f.get_or_call(1, run_name=name), n, 20)

    def sftp_1kb() -> Stats:
        sftp = client(ctx).open_sftp()
        data = os.urandom(1024)

        def write_read() -> None:
            with sftp.open(".rrbench-1kb", "wb") as out:
                out.write(data)
            with sftp.open(".rrbench-1kb", "rb") as back:
                assert back.read() == data

        try:
            return measure(write_read, ctx.n(300, 60), 10)
        finally:
            sftp.remove(".rrbench-1kb")
            sftp.close()

    stats, note = rr_side(hits)
    return [
        baseline_row(
            "ssh: get_or_call hit",
            "s",
            stats,
            "SFTP 1 KB write + read",
            sftp_1kb,
            at_most(1e-3, "≤ 1 ms"),
            note,
        )
    ]


def ssh_throughput(ctx: Context) -> list[Row]:
    """100 MB argument and result round trip, in MB/s moved (both directions counted)."""
    data = bytes(BIG)
    n = ctx.n(7, 2)

    def rr_call() -> Callable[[], Any]:
        f = rr.function(tasks.echo, system=warm_cluster(ctx))
        return lambda: f(data)

    times, note, floor_times = side_by_side(
        rr_call, lambda: channel_floor(ctx).request(b"E", data), n, 1
    )
    stats = as_rate(times, 2 * BIG / MB) if times else None

    def raw_echo() -> Stats:
        return as_rate(floor_times(), 2 * BIG / MB)

    def raw_sink() -> Stats:
        return as_rate(measure(lambda: channel_floor(ctx).request(b"S", data), n, 1), BIG / MB)

    def execnet() -> Stats:
        return as_rate(stats_of(execnet_ssh(ctx)["bytes"]), 2 * BIG / MB)

    name = "ssh: 100 MB arg+result"
    return [
        baseline_row(
            name,
            "MB/s",
            stats,
            "raw channel echo 100 MB",
            raw_echo,
            ratio_at_least(0.7, "≥ 70% of raw"),
            note,
        ),
        baseline_row(name, "MB/s", stats, "raw channel one way (sink)", raw_sink, None, note),
        baseline_row(name, "MB/s", stats, "execnet over ssh (-C)", execnet, None, note),
    ]


def ssh_map(ctx: Context) -> list[Row]:
    """``map`` of 2,000 trivial calls over a 2-host cluster, in calls/s."""
    items = list(range(MAP_ITEMS))
    n = ctx.n(7, 2)

    def rr_map() -> Stats:
        def start() -> tuple[Any, Callable[[], None]]:
            pool = make_pool(ctx, f"{ctx.prefix}-pool")
            return pool, lambda: close_cluster(pool)

        f = rr.function(tasks.inc, system=ctx.resource("rr-pool", start))
        return as_rate(measure(lambda: f.map(items), n, 1), MAP_ITEMS)

    def floor() -> Stats:
        frame = floors.dumps_call(tasks.inc, (1,))
        worker = channel_floor(ctx)
        return as_rate(
            measure(lambda: [worker.request(b"E", frame) for _ in items], n, 1), MAP_ITEMS
        )

    stats, note = rr_side(rr_map)
    return [
        baseline_row(
            f"ssh: map {MAP_ITEMS:,} calls, 2 hosts",
            "calls/s",
            stats,
            "raw channel echo, one at a time, 1 host",
            floor,
            at_least(2000, "≥ 2,000 calls/s"),
            note,
        )
    ]


def runhouse(ctx: Context) -> list[Row]:
    """Runhouse 0.0.42 is an optional baseline (SPEC §9): not set up here."""
    note = "skipped (optional; see SPEC §9)"
    return [
        Row(
            "runhouse 0.0.42 (optional peer)",
            "s",
            rr_note=note,
            baseline="runhouse",
            base_note=note,
        )
    ]


# ---------------------------------------------------------------------------- transports


# What every raw ssh pipe here adds to the test host's own options: no terminal, and
# AES-GCM first, as the openssh transport does.
_RAW_SSH = ["-T", "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]


def ssh_pipe_floor(ctx: Context, over_master: bool) -> floors.FrameWorker:
    """The raw ssh binary pipe: ``ssh HOST python3 -u -c WORKER`` answering frames, on
    a connection of its own, or as a session over the openssh cluster's master."""

    def start() -> tuple[floors.FrameWorker, Callable[[], None]]:
        host = server(ctx, 0)
        if over_master:
            link = warm_cluster(ctx, "openssh").hosts[0].link
            via = link._session()  # the agent's own command line, without the agent
        else:
            args = host.ssh_args()
            via = [*args[:-1], *_RAW_SSH, "--", args[-1]]
        worker = floors.pipe_worker(host.remote_python(), via=via)
        assert worker.request(b"E", b"ping") == b"ping"
        return worker, worker.close

    return ctx.resource(f"ssh-pipe-floor-{over_master}", start)


def ssh_transport(ctx: Context) -> list[Row]:
    """The openssh transport against the paramiko transport and raw ssh pipes, each pair
    timed call by call in alternation (issue 13's goals)."""
    data = bytes(BIG)
    frame = floors.dumps_call(tasks.inc, (1,))

    def calls(fn: Callable[..., Any], *args: Any) -> Callable[[str], Callable[[], Any]]:
        def make(transport: str) -> Callable[[], Any]:
            f = rr.function(fn, system=warm_cluster(ctx, transport))
            return lambda: f(*args)

        return make

    rows: list[Row] = []
    big = calls(tasks.echo, data)
    n = ctx.n(7, 2)
    name = "ssh/openssh: 100 MB arg+result"
    times, note, paramiko = side_by_side(lambda: big("openssh"), big("paramiko"), n, 1)
    rate = as_rate(times, 2 * BIG / MB) if times else None
    rows.append(
        baseline_row(
            name,
            "MB/s",
            rate,
            "paramiko transport",
            lambda: as_rate(paramiko(), 2 * BIG / MB),
            ratio_at_least(1.4, "≥ 1.4× paramiko"),
            note,
        )
    )
    for over_master, label in ((False, "own connection"), (True, "over the master")):
        times, note, floor = side_by_side(
            lambda: big("openssh"),
            lambda o=over_master: ssh_pipe_floor(ctx, o).request(b"E", data),
            n,
            1,
        )
        rows.append(
            baseline_row(
                name,
                "MB/s",
                as_rate(times, 2 * BIG / MB) if times else None,
                f"raw ssh pipe echo ({label})",
                lambda f=floor: as_rate(f(), 2 * BIG / MB),
                ratio_at_least(0.85, "≥ 85% of raw"),
                note,
            )
        )

    reply = calls(tasks.zeros, RESULT)
    times, note, paramiko = side_by_side(
        lambda: reply("openssh"), reply("paramiko"), ctx.n(30, 6), 2
    )
    rows.append(
        baseline_row(
            "ssh/openssh: call returning 10 MB",
            "s",
            times,
            "paramiko transport",
            paramiko,
            ratio_at_most(0.75, "≤ 0.75× paramiko"),
            note,
        )
    )
    # Where the floor is: the same 10 MB coming back over a bare ssh pipe (no pickling).
    times, note, floor = side_by_side(
        lambda: reply("openssh"),
        lambda: ssh_pipe_floor(ctx, False).zeros(RESULT),
        ctx.n(30, 6),
        2,
    )
    rows.append(
        baseline_row(
            "ssh/openssh: call returning 10 MB", "s", times, "raw ssh pipe reply", floor, None, note
        )
    )

    sync = calls(tasks.inc, 1)
    n = ctx.n(2000, 300)
    name = "ssh/openssh: sync call"
    times, note, floor = side_by_side(
        lambda: sync("openssh"), lambda: ssh_pipe_floor(ctx, False).request(b"E", frame), n, 50
    )
    rows.append(
        baseline_row(
            name, "s", times, "raw ssh pipe echo", floor, ratio_at_most(1.3, "≤ 1.3× raw"), note
        )
    )
    times, note, paramiko = side_by_side(lambda: sync("openssh"), sync("paramiko"), n, 50)
    rows.append(baseline_row(name, "s", times, "paramiko transport", paramiko, None, note))

    def fresh(transport: str) -> Stats:
        return first_calls(ctx, "fresh", ctx.n(5, 2), fresh=True, transport=transport)

    stats, note = rr_side(lambda: fresh("openssh"))
    rows.append(
        baseline_row(
            "ssh/openssh: first call, fresh host",
            "s",
            stats,
            "paramiko transport",
            lambda: fresh("paramiko"),
            at_most(0.5, "≤ 0.5 s"),
            note,
        )
    )
    return rows


MEASURES: dict[str, Callable[[Context], list[Row]]] = {
    "ssh.cold": ssh_cold,
    "ssh.sync": ssh_sync,
    "ssh.result": ssh_result,
    "ssh.recorded": ssh_recorded,
    "ssh.hit": ssh_hit,
    "ssh.throughput": ssh_throughput,
    "ssh.map": ssh_map,
    "ssh.transport": ssh_transport,
    "runhouse": runhouse,
}
