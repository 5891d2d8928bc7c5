"""The fault suite (issue 10, "Trust"): every fault remoterun must survive, reproduced
against real processes (forked workers, sshd, moto S3), with a table of counts per case.

    .venv/bin/python bench/faults.py                 # every case, full sizes (~2-4 min)
    .venv/bin/python bench/faults.py --quick         # the fast cases at small sizes (CI)
    .venv/bin/python bench/faults.py --only race.local,kill --processes 4 --rounds 3
    .venv/bin/python bench/faults.py --list

Each case counts ``executions`` (function bodies that ran, from marker files they append
to), ``lost`` (runs that ended ``worker lost``), ``stuck`` (runs or functions still going
when they should have ended) and ``wrong`` (a wrong value, a wrong error, a leftover), and
passes when the counts are the ones it expects. The exit code is 1 when a case fails.

SSH cases start their own sshd serving the Unix user ``<prefix>_a`` (``rrfaults_a``, or
``$RR_TEST_USER_PREFIX``): stopping it kills every process of that user, so do not share
the prefix with a test suite running at the same time. The disk-full case mounts a tmpfs
and needs root; without root (or without sshd) those cases are skipped.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
for _path in (str(HERE), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import remote_tasks as tasks  # noqa: E402
import servers  # noqa: E402

import remoterun as rr  # noqa: E402

MB = 1 << 20
#: How long a fault may take to be noticed before the run counts as stuck.
NOTICE = 5.0


# ---------------------------------------------------------------------------- sizes, counts


@dataclass(frozen=True)
class Sizes:
    """The sizes of the racing and soak cases."""

    processes: int = 16  # racing client processes
    rounds: int = 20  # rounds of the race, one run name each
    soak: int = 400  # runs in the soak
    kill_every: int = 10  # the soak SIGKILLs the worker of every n-th run (10%)


QUICK = Sizes(processes=8, rounds=3, soak=40)


@dataclass
class Counts:
    """What one case saw."""

    executions: int = 0
    lost: int = 0
    stuck: int = 0
    wrong: int = 0
    notes: list[str] = field(default_factory=list)

    def bad(self, note: str) -> None:
        """Count one wrong outcome and say what it was."""
        self.wrong += 1
        self.notes.append(note)


class Skip(Exception):
    """The case cannot run on this machine (no root, no sshd, no moto)."""


@dataclass(frozen=True)
class Case:
    """A fault to reproduce: ``run(faults)`` returns the counts, ``expect(sizes)`` the
    counts it must have (only the keys given are checked)."""

    name: str
    what: str
    run: Callable[[Faults], Counts]
    expect: Callable[[Sizes], dict[str, int]]
    quick: bool


@dataclass
class Outcome:
    case: Case
    expected: dict[str, int]
    counts: Counts | None = None
    seconds: float = 0.0
    error: str = ""
    skipped: str = ""

    @property
    def passed(self) -> bool | None:
        """True or False; None when skipped."""
        if self.skipped:
            return None
        if self.counts is None:
            return False
        return all(getattr(self.counts, k) == v for k, v in self.expected.items())


CASES: dict[str, Case] = {}
NOTHING_WRONG = {"lost": 0, "stuck": 0, "wrong": 0}


def case(
    name: str,
    what: str,
    *,
    quick: bool = True,
    expect: Callable[[Sizes], dict[str, int]] | dict[str, int] | None = None,
) -> Callable[[Callable[[Faults], Counts]], Callable[[Faults], Counts]]:
    """Register a case under ``name``."""
    if expect is None:
        expect = {"executions": 1, **NOTHING_WRONG}
    wanted = expect if callable(expect) else (lambda _sizes, fixed=expect: dict(fixed))

    def register(fn: Callable[[Faults], Counts]) -> Callable[[Faults], Counts]:
        CASES[name] = Case(name, what, fn, wanted, quick)
        return fn

    return register


def system_case(
    name: str,
    what: str,
    *,
    kinds: tuple[str, ...] = ("local", "ssh"),
    slow: tuple[str, ...] = (),
    expect: Callable[[Sizes], dict[str, int]] | dict[str, int] | None = None,
) -> Callable[[Callable[[Faults, Any], Counts]], Callable[[Faults, Any], Counts]]:
    """Register ``name.<kind>`` for each kind of system: ``fn(faults, system)``."""

    def register(fn: Callable[[Faults, Any], Counts]) -> Callable[[Faults, Any], Counts]:
        for kind in kinds:
            case(f"{name}.{kind}", f"{what} ({kind})", quick=kind not in slow, expect=expect)(
                lambda faults, kind=kind: fn(faults, faults.system(kind))
            )
        return fn

    return register


# ---------------------------------------------------------------------------- the context


class Faults:
    """What the cases share: the sizes, a scratch folder every host user may write to,
    and the servers, started here on first use unless ``ssh_server`` / ``moto_server``
    give them (callables, e.g. the pytest fixtures' own)."""

    def __init__(
        self,
        sizes: Sizes,
        *,
        ssh_server: Callable[[], servers.SshServer] | None = None,
        moto_server: Callable[[], servers.MotoS3Server] | None = None,
    ):
        self.sizes = sizes
        self._ssh_given = ssh_server
        self._moto_given = moto_server
        self._ssh: servers.SshServer | None = None
        self._moto: servers.MotoS3Server | None = None
        self._stops: list[Callable[[], None]] = []  # servers started here
        self._systems: list[Any] = []  # closed after each case
        self.tmp = Path(tempfile.mkdtemp(prefix="rr-faults-"))
        self.tmp.chmod(0o1777)

    def folder(self, label: str) -> Path:
        """A new empty folder that the SSH host's user may write to too."""
        path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.tmp))
        path.chmod(0o1777)
        return path

    # -- servers
    def ssh(self) -> servers.SshServer:
        if self._ssh is None and self._ssh_given is not None:
            self._ssh = self._ssh_given()
        if self._ssh is None:
            if os.geteuid() != 0:
                raise Skip("SSH cases need root (sshd serving a separate user)")
            prefix = os.environ.get("RR_TEST_USER_PREFIX") or "rrfaults"
            try:
                servers.ensure_openssh_server()
                server = servers.SshServer(f"{prefix}_a").start()
            except servers.ServerUnavailable as exc:
                raise Skip(f"no sshd: {exc}") from exc
            self._ssh = server
            self._stops.append(server.stop)
        return self._ssh

    def moto(self) -> servers.MotoS3Server:
        if self._moto is None and self._moto_given is not None:
            self._moto = self._moto_given()
        if self._moto is None:
            try:
                server = servers.MotoS3Server().start()
            except servers.ServerUnavailable as exc:
                raise Skip(f"no moto: {exc}") from exc
            self._moto = server
            self._stops.append(server.stop)
        return self._moto

    def bucket(self) -> str:
        """``s3://<a new bucket>`` on moto."""
        name = f"rr-faults-{uuid.uuid4().hex[:10]}"
        self.moto().filesystem().mkdir(name)
        return f"s3://{name}"

    # -- systems
    def system(self, kind: str, root: str | None = None) -> Any:
        """A new LocalSystem ("local") or SSH cluster ("ssh") with an empty run root;
        closed when the case ends."""
        if kind == "local":
            system = rr.LocalSystem(root=root or str(self.folder("runs")))
        else:
            server = self.ssh()
            system = rr.cluster(
                "faults",
                host=server.host,
                port=server.port,
                user=server.user,
                key=server.client_key_path,
                known_hosts=server.known_hosts_path,
                python=server.remote_python(),
                root=root or f"~/.remoterun/faults/{uuid.uuid4().hex[:12]}",
            )
        self._systems.append(system)
        return system

    def end_case(self) -> None:
        while self._systems:
            with contextlib.suppress(Exception):
                self._systems.pop().close()

    def close(self) -> None:
        self.end_case()
        if self._ssh is not None:
            with contextlib.suppress(Exception):
                self._ssh.run("rm -rf ~/.remoterun/faults")
        while self._stops:
            with contextlib.suppress(Exception):
                self._stops.pop()()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers


