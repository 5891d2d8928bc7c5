"""Raw floors: a persistent worker answering length-prefixed frames, with nothing else.

The same worker script serves a local child over pipes and a remote ``python3 -u -c``
over one paramiko exec channel. A frame is ``op`` (1 byte), ``length`` (u64), body:

- ``E``: echo the body back;
- ``Z``: reply with as many zero bytes as the body says (u64);
- ``S``: swallow the body, reply with an empty frame (a ``cat > /dev/null`` that acks);
- ``C``: the body is a cloudpickled ``(fn, args)``: call it, reply with the cloudpickled
  result (needs cloudpickle on the worker's side).

Replies are ``length`` (u64) + body. Small frames are written with one write each: a frame
split over two writes meets Nagle's algorithm on a TCP-backed channel.
"""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
import sys
from typing import Any, Callable

import cloudpickle

REQUEST = struct.Struct("!cQ")
REPLY = struct.Struct("!Q")
CHUNK = 1 << 20  # large frames are sent 1 MB at a time (one huge paramiko sendall is quadratic)
ONE_WRITE = 1 << 16  # below this, header and body are joined into one write

WORKER = r"""
import os, struct, sys
REQ, REP = struct.Struct("!cQ"), struct.Struct("!Q")
rd = sys.stdin.buffer
def write_all(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
def read_exact(n):
    data = rd.read(n)
    if data is None or len(data) != n:
        sys.exit(0)
    return data
while True:
    op, n = REQ.unpack(read_exact(REQ.size))
    body = read_exact(n) if n else b""
    if op == b"E":
        out = body
    elif op == b"Z":
        out = bytes(REP.unpack(body)[0])
    elif op == b"S":
        out = b""
    else:
        import cloudpickle
        fn, args = cloudpickle.loads(body)
        out = cloudpickle.dumps(fn(*args))
    if len(out) < 65536:
        write_all(REP.pack(len(out)) + out)
    else:
        write_all(REP.pack(len(out)))
        write_all(out)
"""


def dumps_call(fn: Callable, args: tuple) -> bytes:
    """``(fn, args)`` cloudpickled with ``fn``'s module by value (no host has it).

    Registered at every call: remoterun unregisters a module it pickled by value, even
    one registered before it (it expects a ValueError that cloudpickle never raises).
    """
    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    return cloudpickle.dumps((fn, args))


class FrameWorker:
    """The client's end of a floor worker over any byte stream."""

    def __init__(
        self,
        send: Callable[[bytes | memoryview], None],
        recv: Callable[[int], bytes],
        close: Callable[[], None],
    ):
        self._send = send
        self._recv = recv
        self._close = close

    def request(self, op: bytes, body: bytes | memoryview = b"") -> bytes:
        """Send one frame, return the body of the reply."""
        header = REQUEST.pack(op, len(body))
        if len(body) < ONE_WRITE:
            self._send(header + bytes(body))
        else:
            self._send(header)
            view = memoryview(body)
            for start in range(0, len(view), CHUNK):
                self._send(view[start : start + CHUNK])
        (size,) = REPLY.unpack(self._read_exact(REPLY.size))
        return self._read_exact(size)

    def call(self, fn: Callable, *args: Any) -> Any:
        """A cloudpickled call, as a persistent worker would get it."""
        return cloudpickle.loads(self.request(b"C", dumps_call(fn, args)))

    def zeros(self, size: int) -> bytes:
        return self.request(b"Z", REPLY.pack(size))

    def _read_exact(self, size: int) -> bytes:
        if size == 0:
            return b""
        first = self._recv(size)
        if len(first) == size:
            return first
        buf = bytearray(size)
        view = memoryview(buf)
        got = len(first)
        view[:got] = first
        while got < size:
            part = self._recv(min(size - got, CHUNK))
            if not part:
                raise EOFError(f"worker closed the stream after {got} of {size} bytes")
            view[got : got + len(part)] = part
            got += len(part)
        return bytes(buf)

    def close(self) -> None:
        self._close()


def pipe_worker(python: str = sys.executable, via: list[str] | None = None) -> FrameWorker:
    """A persistent child ``python -u -c WORKER`` over pipes: local, or on a host when
    ``via`` is an ``ssh ... HOST`` command line (the raw ssh binary pipe)."""
    argv = [python, "-u", "-c", WORKER]
    if via is not None:
        argv = [*via, f"{shlex.quote(python)} -u -c {shlex.quote(WORKER)}"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    in_fd, out_fd = proc.stdin.fileno(), proc.stdout.fileno()

    def send(data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(in_fd, view) :]

    def recv(size: int) -> bytes:
        return os.read(out_fd, min(size, CHUNK))

    def close() -> None:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]

    return FrameWorker(send, recv, close)


def channel_worker(client: Any, python: str) -> FrameWorker:
    """A remote ``python -u -c WORKER`` on one exec channel of a paramiko SSHClient.

    TCP_NODELAY is set on the transport's socket (else each small reply waits ~40 ms
    for the delayed ACK of the previous segment).
    """
    import socket

    transport = client.get_transport()
    transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    channel = transport.open_session()
    channel.exec_command(f"{shlex.quote(python)} -u -c {shlex.quote(WORKER)}")

    def send(data: bytes | memoryview) -> None:
        channel.sendall(data)

    def close() -> None:
        channel.shutdown_write()
        channel.recv_exit_status()
        channel.close()

    return FrameWorker(send, channel.recv, close)
