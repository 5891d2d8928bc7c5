"""The frame format shared by the client and the agent.

A frame is a 13-byte header, ``kind`` (u8), ``request id`` (u32), ``length`` (u64), then
``length`` bytes of payload. Output frames carry raw bytes. Every other frame carries a
message: a plain dict pickled with protocol 5, in which large bytes values (user objects,
already cloudpickled) travel out of band::

    u32 n | u64 size of each of the n buffers | u64 envelope size | envelope | buffers

so a 100 MB argument is written from its own memory and read once into the frame's
buffer, never copied into or out of the envelope (each copy of 100 MB costs ~80 ms here).

A frame is written with one write when it is small: a frame split over two writes meets
Nagle's algorithm on a TCP-backed channel (~40 ms per message).
"""

from __future__ import annotations

import pickle
import struct
import threading
from typing import Any, Callable

from ..errors import (
    AgentError,
    CorruptRunError,
    InvalidRunNameError,
    RunStorageError,
    SerializationError,
    SigningKeyError,
)

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BIQ")

HELLO = 1  # client -> agent: {"protocol": int}; reply: agent facts
REQUEST = 2  # client -> agent: {"op": str, ...}
REPLY = 3  # agent -> client: the op's result dict
FAIL = 4  # agent -> client: {"kind": str, "type": str, "message": str, "traceback": str, ...}
STDOUT = 5  # agent -> client: raw bytes the function wrote to stdout
STDERR = 6  # agent -> client: raw bytes the function wrote to stderr


class Op:
    """What a REQUEST asks for: its ``"op"`` field."""

    PING = "ping"  # {} -> {"time"}
    CALL = "call"  # fn/fn_key, inputs -> {"result"}: the synchronous fast path
    MAP = "map"  # fn/fn_key, items -> {"outcomes": [(ok, result or failure record)]}
    SUBMIT = "submit"  # a recorded run: start it, or answer from the cache -> Action
    STATUS = "status"  # root, name -> {"config"} (+ outcome), a lost worker found out
    CANCEL = "cancel"  # root, name, grace -> {"config"}


# Ops that run the user's function in the agent itself.
SYNCHRONOUS_OPS = frozenset({Op.CALL, Op.MAP})


class Mode:
    """How a SUBMIT treats a run of that name: start a new one, or get the cached one."""

    NEW = "new"
    GET = "get"


class Action:
    """What the host decided for a SUBMIT: its reply's ``"action"``."""

    START = "start"  # executing now (a new attempt)
    HIT = "hit"  # a COMPLETED run of that name and fingerprint: nothing executes
    ATTACH = "attach"  # the run is RUNNING: wait for it
    MISMATCH = "mismatch"  # recorded from other arguments ("differences")
    EXISTS = "exists"  # a generated name that is taken: pick another
    BUSY = "busy"  # RUNNING, and a new attempt was asked for
    NEED_PAYLOAD = "need_payload"  # a miss: send the function and inputs held back


class Failure:
    """The ``"kind"`` of a FAIL frame's record; ``remoterun.errors.exception_from_record``
    turns each into its exception, at one place on the client."""

    REMOTE = "remote"  # the function raised: "type", "traceback", "exc" (its pickle)
    LOAD = "load"  # the function or its arguments cannot be loaded on this host
    UNKNOWN_FUNCTION = "unknown_function"  # fn_key not cached here: send fn again
    # remoterun's own errors cross as themselves, by their code (and fields):
    SERIALIZATION = SerializationError.code  # a value that cannot be pickled
    STORAGE = RunStorageError.code  # the run folder cannot be written (OSError)
    NAME = InvalidRunNameError.code  # an invalid run name
    CORRUPT = CorruptRunError.code  # a damaged run: "url", "filename"
    KEY = SigningKeyError.code  # an unusable team signing key
    AGENT = AgentError.code  # anything else: the agent itself failed


# Below this size, header and payload are joined and written at once.
SINGLE_WRITE_LIMIT = 1 << 20
# Large payloads are written in slices: one huge write on an SSH channel is quadratic.
WRITE_CHUNK = 1 << 20
READ_CHUNK = 4 << 20