def big_value(size: int) -> bytes:
    """A return value of ``size`` bytes (the disk-full and copy cases)."""
    return b"x" * size


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def client_env(**extra: str) -> dict[str, str]:
    """The environment of a client process: this one's, with ``tests/`` importable."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def start_client(system: Any, body: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """A separate client process (its own session) running ``body`` with ``s`` bound to
    ``system``, ``t`` to the test tasks and ``rr`` to remoterun."""
    data = base64.b64encode(pickle.dumps(system)).decode()
    script = (
        "import os, sys, time, base64, pickle, remoterun as rr, remote_tasks as t\n"
        f"s = pickle.loads(base64.b64decode({data!r}))\n" + body
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(**env),
        start_new_session=True,
    )


def kill_client(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a client's whole process group (the client and its local agent)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def read_pid(path: Path, timeout: float = 30.0) -> int | None:
    """The pid a function wrote to ``path``, once it has."""
    if not wait_until(lambda: path.exists() and path.read_text().strip() != "", timeout):
        return None
    return int(path.read_text())


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def nearest(pid: int, match: Callable[[int], bool]) -> int | None:
    """``pid`` or its nearest ancestor for which ``match`` holds."""
    current: int | None = pid
    while current and current > 1:
        if match(current):
            return current
        current = parent_of(current)
    return None


def force_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def stops_within(pid: int, timeout: float = NOTICE) -> bool:
    """True if ``pid`` is gone within ``timeout``; else SIGKILL it (cleanup) and False."""
    if wait_until(lambda: not servers.pid_alive(pid), timeout):
        return True
    force_kill(pid)
    return False


def executions(marker: Path) -> int:
    return tasks.executions(str(marker))


def short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:90]


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def end_of(run: rr.Run, counts: Counts, timeout: float = 30.0) -> Any:
    """``run.result(timeout)``, counted: lost, stuck, or the value (None otherwise)."""
    try:
        return run.result(timeout=timeout)
    except rr.WorkerLostError:
        counts.lost += 1
    except TimeoutError:
        counts.stuck += 1
        counts.notes.append(f"{run.name} still {run.status} after {timeout:.0f} s")
    except Exception as exc:  # noqa: BLE001 - counted as wrong, with what it was
        counts.bad(f"{run.name}: {short(exc)}")
    return None


# ---------------------------------------------------------------------------- racing

RACER = """
n, rounds, folder, index = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
fn = rr.function(t.record_call, system=s)
rr.function(t.identity, system=s)(0)  # connected, agent started: before the first barrier
for k in range(rounds):
    open(os.path.join(folder, f"ready-{k}-{index}"), "w").close()
    deadline = time.monotonic() + 120
    while sum(f.startswith(f"ready-{k}-") for f in os.listdir(folder)) < n:
        assert time.monotonic() < deadline, "barrier timed out"
        time.sleep(0.002)
    marker = os.path.join(folder, f"round-{k}.txt")
    print("round", k, fn.get_or_call(marker, k, 0.2, run_name=f"race-{k}"), flush=True)
