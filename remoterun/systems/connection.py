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
    ):
        self._alive = alive
        self._read_exact = protocol.exact_reader(read)
        self._writer = protocol.FrameWriter(write)
        self._close = close
        self.label = label
        self._ids = itertools.count(1)
        self.broken = False
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
            # Interrupted mid-request (Ctrl-C): the stream is out of step; drop it, which
            # also stops a synchronous call running in that agent.
            self.close()
            raise

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
    """Idle agent connections to one host, opened on demand by ``opener``."""

    def __init__(self, opener: Callable[[], AgentConnection], max_idle: int = 8):
        self._opener = opener
        self._idle: list[AgentConnection] = []
        self._lock = threading.Lock()
        self._max_idle = max_idle
        self.busy = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[AgentConnection]:
        with self._lock:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                if not conn.usable():  # its agent died while idle: start a new one
                    conn = None
            self.busy += 1
        try:
            if conn is None:
                conn = self._opener()
            yield conn
        finally:
            with self._lock:
                self.busy -= 1
                if conn is not None and not conn.broken and len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                    conn = None
            if conn is not None and not conn.broken:
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