class ProtocolError(Exception):
    """The peer sent something that is not a frame, or closed the stream mid-frame."""


# Bytes values at least this large travel out of band.
OUT_OF_BAND_MIN = 1 << 16


def _wrap(value: Any, depth: int = 0) -> Any:
    """Mark large bytes values (in dicts, lists and tuples, a few levels deep) for
    out-of-band transport."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pickle.PickleBuffer(value) if len(value) >= OUT_OF_BAND_MIN else value
    if depth < 3:
        if isinstance(value, dict):
            return {k: _wrap(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(_wrap(v, depth + 1) for v in value)
    return value


def dumps(obj: Any) -> list[bytes | memoryview]:
    """A message's payload, as pieces to write one after the other."""
    buffers: list[pickle.PickleBuffer] = []
    envelope = pickle.dumps(_wrap(obj), protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = struct.pack(f"!I{len(raws)}QQ", len(raws), *(r.nbytes for r in raws), len(envelope))
    return [head, envelope, *raws]


def loads(payload: bytes | bytearray | memoryview) -> Any:
    """The message in a payload; large values come back as memoryviews of ``payload``."""
    view = memoryview(payload)
    (count,) = struct.unpack_from("!I", view)
    sizes = struct.unpack_from(f"!{count}QQ", view, 4)
    offset = 4 + 8 * (count + 1)
    envelope = view[offset : offset + sizes[-1]]
    offset += sizes[-1]
    buffers = []
    for size in sizes[:-1]:
        buffers.append(view[offset : offset + size])
        offset += size
    return pickle.loads(envelope, buffers=buffers)


class FrameWriter:
    """Writes whole frames to a byte sink; safe to share between threads."""

    def __init__(self, write: Callable[[bytes], Any]):
        self._write = write
        self._lock = threading.Lock()

    def send(
        self, kind: int, req_id: int, payload: bytes | memoryview | list[bytes | memoryview] = b""
    ) -> None:
        """Write one frame; ``payload`` is bytes or the pieces ``dumps`` returns."""
        pieces = payload if isinstance(payload, list) else [payload]
        total = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in pieces)
        header = HEADER.pack(kind, req_id, total)
        with self._lock:
            if total <= SINGLE_WRITE_LIMIT:
                self._write(b"".join([header, *pieces]))
                return
            small = [header]
            for piece in pieces:
                view = memoryview(piece).cast("B")
                if view.nbytes < OUT_OF_BAND_MIN:
                    small.append(view)
                    continue
                if small:
                    self._write(b"".join(small))
                    small = []
                for start in range(0, view.nbytes, WRITE_CHUNK):
                    self._write(view[start : start + WRITE_CHUNK])
            if small:
                self._write(b"".join(small))


def read_frame(read_exact: Callable[[int], bytes]) -> tuple[int, int, bytes]:
    """Read one frame with ``read_exact(n)``, which returns n bytes or raises EOFError."""
    kind, req_id, length = HEADER.unpack(read_exact(HEADER.size))
    if kind not in (HELLO, REQUEST, REPLY, FAIL, STDOUT, STDERR):
        raise ProtocolError(f"unknown frame kind {kind}: the stream is not remoterun's protocol")
    return kind, req_id, read_exact(length) if length else b""


def exact_reader(read: Callable[[int], bytes]) -> Callable[[int], bytes | bytearray]:
    """Wrap a ``read(n)`` that may return short reads into one that returns exactly n bytes.

    A large frame is gathered into one preallocated buffer: one copy, not two.
    """

    def read_exact(n: int) -> bytes | bytearray:
        data = read(n)
        if len(data) == n:
            return data
        if not data:
            raise EOFError("stream closed")
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = len(data)
        view[:got] = data
        while got < n:
            chunk = read(min(n - got, READ_CHUNK))
            if not chunk:
                raise EOFError("stream closed mid-frame")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        return buffer

    return read_exact
