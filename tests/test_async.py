"""The awaitable API (``acall``, ``arun``, ``aget_or_*``, ``amap``, ``await run``,
``alogs``), ``async def`` functions, cancelling, and the event loop kept free; on every
system."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest
import remote_tasks as tasks
from conftest import cancel_an_awaited_sleeper, make_cluster

import remoterun as rr
from remoterun import aio


def run_async(coro, timeout: float = 90.0):
    """Run a coroutine in a new event loop, with a timeout for the whole of it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # gone, or going as we read
        return False


def test_awaitable_forms_answer_as_the_blocking_calls(system, marker, capsys):
    add = rr.function(tasks.add, system=system)
    record = rr.function(tasks.record_call, system=system)

    async def main():
        assert await add.acall(40) == 42
        assert await add.acall(1, b=1, run_name="added") == 2
        assert system.get_run("added").result() == 2

        run = await record.arun(marker, 5, run_name="recorded")
        assert isinstance(run, rr.Run)
        assert await run == 10  # await run: its result
        assert await run.aresult(timeout=30) == 10
        assert await run.await_end() is rr.RunStatus.COMPLETED

        # The cached forms: a hit executes nothing.
        assert await record.aget_or_call(marker, 5, run_name="recorded") == 10
        hit = await record.aget_or_run(marker, 5, run_name="recorded")
        assert hit.name == "recorded" and await hit == 10
        assert tasks.executions(marker) == 1
        assert await record.aget_or_call(marker, 6, run_name="fresh") == 12
        assert tasks.executions(marker) == 2

        assert await add.amap(range(20), [1] * 20) == [i + 1 for i in range(20)]
        assert await add.amap([]) == []

    run_async(main())
    assert "adding 40 and 2" in capsys.readouterr().out  # output streamed, as fn(...) does


def test_awaiting_a_failed_call_or_run_raises_its_own_exception(system):
    fail = rr.function(tasks.fail, system=system)

    async def main():
        with pytest.raises(tasks.CustomError, match="boom") as info:
            await fail.acall("boom")
        assert isinstance(info.value.__cause__, rr.RemoteError)
        run = await fail.arun("bad", run_name="bad")
        with pytest.raises(tasks.CustomError, match="bad"):
            await run
        results = await fail.amap(["a", "b"], return_exceptions=True)
        assert [str(r) for r in results] == ["a", "b"]
        with pytest.raises(tasks.CustomError):
            await fail.amap(["c"] * 10)

    run_async(main())


def test_async_def_functions_run_in_an_event_loop_on_the_host(system, capsys):
    add = rr.function(tasks.async_add, system=system)
    assert add(1) == 3  # synchronously: the value, not a coroutine
    assert add(2, run_name="async-run") == 4
    assert add.run(3, b=3, run_name="async-bg").result(timeout=30) == 6
    assert add.map([1, 2, 3]) == [3, 4, 5]
    assert run_async(add.acall(10)) == 12
    assert "async adding 1 and 2" in capsys.readouterr().out
    with pytest.raises(tasks.CustomError, match="from a coroutine"):
        rr.function(tasks.async_fail, system=system)("from a coroutine")


def test_alogs_follows_a_run_until_it_ends(system, scratch):
    gate = scratch / "gate"
    printer = rr.function(tasks.print_lines, system=system)

    async def main():
        run = await printer.arun(4, str(gate), run_name="printer")
        seen = []
        async for line in run.alogs(follow=True):
            seen.append(line)
            if line == "line 2\n":
                assert not run.done()  # followed while it runs
                gate.touch()
        return seen, await run

    seen, value = run_async(main())
    assert value == 4
    assert [line for line in seen if line.startswith("line")] == [f"line {i}\n" for i in range(4)]
    assert seen == rr.run(name="printer", system=system).stdout().splitlines(keepends=True)


def test_cancelling_an_awaited_call_stops_it_on_the_host(system, scratch):
    pid = run_async(cancel_an_awaited_sleeper(system, scratch / "pid"), timeout=60)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the cancelled call still runs on the host"
        time.sleep(0.02)
    # The system is still usable: the next call gets a working agent.
    assert run_async(rr.function(tasks.add, system=system).acall(1)) == 3


def test_cancelling_an_awaited_map_stops_its_chunks_in_flight(system, scratch):
    pidfiles = [scratch / f"pid-{i}" for i in range(2)]
    sleeper = rr.function(tasks.note_pid_then_sleep, system=system)

    async def main():
        task = asyncio.ensure_future(sleeper.amap([str(p) for p in pidfiles], chunk_size=1))
        while not all(p.exists() and p.read_text() for p in pidfiles):
            assert not task.done(), task
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [int(p.read_text()) for p in pidfiles]

    pids = run_async(main(), timeout=60)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a cancelled map's chunk still runs on the host"
        time.sleep(0.02)


