"""The client's end of an agent: frames over any byte stream, and a pool of them.

The local system talks to agents over pipes, SSH clusters over exec channels; both use
this module, so the local path exercises the protocol that clusters use.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from typing import Any, Callable, Iterator

from .. import aio
from ..agent import protocol
from ..errors import AgentError

logger = logging.getLogger(__name__)

OutputHandler = Callable[[int, bytes], None]


class AgentFailure(Exception):
    """The agent answered a request with a FAIL frame; ``record`` says what failed."""

    def __init__(self, record: dict):
        super().__init__(record.get("message", ""))
        self.record = record


class AgentConnection:
    """One agent process, one request at a time."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        write: Callable[[bytes], Any],
        close: Callable[[], None],
        label: str,
        alive: Callable[[], bool] | None = None,
        stop: Callable[[], None] | None = None,
    ):
        self._alive = alive
        self._stop = stop
        self._read_exact = protocol.exact_reader(read)
        self._writer = protocol.FrameWriter(write)
        self._close = close
        self.label = label
        self._ids = itertools.count(1)
        self.broken = False
        self._interrupted = False  # set by interrupt(): the agent was (being) stopped
        self.known_functions: set[str] = set()
        self.facts: dict = {}

    def handshake(self) -> dict:
        """Exchange versions; return what the agent says of its host."""
        self.facts = self._exchange(protocol.HELLO, {"protocol": protocol.PROTOCOL_VERSION}, None)
        if self.facts.get("protocol") != protocol.PROTOCOL_VERSION:
            self.close()
            raise AgentError(
                f"the agent on {self.label} speaks protocol {self.facts.get('protocol')}, "
                f"this client {protocol.PROTOCOL_VERSION}"
            )
        return self.facts

    def request(self, op: dict, on_output: OutputHandler | None = None) -> dict:
        """Send one request; forward output frames to ``on_output``; return the reply.

        Raises AgentFailure when the op failed, AgentError when the agent is gone.
        """
        return self._exchange(protocol.REQUEST, op, on_output)

    def _exchange(self, kind: int, op: dict, on_output: OutputHandler | None) -> dict:
        if self.broken:
            raise AgentError(f"the connection to the agent on {self.label} is closed")
        req_id = next(self._ids)
        # A task awaiting this request (``remoterun.aio``) that is cancelled stops it as
        # Ctrl-C does, from another thread: the reads and writes below then end.
        with aio.interruptible(self.interrupt):
            reply = self._exchange_frames(kind, req_id, op, on_output)
        if self._interrupted:  # stopped just as the reply came: its agent is gone
            self.close()
        return reply

    def _exchange_frames(
        self, kind: int, req_id: int, op: dict, on_output: OutputHandler | None
    ) -> dict:
        try:
            self._writer.send(kind, req_id, protocol.dumps(op))
            while True:
                frame_kind, _, payload = protocol.read_frame(self._read_exact)
                if frame_kind in (protocol.STDOUT, protocol.STDERR):
                    if on_output is not None:
                        on_output(frame_kind, payload)
                    continue
                if frame_kind == protocol.REPLY:
                    return protocol.loads(payload)
                if frame_kind == protocol.FAIL:
                    raise AgentFailure(protocol.loads(payload))
                raise protocol.ProtocolError(f"unexpected frame kind {frame_kind}")
        except AgentFailure:
            raise
        except (EOFError, OSError, protocol.ProtocolError) as exc:
            self.close()
            raise AgentError(f"lost the agent on {self.label}: {exc}") from exc
        except BaseException:
            # Interrupted mid-request (Ctrl-C): the stream is out of step, and a synchronous
            # call may still run in the agent. Stop the agent, then drop the stream.
            self._stop_agent()
            self.close()
            raise

    def interrupt(self) -> None:
        """Stop the agent in the middle of a request, from another thread than the one
        waiting for its reply (a cancelled task): as Ctrl-C, the agent's process group is
        killed, so that thread's read ends and it drops the connection itself. Without a
        way to stop the agent, or when stopping it failed, the stream is closed here."""
        self._interrupted = True
        if not self._stop_agent():
            self.close()

    def _stop_agent(self) -> bool:
        """Kill the agent and what its call started; whether that was done."""
        if self._stop is None:
            return False
        try:
            self._stop()
        except Exception as exc:  # best effort: the interruption is what matters
            logger.warning("could not stop the agent on %s: %s", self.label, exc)
            return False
        return True

    def usable(self) -> bool:
        """False once the agent is known to be gone (closed stream, exited process)."""
        if self.broken:
            return False
        if self._alive is not None and not self._alive():
            self.close()
            return False
        return True

    def close(self) -> None:
        if not self.broken:
            self.broken = True
            try:
                self._close()
            except Exception:
                logger.debug("closing the agent on %s failed", self.label, exc_info=True)


class ConnectionPool:
    """Agent connections to one host, opened on demand by ``opener``, at most ``max_open``
    at once (an SSH server limits the sessions of one connection: callers past the limit
    wait for a connection to come free), of which up to ``max_idle`` are kept for reuse."""

    def __init__(
        self,
        opener: Callable[[], AgentConnection],
        max_idle: int = 8,
        max_open: int | None = None,
    ):
        self._opener = opener
        self._idle: list[AgentConnection] = []
        self._free = threading.Condition()
        self._max_idle = max_idle
        self._max_open = max_open
        self._open = 0
        self.busy = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[AgentConnection]:
        conn = self._take()
        try:
            if conn is None:
                conn = self._opener()  # on failure, the finally below gives the slot back
            yield conn
        finally:
            self._give_back(conn)

    def _take(self) -> AgentConnection | None:
        """An idle usable connection, or None when the caller may open a new one."""
        with self._free:
            while True:
                while self._idle:
                    conn = self._idle.pop()
                    if conn.usable():
                        self.busy += 1
                        return conn
                    self._open -= 1  # its agent died while idle
                if self._max_open is None or self._open < self._max_open:
                    self._open += 1
                    self.busy += 1
                    return None
                self._free.wait()

    def _give_back(self, conn: AgentConnection | None) -> None:
        with self._free:
            self.busy -= 1
            if conn is not None and not conn.broken and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                conn = None
            else:
                self._open -= 1
            self._free.notify()
        if conn is not None and not conn.broken:
            conn.close()

    @property
    def capacity(self) -> int | None:
        return self._max_open

    def close(self) -> None:
        with self._free:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._free.notify_all()
        for conn in idle:
            conn.close()
