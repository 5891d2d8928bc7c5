"""Processes on this host: which one a run's worker is, whether it lives, and stopping
what a run started. Standard library only."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

# os.uname() is what socket.gethostname() asks, without importing socket (start-up time).
HOSTNAME = os.uname().nodename


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()


def keep_freed_memory() -> Callable[[], None] | None:
    """Have glibc's malloc keep what this process frees, rather than hand it back to the
    kernel at once, and return the call that gives it back (``malloc_trim``); None where
    malloc is not glibc's.

    A large argument or result is then copied into memory already mapped. In a VM each
    fresh page costs a fault: a 10 MB result pickled into fresh pages took 15-22 ms here
    against under 1 ms into reused ones, 100 MB 48 ms against 8. So nothing is mmapped
    on its own (mmapped blocks go back to the kernel when freed) and the heap is not
    trimmed as it shrinks; the agent calls the returned function once it has been idle
    for a second after a request (server._IdleTrim)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (AttributeError, ValueError, OSError):
        return None  # not glibc: its mallopt numbers mean something else, or nothing
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)
    return lambda: malloc_trim(0)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone.

    Together with the pid this names one process: a reused pid has another start time.
    A zombie counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:  # no /proc: all we can tell is whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def worker_alive(config: dict) -> bool:
    """Whether the process recorded in a RUNNING run's config still runs.

    A run recorded on another host cannot be checked from here and counts as alive.
    """
    if config.get("host") != HOSTNAME:
        return True
    if config.get("boot_id") and BOOT_ID and config["boot_id"] != BOOT_ID:
        return False
    pid = config.get("pid")
    if not isinstance(pid, int):
        return True  # claimed, worker not yet recorded
    started = process_start_time(pid)
    return started is not None and started == config.get("proc_start", started)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def kill_leftovers(config: dict) -> None:
    """SIGKILL what a lost worker left running, before its run is marked lost (else a
    re-execution would run beside them). The worker made itself a session leader, so
    everything it started carries its pid as session id, unless it called setsid itself;
    only processes started after the worker count, so a recycled pid is never hit."""
    sid = config.get("pgid")
    started = config.get("proc_start")
    if not isinstance(sid, int) or sid <= 1 or not started or config.get("host") != HOSTNAME:
        return
    if config.get("boot_id") and BOOT_ID and config["boot_id"] != BOOT_ID:
        return  # recorded before this machine restarted: nothing of it lives
    leader = process_start_time(sid)
    if leader is not None and leader != started:
        # The pid is another process's now: Linux reuses a pid only once no process
        # has it as session id, so nothing of the worker's session is left.
        return
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc to tell the session's members by: leave them
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[3]) == sid and int(fields[19]) >= started:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def kill_group(pgid: int, pid: int, grace: float) -> None:
    """SIGTERM the run's process group, SIGKILL what is left after ``grace`` seconds.

    The worker leads its own session and a session leader cannot change its group, so
    the group is gone only once the worker and everything it started are.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            break
        time.sleep(0.01)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))