def test_cancelling_an_awaited_run_leaves_it_running(system, scratch):
    gate = scratch / "gate"
    waiter = rr.function(tasks.wait_for_file, system=system)

    async def main():
        run = await waiter.arun(str(gate), run_name="detached")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(run.aresult(), 0.5)
        # Cancelled while the host executes it (acall with a run_name): it goes on too.
        task = asyncio.ensure_future(waiter.acall(str(gate), run_name="detached-call"))
        while system_status("detached-call") != rr.RunStatus.RUNNING:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return run

    def system_status(name):
        try:
            return system.get_run(name).status
        except rr.RunNotFoundError:
            return None

    run = run_async(main(), timeout=60)
    assert run.refresh().status is rr.RunStatus.RUNNING
    gate.touch()
    assert run.result(timeout=30) == "finished"
    assert rr.run(name="detached-call", system=system).result(timeout=30) == "finished"


def test_calls_in_flight_overlap(system, scratch):
    # Eight calls that each wait for all eight to arrive: done one after another, they
    # would never meet (and time out). Eight is what one SSH host runs at once.
    meet = rr.function(tasks.meet, system=system)

    async def main():
        return await asyncio.gather(*(meet.acall(str(scratch), 8) for _ in range(8)))

    assert run_async(main()) == [8] * 8


def test_a_thousand_pending_awaits_hold_a_bounded_number_of_threads(tmp_path, scratch):
    gate = scratch / "gate"
    system = rr.LocalSystem(root=str(tmp_path / "runs"))
    waiter = rr.function(tasks.wait_for_file, system=system)
    before = threading.active_count()

    async def main():
        calls = [asyncio.ensure_future(waiter.acall(str(gate))) for _ in range(1000)]
        await asyncio.sleep(1.0)  # every call is submitted, and the first ones run
        during = threading.enumerate()
        gate.touch()
        return during, await asyncio.gather(*calls)

    try:
        during, results = run_async(main(), timeout=120)
    finally:
        system.close()
    assert results == ["finished"] * 1000
    carrying = [t for t in during if t.name.startswith("rr-async-call")]
    assert 2 <= len(carrying) <= aio.threads()  # calls ran in threads, and in few of them
    assert len(during) - before <= aio.threads()  # nothing else grew with the awaits


def test_import_remoterun_leaves_asyncio_and_jupyter_pieces_unimported():
    code = (
        "import sys, remoterun as rr\n"
        "rr.function(len)\n"
        "print(sorted(m for m in ('asyncio', 'IPython', 'tqdm.auto', 'html') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- SSH


@pytest.fixture(scope="module")
def cluster(ssh_server):
    cluster = make_cluster(ssh_server)
    yield cluster
    cluster.close()


async def _max_loop_gap(call) -> tuple[object, float, int]:
    """Await ``call`` while a task ticks every 10 ms; return its value, the longest the
    ticking task waited past its 10 ms, and how many ticks it made."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last - 0.01)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)
    value = await call
    stop.set()
    await ticker
    return value, max(gaps), len(gaps)


def test_the_event_loop_ticks_while_100_mb_goes_to_a_host_and_back(cluster):
    """A task that ticks every 10 ms never waits more than 50 ms, while a 100 MB argument
    goes to an SSH host and its result comes back."""
    digest = rr.function(tasks.sha256, system=cluster)
    assert digest(b"warm")  # connected, agent started: the transfer is what is measured
    data = os.urandom(1 << 20) * 100

    value, gap, ticks = run_async(_max_loop_gap(digest.acall(data)), timeout=120)
    assert value == hashlib.sha256(data).hexdigest()
    assert ticks >= 10  # it ticked throughout the transfer
    assert gap < 0.05, f"the loop was blocked for {gap * 1000:.0f} ms"


def test_the_event_loop_ticks_while_a_100_mb_array_goes_and_comes_back(tmp_path):
    """Large buffers travel beside the call's pickle both ways: a 100 MB numpy array
    argument, echoed back, is never copied under the interpreter lock here."""
    np = pytest.importorskip("numpy")
    system = rr.LocalSystem(root=str(tmp_path / "runs"))
    identity = rr.function(tasks.identity, system=system)
    try:
        assert identity(1) == 1
        array = np.frombuffer(os.urandom(1 << 20) * 100, dtype=np.uint8)
        value, gap, ticks = run_async(_max_loop_gap(identity.acall(array)), timeout=120)
    finally:
        system.close()
    assert np.array_equal(value, array)
    assert ticks >= 5
    assert gap < 0.05, f"the loop was blocked for {gap * 1000:.0f} ms"


def test_many_awaited_calls_share_one_hosts_sessions(cluster):
    """More calls than the host has sessions (and than the pool has threads) queue for
    them, and all answer."""
    sleeper = rr.function(tasks.sleep_for, system=cluster)

    async def main():
        return await asyncio.gather(*(sleeper.acall(0.05) for _ in range(100)))

    assert run_async(main()) == [0.05] * 100
