"""The frame format and the agent's handshake."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from remoterun.agent import protocol


def _pipe_roundtrip(payload: bytes) -> tuple[int, int, bytes]:
    sink = io.BytesIO()
    protocol.FrameWriter(sink.write).send(protocol.REPLY, 7, payload)
    source = io.BytesIO(sink.getvalue())
    return protocol.read_frame(protocol.exact_reader(source.read))


@pytest.mark.parametrize("size", [0, 1, 65_536, protocol.SINGLE_WRITE_LIMIT + 3])
def test_frames_round_trip(size):
    payload = os.urandom(size)
    assert _pipe_roundtrip(payload) == (protocol.REPLY, 7, payload)


def test_small_frames_are_written_once_and_large_ones_in_chunks():
    writes: list[int] = []
    writer = protocol.FrameWriter(lambda b: writes.append(len(b)))
    writer.send(protocol.REPLY, 1, b"x" * 1000)
    assert writes == [protocol.HEADER.size + 1000]
    writes.clear()
    writer.send(protocol.REPLY, 1, b"x" * (3 * protocol.WRITE_CHUNK))
    assert writes == [protocol.HEADER.size] + [protocol.WRITE_CHUNK] * 3


def test_short_reads_are_joined_and_eof_is_reported():
    data = protocol.HEADER.pack(protocol.REPLY, 1, 5) + b"hello"
    source = io.BytesIO(data)
    trickle = protocol.exact_reader(lambda n: source.read(min(n, 2)))
    assert protocol.read_frame(trickle) == (protocol.REPLY, 1, b"hello")
    with pytest.raises(EOFError):
        protocol.read_frame(trickle)
    cut = io.BytesIO(data[:-2])
    with pytest.raises(EOFError, match="mid-frame"):
        protocol.read_frame(protocol.exact_reader(cut.read))


def test_garbage_is_a_protocol_error():
    source = io.BytesIO(b"\xff" + b"\0" * 12)
    with pytest.raises(protocol.ProtocolError, match="not remoterun"):
        protocol.read_frame(protocol.exact_reader(source.read))


def test_agent_handshake_over_pipes():
    proc = subprocess.Popen(
        [sys.executable, "-m", "remoterun.agent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        protocol.FrameWriter(proc.stdin.write).send(
            protocol.HELLO, 1, protocol.dumps({"protocol": protocol.PROTOCOL_VERSION})
        )
        proc.stdin.flush()
        kind, req_id, payload = protocol.read_frame(protocol.exact_reader(proc.stdout.read))
        facts = protocol.loads(payload)
        assert (kind, req_id) == (protocol.REPLY, 1)
        assert facts["protocol"] == protocol.PROTOCOL_VERSION
        assert facts["pid"] == proc.pid
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0  # EOF ends the agent cleanly


def test_large_values_travel_out_of_band_without_copies():
    big = os.urandom(3 * protocol.WRITE_CHUNK + 5)
    message = {"op": "call", "inputs": big, "outcomes": [(True, big)], "small": b"x"}
    writes: list[bytes] = []
    protocol.FrameWriter(lambda b: writes.append(bytes(b))).send(
        protocol.REQUEST, 3, protocol.dumps(message)
    )
    # Header, table and envelope in one write, then each large value in chunks.
    assert len(writes[0]) < protocol.OUT_OF_BAND_MIN
    assert [len(w) for w in writes[1:5]] == [protocol.WRITE_CHUNK] * 3 + [5]
    kind, req_id, payload = protocol.read_frame(
        protocol.exact_reader(io.BytesIO(b"".join(writes)).read)
    )
    loaded = protocol.loads(payload)
    assert bytes(loaded["inputs"]) == big
    assert bytes(loaded["outcomes"][0][1]) == big
    assert loaded["small"] == b"x"
    assert loaded["inputs"].obj is payload  # a view of the frame, not a copy
