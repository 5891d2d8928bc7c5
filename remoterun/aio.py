"""asyncio forms of the blocking calls: the threads that carry them, and how a cancelled
task stops its call where it runs.

A remote call blocks on its connection (a pipe, a paramiko channel), so an awaitable
call is the blocking call in a thread, awaited. The threads are a bounded pool of this
module's own (``REMOTERUN_ASYNC_THREADS``, default 16), not the event loop's default
executor: a thousand pending awaits are a thousand queued calls, not a thousand threads.
Waiting for a recorded run holds no thread: each look at its status is a short job in a
small pool of its own, and the pauses between looks are the event loop's.

Cancelling the awaiting task is Ctrl-C for the call it awaits. A call not started yet is
dropped; one in flight is stopped from another thread by the stoppers the connection
registered with ``interruptible`` (the agent's process group killed, as on Ctrl-C), and
its thread then ends on the dropped connection.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import Future

logger = logging.getLogger(__name__)

T = TypeVar("T")

THREADS_ENV = "REMOTERUN_ASYNC_THREADS"
DEFAULT_THREADS = 16
# Looks at a run (its status, its logs) are short and never interrupted: a few threads of
# their own, so that a waiting task is not queued behind long calls.
_LOOK_THREADS = 4
# Stopping a call can block (an SSH exec to kill the agent's group; a local agent's
# exit): done off the event loop, by a few threads of their own, so that stops are not
# queued behind the calls they stop.
_STOP_THREADS = 4


class CallCancelled(BaseException):
    """Raised in a call's thread when the task awaiting it was cancelled before the call
    reached its agent. Nobody sees it: the task has already raised CancelledError."""


class CallScope:
    """One awaited call: whether its task was cancelled, and how to stop it meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stoppers: list[Callable[[], None]] = []
        self.cancelled = False

    def cancel(self) -> None:
        """Mark the call cancelled and stop what it is blocked on (from another thread).

        The stoppers are called under the lock: a block that ends meanwhile leaves
        ``interruptible`` only once its stop is done, so it knows whether it was stopped
        (a connection whose agent was killed as its reply came is not reused)."""
        with self._lock:
            self.cancelled = True
            for stop in self._stoppers:
                try:
                    stop()
                except Exception as exc:  # best effort, as Ctrl-C's stop
                    logger.warning("could not stop a cancelled call: %s", exc)


_scope: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar(
    "remoterun_call_scope", default=None
)


@contextlib.contextmanager
def interruptible(stop: Callable[[], None]) -> Iterator[None]:
    """Run the block so that cancelling the task awaiting it calls ``stop`` (from another
    thread): ``stop`` must make the block's blocking reads and writes end. Raises
    CallCancelled at once when the task is already cancelled. Outside an awaited call it
    does nothing."""
    scope = _scope.get()
    if scope is None:
        yield
        return
    with scope._lock:
        if scope.cancelled:
            raise CallCancelled()
        scope._stoppers.append(stop)
    try:
        yield
    finally:
        with scope._lock:
            scope._stoppers.remove(stop)


def threads() -> int:
    """How many blocking calls this process carries at once for awaiting tasks:
    ``$REMOTERUN_ASYNC_THREADS``, default 16 (read when the first call is awaited)."""
    value = os.environ.get(THREADS_ENV)
    try:
        return max(1, int(value)) if value else DEFAULT_THREADS
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a number of threads, not {value!r}") from None


class _Pools:
    """The bounded pools of threads: calls, looks, stops; made on first use."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # start-up time: only when awaited

        self.calls = ThreadPoolExecutor(threads(), thread_name_prefix="rr-async-call")
        self.looks = ThreadPoolExecutor(_LOOK_THREADS, thread_name_prefix="rr-async-look")
        self.stops = ThreadPoolExecutor(_STOP_THREADS, thread_name_prefix="rr-async-stop")


_pools: _Pools | None = None
_pools_lock = threading.Lock()


def pools() -> _Pools:
    global _pools
    if _pools is None:
        with _pools_lock:
            if _pools is None:
                _pools = _Pools()
    return _pools


def _in_scope(scope: CallScope, call: Callable[[], T]) -> T:
    if scope.cancelled:
        raise CallCancelled()
    _scope.set(scope)  # in the copied context this job runs in, not the caller's
    return call()


async def blocking(call: Callable[[], T]) -> T:
    """``call()`` (a remote call, a submit, a map chunk) in the bounded pool of calls,
    awaited, with the caller's context variables. Cancelling the awaiting task stops the
    call (see the module docstring)."""
    import asyncio

    scope = CallScope()
    future: Future = pools().calls.submit(contextvars.copy_context().run, _in_scope, scope, call)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if not future.cancel():  # running: stop it where it blocks
            pools().stops.submit(scope.cancel)
        raise


async def look(call: Callable[[], T]) -> T:
    """``call()``, a short read (a run's status, a piece of its log), in the pool of
    looks, awaited. A cancelled task leaves it to finish: nothing is interrupted."""
    import asyncio

    future: Future = pools().looks.submit(contextvars.copy_context().run, call)
    return await asyncio.wrap_future(future)
