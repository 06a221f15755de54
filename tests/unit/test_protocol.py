"""Frames on a worker socket: whole messages out of any split of the
stream, on both sides of READ_CHUNK, and a foreign stream refused before
its length is trusted."""

import socket
import struct

import pytest

from shmpool._protocol import READ_CHUNK, Answer, FrameReader, FrameWriter, Task


def _pair():
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    return a, b


@pytest.mark.parametrize("size", [0, 1, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1,
                                  4 * READ_CHUNK + 3])
def test_frames_of_every_size_arrive_whole_in_any_number_of_reads(size):
    a, b = _pair()
    with a, b:
        writer, reader = FrameWriter(a.fileno()), FrameReader(b.fileno())
        payloads = [bytes([i % 251]) * size for i in range(3)]
        for i, payload in enumerate(payloads):
            writer.append(Task(7, i, payload))
        writer.append(Answer(8, 0, True, b"done"))
        got = []
        for _ in range(10_000):                  # each round: as much as fits, then read
            writer.flush()
            got += reader.read()
            if len(got) == 4:
                break
        assert [(m.job, m.index, bytes(m.payload)) for m in got[:3]] == [
            (7, i, p) for i, p in enumerate(payloads)]
        assert isinstance(got[3], Answer) and got[3].ok and bytes(got[3].payload) == b"done"


def test_a_foreign_stream_is_refused_before_its_length_is_trusted():
    a, b = _pair()
    with a, b:
        a.send(struct.pack("<QBQI", 2 ** 62, 99, 0, 0))   # would ask for 4 EiB
        with pytest.raises(ValueError, match="not a shmpool pipe frame"):
            FrameReader(b.fileno()).read()