"""


@system_case(
    "race",
    "N processes x R rounds call get_or_call for one name at once: one execution a round",
    slow=("ssh",),
    expect=lambda sizes: {"executions": sizes.rounds, "wrong": 0},
)
def race(faults: Faults, system: Any) -> Counts:
    n, rounds = faults.sizes.processes, faults.sizes.rounds
    folder = faults.folder("race")
    racers = [
        start_client(system, RACER, str(n), str(rounds), str(folder), str(i)) for i in range(n)
    ]
    counts = Counts()
    for i, racer in enumerate(racers):
        try:
            out, err = racer.communicate(timeout=60 + rounds * 10)
        except subprocess.TimeoutExpired:
            kill_client(racer)
            counts.stuck += 1
            continue
        # the racer that executes a round also prints the function's own output
        got = dict(line.split()[1:] for line in out.splitlines() if line.startswith("round "))
        expected = {str(k): str(2 * k) for k in range(rounds)}
        if racer.returncode != 0 or got != expected:
            tail = err.strip().splitlines()[-1:] or [f"exit {racer.returncode}"]
            counts.bad(f"racer {i}: {tail[0][:80]}")
    for k in range(rounds):
        done = executions(folder / f"round-{k}.txt")
        counts.executions += done
        if done != 1:
            counts.bad(f"round {k}: {done} executions")
    return counts


# ---------------------------------------------------------------------------- killing


@system_case(
    "kill.worker",
    "SIGKILL a recorded run's worker: FAILED 'worker lost', its child process killed too",
    expect={"executions": 1, "lost": 1, "stuck": 0, "wrong": 0},
)
def kill_worker(faults: Faults, system: Any) -> Counts:
    pidfile = faults.folder("kill-worker") / "child.pid"
    run = rr.function(tasks.spawn_sleeper, system=system).run(str(pidfile), run_name="victim")
    counts = Counts()
    child = read_pid(pidfile)
    if child is None:
        counts.bad("the function never started its child")
        return counts
    counts.executions = 1
    os.kill(run.config["pid"], signal.SIGKILL)
    try:
        run.result(timeout=NOTICE)
        counts.bad("the killed run returned a value")
    except rr.WorkerLostError as exc:
        counts.lost += "worker lost" in str(exc)
    except TimeoutError:
        counts.stuck += 1
    except Exception as exc:  # noqa: BLE001
        counts.bad(short(exc))
    if system.get_run("victim").status is not rr.RunStatus.FAILED:
        counts.bad(f"status {system.get_run('victim').status} after the kill")
    if not stops_within(child):
        counts.bad("the worker's child process survived it (process group not killed)")
    return counts


@system_case(
    "kill.client",
    "SIGKILL the client (and its local agent) mid-run(): the run goes on and completes",
)
def kill_client_mid_run(faults: Faults, system: Any) -> Counts:
    gate = faults.folder("kill-client") / "gate"
    client = start_client(
        system,
        f"r = rr.function(t.wait_for_file, system=s).run({str(gate)!r}, run_name='orphan')\n"
        "print(r.name, flush=True)\n"
        "time.sleep(60)\n",
    )
    counts = Counts()
    started = client.stdout.readline().strip() == "orphan"
    kill_client(client)
    if not started:
        counts.bad("the client did not start the run")
        return counts
    gate.touch()
    value = end_of(rr.run(name="orphan", system=system), counts)
    if value == "finished":
        counts.executions = 1
    elif value is not None:
        counts.bad(f"result {value!r}")
    return counts


SYNC_CALL = "rr.function(t.note_pid_then_sleep, system=s)(sys.argv[1], 60)\n"


def _sync_call_killed(
    faults: Faults, system: Any, label: str, culprit: Callable[[int], int | None]
) -> Counts:
    """A synchronous call in a client process; SIGKILL ``culprit(function pid)``; the
    function must stop on the host within NOTICE seconds."""
    pidfile = faults.folder(label) / "fn.pid"
    client = start_client(system, SYNC_CALL, str(pidfile))
    counts = Counts()
    try:
        pid = read_pid(pidfile)
        if pid is None:
            counts.bad("the function never started")
            return counts
        counts.executions = 1
        target = culprit(pid)
        if target is None:
            counts.bad(f"no process to kill above the function (pid {pid})")
            force_kill(pid)
            return counts
        force_kill(target)
        if not stops_within(pid):
            counts.stuck += 1
            counts.notes.append(f"the function ran on {NOTICE:.0f} s after its {label}")
    finally:
        kill_client(client)
    return counts


@system_case(
    "kill.agent",
    "SIGKILL the agent mid synchronous call: the function stops on the host",
)
def kill_agent(faults: Faults, system: Any) -> Counts:
    def agent(pid: int) -> int | None:
        return nearest(pid, lambda p: "remoterun.agent" in command_line(p))

    return _sync_call_killed(faults, system, "agent", agent)


@system_case(
    "kill.session",
    "SIGKILL the sshd session mid synchronous call: the function stops on the host",
    kinds=("ssh",),
)
def kill_session(faults: Faults, system: Any) -> Counts:
    def session(pid: int) -> int | None:
        return nearest(pid, lambda p: process_name(p).startswith("sshd"))

    return _sync_call_killed(faults, system, "session", session)


# ---------------------------------------------------------------------------- copying

COPIER = "rr.run(path=sys.argv[1]).to(sys.argv[2])\nprint('copied', flush=True)\n"


@case(
    "copy.interrupted",
    "run.to(S3) SIGKILLed midway: the destination never looks like a run; copying again works",
)
def copy_interrupted(faults: Faults) -> Counts:
    size = 48 * MB
    system = faults.system("local")
    rr.function(big_value, system=system)(size, run_name="big")
    source = system.get_run("big")
    moto = faults.moto()
    dest = f"{faults.bucket()}/copies/big"
    s3 = moto.filesystem()
    counts = Counts(executions=1)
    copier = start_client(system, COPIER, source.folder.path, dest, **moto.env())
    try:

        def arrived_any() -> bool:
            s3.invalidate_cache()
            return bool(s3.find(dest))

        arrived = wait_until(arrived_any, 60, step=0.01)
    finally:
        kill_client(copier)
    if not arrived:
        counts.bad("the copy never started")
        return counts
    if copier.returncode == 0:
        counts.bad("the copy finished before the kill: nothing was interrupted")
    s3.invalidate_cache()
    if s3.exists(f"{dest}/config.json"):
        counts.bad("the interrupted copy wrote config.json")
    try:
        rr.run(path=dest, storage_options=moto.storage_options()).result(timeout=1)
        counts.bad("the interrupted copy gives a result")
    except (rr.RunNotFoundError, TimeoutError):
        pass
    except Exception as exc:  # noqa: BLE001
        counts.bad(f"reading the interrupted copy: {short(exc)}")
    with environment(**moto.env()):
        try:
            value = source.to(dest).result()
            if value != big_value(size):
                counts.bad("the second copy's result differs")
        except Exception as exc:  # noqa: BLE001
            counts.bad(f"copying again: {short(exc)}")
    return counts


# ---------------------------------------------------------------------------- damaged folders

VALUE = b"remoterun " * 400


def _damaged(faults: Faults, damage: Callable[[Path], None]) -> Counts:
    """Record a run, ``damage(folder)``, then read it three ways: each read raises
    CorruptRunError (get_or_call may also execute again), never returns a wrong value."""
    system = faults.system("local")
    marker = faults.folder("damaged") / "executions.txt"
    fn = rr.function(tasks.record_call, system=system)
    fn(str(marker), VALUE, run_name="victim")
    damage(Path(system.root, "victim"))
    counts = Counts()
    reads: list[tuple[str, Callable[[], Any], bool]] = [
        ("get_run().result()", lambda: system.get_run("victim").result(timeout=5), False),
        ("rr.run(path=).result()", lambda: rr.run(path=f"{system.root}/victim").result(5), False),
        ("get_or_call()", lambda: fn.get_or_call(str(marker), VALUE, run_name="victim"), True),
    ]
    for label, read, may_execute in reads:
        try:
            value = read()
        except rr.CorruptRunError:
            continue
        except Exception as exc:  # noqa: BLE001 - the wrong error is a wrong outcome
            counts.bad(f"{label}: {short(exc)}")
            continue
        if not (may_execute and value == VALUE * 2):
            counts.bad(f"{label} returned {str(value)[:40]!r}")
    counts.executions = executions(marker)
    return counts


def flip_a_byte(folder: Path) -> None:
    path = folder / "result.pkl"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the value's bytes: unpickles to another value
    path.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    path = folder / "result.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage_config(folder: Path) -> None:
    (folder / "config.json").write_bytes(b"\x00{not json at all")


def unknown_status(folder: Path) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["status"] = "BANANA"
    path.write_text(json.dumps(config))


# The damage leaves a folder that get_or_call may execute again into; ``executions`` is 1
# or 2 then, so it is not checked.
_DAMAGE_EXPECT = dict(NOTHING_WRONG)

for _name, _damage, _what in (
    ("corrupt.flip", flip_a_byte, "one byte of result.pkl flipped"),
    ("corrupt.truncate", truncate, "result.pkl cut to half"),
    ("corrupt.deleted", lambda folder: (folder / "result.pkl").unlink(), "result.pkl deleted"),
    ("corrupt.config", garbage_config, "config.json is garbage"),
    ("corrupt.status", unknown_status, "status BANANA in config.json"),
):
    case(
        _name,
        f"{_what}: rr.CorruptRunError, never a wrong value",
        expect=_DAMAGE_EXPECT,
    )(lambda faults, damage=_damage: _damaged(faults, damage))


@case(
    "corrupt.stray",
    "stray file, empty folder, dot file in the runs root: system.runs() and `remoterun ls` "
    "list the one run",
    expect={"executions": 1, "wrong": 0},
)
def stray_files(faults: Faults) -> Counts:
    system = faults.system("local")
    marker = faults.folder("stray") / "executions.txt"
    rr.function(tasks.record_call, system=system)(str(marker), 1, run_name="real")
    root = Path(system.root)
    (root / "notes.txt").write_text("not a run\n")
    (root / "scratch").mkdir()
    (root / ".DS_Store").write_bytes(b"\0\1")
    counts = Counts(executions=executions(marker))
    try:
        names = [run.name for run in system.runs()]
        if names != ["real"]:
            counts.bad(f"system.runs() lists {names}")
        for run in system.runs():
            run.status  # noqa: B018 - reading every listed run's status must work
    except Exception as exc:  # noqa: BLE001
        counts.bad(f"system.runs(): {short(exc)}")
    listing = subprocess.run(
        [sys.executable, "-c", "from remoterun.cli import main; main()", "ls", str(root)],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=60,
    )
    rows = [line.split()[0] for line in listing.stdout.splitlines()[1:] if line.split()]
    if listing.returncode != 0:
        tail = (listing.stderr.strip().splitlines() or ["?"])[-1]
        counts.bad(f"remoterun ls exit {listing.returncode}: {tail[:60]}")
    elif "real" not in rows or {"notes.txt", "scratch"} & set(rows):
        counts.bad(f"remoterun ls lists {rows}")
    return counts


# ---------------------------------------------------------------------------- a planted run


class Planted:
    """An object whose unpickling creates a folder: the proof that a pickle was loaded."""

    def __init__(self, evidence: str):
        self.evidence = evidence

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.evidence,))


PLANTER = """
# Someone who may write to the bucket but has no team key: a real run of the step,
# copied in, its result.pkl swapped for a pickle that creates a folder when loaded.
import hashlib, json, fsspec
store, marker, payload = sys.argv[1], sys.argv[2], base64.b64decode(sys.argv[3])
fn = rr.function(t.record_call, system=s)
fn(marker, 21, run_name="prep")
copy = s.get_run("prep").to(store + "/prep")
fs, path = fsspec.core.url_to_fs(copy.url)
fs.pipe_file(path + "/result.pkl", payload)
config = json.loads(fs.cat_file(path + "/config.json"))
if "digests" in config:  # anyone can compute a digest; only a key holder can sign
    config["digests"]["result.pkl"] = "sha256:" + hashlib.sha256(payload).hexdigest()
