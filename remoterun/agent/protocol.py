"""The frame format shared by the client and the agent.

A frame is a 13-byte header, ``kind`` (u8), ``request id`` (u32), ``length`` (u64), then
``length`` bytes of payload. Request and reply payloads are stdlib pickles of plain dicts
(user objects inside them are already cloudpickled bytes). Output frames carry raw bytes.

A frame is written with one write when it is small: a frame split over two writes meets
Nagle's algorithm on a TCP-backed channel (~40 ms per message).
"""

from __future__ import annotations

import pickle
import struct
import threading
from typing import Any, Callable

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BIQ")

HELLO = 1  # client -> agent: {"protocol": int}; reply: agent facts
REQUEST = 2  # client -> agent: {"op": str, ...}
REPLY = 3  # agent -> client: the op's result dict
FAIL = 4  # agent -> client: {"kind": str, "type": str, "message": str, "traceback": str, ...}
STDOUT = 5  # agent -> client: raw bytes the function wrote to stdout
STDERR = 6  # agent -> client: raw bytes the function wrote to stderr

# Below this size, header and payload are joined and written at once.
SINGLE_WRITE_LIMIT = 1 << 20
# Large payloads are written in slices: one huge write on an SSH channel is quadratic.
WRITE_CHUNK = 1 << 20


class ProtocolError(Exception):
    """The peer sent something that is not a frame, or closed the stream mid-frame."""


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


class FrameWriter:
    """Writes whole frames to a byte sink; safe to share between threads."""

    def __init__(self, write: Callable[[bytes], Any]):
        self._write = write
        self._lock = threading.Lock()

    def send(self, kind: int, req_id: int, payload: bytes | memoryview = b"") -> None:
        header = HEADER.pack(kind, req_id, len(payload))
        with self._lock:
            if len(payload) <= SINGLE_WRITE_LIMIT:
                self._write(header + bytes(payload))
                return
            self._write(header)
            view = memoryview(payload)
            for start in range(0, len(view), WRITE_CHUNK):
                self._write(view[start : start + WRITE_CHUNK])


def read_frame(read_exact: Callable[[int], bytes]) -> tuple[int, int, bytes]:
    """Read one frame with ``read_exact(n)``, which returns n bytes or raises EOFError."""
    kind, req_id, length = HEADER.unpack(read_exact(HEADER.size))
    if kind not in (HELLO, REQUEST, REPLY, FAIL, STDOUT, STDERR):
        raise ProtocolError(f"unknown frame kind {kind}: the stream is not remoterun's protocol")
    return kind, req_id, read_exact(length) if length else b""


def exact_reader(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """Wrap a ``read(n)`` that may return short reads into one that returns exactly n bytes."""

    def read_exact(n: int) -> bytes:
        data = read(n)
        if len(data) == n:
            return data
        if not data:
            raise EOFError("stream closed")
        parts = [data]
        got = len(data)
        while got < n:
            chunk = read(n - got)
            if not chunk:
                raise EOFError("stream closed mid-frame")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    return read_exact