fs.pipe_file(path + "/config.json", json.dumps(config).encode())
print("planted", flush=True)
"""


@case(
    "planted",
    "an unsigned run planted in the shared S3 store, result.pkl creating a file when "
    "unpickled: never unpickled",
    expect={"wrong": 0},
)
def planted(faults: Faults) -> Counts:
    moto = faults.moto()
    store = f"{faults.bucket()}/team"
    work = faults.folder("planted")
    evidence = work / "unpickled"
    marker = work / "executions.txt"
    payload = pickle.dumps(Planted(str(evidence)))
    attacker = faults.system("local")
    counts = Counts()
    planter = start_client(
        attacker,
        PLANTER,
        store,
        str(marker),
        base64.b64encode(payload).decode(),
        REMOTERUN_HOME=str(faults.folder("attacker-home")),
        REMOTERUN_SIGNING_KEY="",
        **moto.env(),
    )
    out, err = planter.communicate(timeout=120)
    if "planted" not in out:
        counts.bad(f"planting failed: {(err.strip().splitlines() or ['?'])[-1][:70]}")
        return counts
    victim = faults.system("local")
    team_key = "team-key-" + hashlib.sha256(store.encode()).hexdigest()[:24]
    with environment(REMOTERUN_SIGNING_KEY=team_key, **moto.env()):
        fn = rr.function(tasks.record_call, system=victim, share=store)
        for label, read in (
            ("get_or_call", lambda: fn.get_or_call(str(marker), 21, run_name="prep")),
            ("get_or_run", lambda: fn.get_or_run(str(marker), 21, run_name="prep").result(30)),
        ):
            try:
                value = read()
                if value != 42:
                    counts.bad(f"{label} returned {value!r}")
            except rr.UntrustedRunError:
                pass
            except Exception as exc:  # noqa: BLE001
                counts.bad(f"{label}: {short(exc)}")
    if evidence.exists():
        counts.bad("the planted result.pkl was unpickled (its folder was created)")
    counts.executions = executions(marker) - 1  # the planter's own run is not counted
    return counts


# ---------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_tmpfs(faults: Faults, size: str = "20m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a new folder (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        raise Skip("mounting a tmpfs needs root")
    path = faults.folder("tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise Skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        faults.end_case()  # agents and workers let go of the mount first
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@case(
    "disk.full",
    "a 30 MB value on a 20 MB tmpfs run root: FAILED 'no space left on device' + path, no "
    "partial result.pkl; a 30 MB argument refused before the name is claimed",
)
def disk_full(faults: Faults) -> Counts:
    counts = Counts()
    with small_tmpfs(faults) as mount:
        system = faults.system("local", root=str(mount / "runs"))
        run = rr.function(big_value, system=system).run(30 * MB, run_name="too-big")
        counts.executions = 1
        try:
            run.result(timeout=60)
            counts.bad("a value larger than the disk was stored")
        except rr.WorkerLostError as exc:
            counts.lost += 1
            counts.notes.append(short(exc))
        except TimeoutError:
            counts.stuck += 1
        except Exception as exc:  # noqa: BLE001 - checked below
            text = str(exc).lower()
            if "no space left on device" not in text or str(mount) not in str(exc):
                counts.bad(f"error without 'no space left on device' and path: {short(exc)}")
        folder = Path(system.root, "too-big")
        if system.get_run("too-big").status is not rr.RunStatus.FAILED:
            counts.bad(f"status {system.get_run('too-big').status}")
        partial = [p.name for p in folder.iterdir() if "result.pkl" in p.name]
        if partial:
            counts.bad(f"partial result left: {partial}")

        identity = rr.function(tasks.identity, system=system)
        try:
            identity.run(big_value(30 * MB), run_name="big-arg").result(timeout=60)
            counts.bad("an argument larger than the disk was stored")
        except (rr.RunStorageError, rr.RunFailedError) as exc:
            if "no space left on device" not in str(exc).lower() or str(mount) not in str(exc):
                counts.bad(f"argument refused without 'no space left on device' + path: {exc}")
        except Exception as exc:  # noqa: BLE001
            counts.bad(f"argument: {short(exc)}")
        if Path(system.root, "big-arg", "config.json").exists():
            counts.bad("the refused argument's run claimed the name")
        try:
            if identity.run(b"small", run_name="big-arg").result(timeout=30) != b"small":
                counts.bad("a small argument under the refused name came back wrong")
        except Exception as exc:  # noqa: BLE001
            counts.bad(f"the name is unusable after the refusal: {short(exc)}")
        stuck = [r.name for r in system.runs() if not r.status.terminal]
        counts.stuck += len(stuck)
    return counts


# ---------------------------------------------------------------------------- soak

_BATCH = 20


@system_case(
    "soak",
    "N runs, the worker of every 10th SIGKILLed: each COMPLETED or FAILED worker lost",
    slow=("ssh",),
    expect=lambda sizes: {
        "executions": sizes.soak - sizes.soak // sizes.kill_every,
        "lost": sizes.soak // sizes.kill_every,
        "stuck": 0,
        "wrong": 0,
    },
)
def soak(faults: Faults, system: Any) -> Counts:
    folder = faults.folder("soak")
    fn = rr.function(tasks.record_call, system=system)
    counts = Counts()
    total, every = faults.sizes.soak, faults.sizes.kill_every
    for first in range(0, total, _BATCH):
        runs = {}
        for i in range(first, min(first + _BATCH, total)):
            runs[i] = fn.run(str(folder / f"{i}.txt"), i, 0.5, run_name=f"soak-{i}")
            if i % every == 0:
                force_kill(runs[i].config["pid"])
        for i, run in runs.items():
            value = end_of(run, counts)
            if value is not None and value != 2 * i:
                counts.bad(f"soak-{i} returned {value!r}")
            if value is not None and i % every == 0:
                counts.bad(f"soak-{i} completed though its worker was killed")
    for i in range(total):
        done = executions(folder / f"{i}.txt")
        if i % every:
            counts.executions += done
        if done > 1:
            counts.bad(f"soak-{i} executed {done} times")
    return counts


# ---------------------------------------------------------------------------- running


def run_case(faults: Faults, case_: Case) -> Outcome:
    """Run one case; a failure to run it is a failed outcome, not an exception."""
    outcome = Outcome(case_, case_.expect(faults.sizes))
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # what the functions print
            outcome.counts = case_.run(faults)
    except Skip as exc:
        outcome.skipped = str(exc)
    except Exception as exc:  # noqa: BLE001 - the table says what broke
        outcome.error = short(exc)
    finally:
        faults.end_case()
        outcome.seconds = time.perf_counter() - start
    return outcome


def _named(name: str, wanted: str) -> bool:
    """``kill`` names ``kill.*``, ``ssh`` names ``*.ssh``, a full name itself."""
    return name == wanted or name.startswith(wanted + ".") or name.endswith("." + wanted)


def select(only: str | None, quick: bool) -> list[Case]:
    """The cases ``only`` names (see ``_named``); under ``quick`` the fast ones only."""
    chosen = [c for c in CASES.values() if c.quick or not quick]
    if not only:
        return chosen
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(_named(n, w) for n in CASES)]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; see --list")
    return [c for c in chosen if any(_named(c.name, w) for w in wanted)]


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as an aligned text table; a count that misses its expectation shows
    as ``got≠expected``."""
    header = ["case", "executions", "lost", "stuck", "wrong", "result", "time", "note"]
    lines = [header]
    for o in outcomes:
        cells = []
        for key in ("executions", "lost", "stuck", "wrong"):
            if o.counts is None:
                cells.append("-")
                continue
            got = getattr(o.counts, key)
            want = o.expected.get(key)
            cells.append(str(got) if want is None or got == want else f"{got}≠{want}")
        result = {True: "pass", False: "FAIL", None: "skip"}[o.passed]
        note = o.skipped or o.error or "; ".join((o.counts.notes if o.counts else [])[:2])
        lines.append([o.case.name, *cells, result, f"{o.seconds:.1f} s", note[:100]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(lines):
        cells = [cell.ljust(widths[j]) for j, cell in enumerate(line[:-1])]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the fast cases, small sizes")
    parser.add_argument("--only", help="comma-separated case names or prefixes")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    defaults = QUICK if "--quick" in (argv if argv is not None else sys.argv) else Sizes()
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--soak", type=int, default=defaults.soak, help="runs in the soak")
    opts = parser.parse_args(argv)
    try:
        cases = select(opts.only, opts.quick)
    except ValueError as exc:
        parser.error(str(exc))
    if opts.list:
        for c in CASES.values():
            print(f"{c.name:<20} {'quick' if c.quick else 'slow ':5}  {c.what}")
        return 0
    sizes = Sizes(processes=opts.processes, rounds=opts.rounds, soak=opts.soak)
    home = tempfile.mkdtemp(prefix="rr-faults-home-")
    os.environ["REMOTERUN_HOME"] = home  # read by remoterun at each use
    faults = Faults(sizes)
    outcomes = []
    started = time.perf_counter()
    try:
        for c in cases:
            print(f"[faults] {c.name} ...", file=sys.stderr, flush=True)
            outcomes.append(run_case(faults, c))
    finally:
        faults.close()
        rr.local().close()
        shutil.rmtree(home, ignore_errors=True)
    print(table(outcomes))
    failed = [o.case.name for o in outcomes if o.passed is False]
    print(
        f"\n{len(outcomes)} cases in {time.perf_counter() - started:.0f} s: "
        f"{sum(o.passed is True for o in outcomes)} passed, {len(failed)} failed, "
        f"{sum(o.passed is None for o in outcomes)} skipped "
        f"(sizes: {sizes.processes} processes x {sizes.rounds} rounds, soak {sizes.soak})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
