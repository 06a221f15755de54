"""The messages between a supervisor and its workers, and how they are framed.

Each worker has one stream socket to its supervisor.  Every message, both
ways, is one frame::

    +0 payload length u64  +8 kind u8  +9 job u64  +17 index u32  +21 payload

    supervisor -> worker   Task(job, index, payload)   payload: a store message
                                                       of (call, func, args, kwds)
                           ACK    the oldest answer that went through the store
                                  is now held by the supervisor: let go of it
                           STOP   exit
    worker -> supervisor   Answer(job, index, ok, payload)
                                  payload: a store message of the result, or
                                  of the exception (ok=False)

The header is plain bytes, so the job and index of an answer stay readable
even when its payload cannot be unpickled: every failure is reported for
its task.  A payload is a store message (``ObjectStore.encode_held``): an
in-band pickle below the store's threshold, a ref otherwise.

Both ends read and write frames with ``FrameReader`` and ``FrameWriter``
over a non-blocking descriptor: a reader keeps a partly received frame and
returns only whole messages; a writer keeps what the socket did not take.
Neither ever waits, so the one thread that serves many workers is never
stuck on one of them (a full socket, a stopped process, a huge message).
"""

from __future__ import annotations

import collections
import enum
import os
import struct
from dataclasses import dataclass
from typing import Union

__all__ = ["APPLY", "MAP", "STARMAP", "Shared", "Task", "Answer", "Control", "ACK", "STOP",
           "Message", "FrameReader", "FrameWriter", "own_parent_end", "drop_parent_end"]

#: What a task's function is called with (the first item of its payload).
APPLY, MAP, STARMAP = 0, 1, 2

_HEAD = struct.Struct("<QBQI")
_TASK, _OK, _ERROR, _ACK, _STOP = 1, 2, 3, 4, 5
_KINDS = frozenset((_TASK, _OK, _ERROR, _ACK, _STOP))

#: Bytes asked of one ``os.read``.  A frame longer than this is read straight
#: into a buffer of its own size instead of being collected in pieces.
READ_CHUNK = 256 * 1024
#: Bytes a reader takes from one descriptor per call, so that one worker
#: sending a huge message cannot keep the supervisor from the others.
READ_BUDGET = 4 * 1024 * 1024
#: A payload at most this long is copied behind its header (one write);
#: a longer one is written from where it is, as a second buffer.
_JOIN_BELOW = 16 * 1024
_IOV_MAX = 512


@dataclass(frozen=True, slots=True)
class Shared:
    """Stands for the function of every task of one ``map``-like call,
    encoded once when the call is made: *message* is an ``encode_held``
    message naming one store object, which the parent holds until the
    call's last task is answered.  A worker decodes it for each task (a
    zero-copy read of the store object)."""

    message: bytes


@dataclass(frozen=True, slots=True)
class Task:
    """Run a call: *payload* encodes ``(call, func, args, kwds)``."""

    job: int
    index: int
    payload: bytes          # or a bytearray, for a long frame (never copied again)


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of task (*job*, *index*): its result (*ok*) or its
    exception, encoded in *payload*."""

    job: int
    index: int
    ok: bool
    payload: bytes


class Control(enum.Enum):
    """Messages without a body."""

    ACK = _ACK
    STOP = _STOP


ACK, STOP = Control.ACK, Control.STOP
Message = Union[Task, Answer, Control]


def _frame(message: Message) -> list:
    """The buffers that make up *message*'s frame."""
    if isinstance(message, Control):
        return [_HEAD.pack(0, message.value, 0, 0)]
    if isinstance(message, Task):
        kind = _TASK
    else:
        kind = _OK if message.ok else _ERROR
    payload = message.payload
    head = _HEAD.pack(len(payload), kind, message.job, message.index)
    if len(payload) < _JOIN_BELOW:
        return [head + payload]
    return [head, memoryview(payload).cast("B")]


def _message(kind: int, job: int, index: int, payload) -> Message:
    if kind == _TASK:
        return Task(job, index, payload)
    if kind in (_OK, _ERROR):
        return Answer(job, index, kind == _OK, payload)
    try:
        return Control(kind)
    except ValueError:
        raise ValueError(f"not a shmpool pipe frame (kind {kind}); "
                         f"the peer speaks another protocol") from None


class FrameReader:
    """Whole messages from a non-blocking stream descriptor *fd* (not owned:
    the caller closes it).  ``read`` never waits."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._big = None              # (kind, job, index, body, filled) of a long frame
        self.eof = False
        """True once the peer has closed its end (or the socket failed)."""

    def read(self, budget: int = READ_BUDGET) -> list[Message]:
        """The messages completed by what *fd* has now, up to about
        *budget* bytes; [] if nothing is complete yet."""
        out: list[Message] = []
        while budget > 0 and not self.eof:
            try:
                if self._big is not None:
                    got = self._read_big(out)
                else:
                    data = os.read(self._fd, READ_CHUNK)
                    got = len(data)
                    if got:
                        self._buf += data
                        self._parse(out)
                        if got < READ_CHUNK:  # all there was: save a read that fails
                            break
            except BlockingIOError:
                break
            except OSError:               # reset by a peer that died: nothing more
                got = 0
            if not got:
                self.eof = True
            budget -= got
        return out

    def _read_big(self, out: list) -> int:
        kind, job, index, body, filled = self._big
        got = os.readv(self._fd, [memoryview(body)[filled:]])
        filled += got
        if filled == len(body):
            self._big = None
            out.append(_message(kind, job, index, body))
        else:
            self._big = (kind, job, index, body, filled)
        return got

    def _parse(self, out: list) -> None:
        buf = self._buf
        start = 0
        with memoryview(buf) as view:
            while len(buf) - start >= _HEAD.size:
                length, kind, job, index = _HEAD.unpack_from(view, start)
                if kind not in _KINDS:    # before trusting the length
                    raise ValueError(f"not a shmpool pipe frame (kind {kind}); "
                                     f"the peer speaks another protocol")
                begin = start + _HEAD.size
                end = begin + length
                if end <= len(buf):
                    out.append(_message(kind, job, index, bytes(view[begin:end])))
                    start = end
                    continue
                if length > READ_CHUNK:   # read the rest straight into place
                    body = bytearray(length)
                    body[:len(buf) - begin] = view[begin:]
                    self._big = (kind, job, index, body, len(buf) - begin)
                    start = len(buf)
                break
        del buf[:start]


class FrameWriter:
    """Frames waiting to be written to a non-blocking descriptor *fd* (not
    owned).  ``append`` queues, ``flush`` writes what the descriptor takes
    now; neither waits.  ``append`` may be called from any thread (one
    frame is one ``deque.extend``, atomic); ``flush`` and ``clear`` from
    one thread only."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._chunks: collections.deque = collections.deque()

    @property
    def pending(self) -> bool:
        """True while some queued bytes are not written yet."""
        return bool(self._chunks)

    def append(self, message: Message) -> None:
        self._chunks.extend(_frame(message))

    def clear(self) -> None:
        """Drop what is queued (the peer is gone)."""
        self._chunks.clear()

    def flush(self) -> bool:
        """Write as much as *fd* takes now; True once nothing is left.

        Raises:
            OSError: the peer is gone (EPIPE, ECONNRESET) or *fd* is closed.
        """
        chunks = self._chunks
        while chunks:
            batch = list(chunks) if len(chunks) <= _IOV_MAX else [
                chunks[i] for i in range(_IOV_MAX)]
            try:
                written = os.writev(self._fd, batch)
            except BlockingIOError:
                return False
            while written:
                first = len(chunks[0])
                if written >= first:
                    chunks.popleft()
                    written -= first
                else:
                    chunks[0] = memoryview(chunks[0])[written:]
                    written = 0
        return True


# -- the parent's ends in fork children ------------------------------------
#
# A fork child inherits every descriptor of its parent, among them the
# supervisor's end of each worker's socket.  A worker whose peer end is
# open in some other process never sees end-of-file when its parent dies.
# So every fork child closes, first thing, the supervisor ends this process
# owns.  (A plain set: its add and discard are atomic, and a lock could be
# held by a thread that does not exist in the child.)

_parent_ends: set[int] = set()
_hook_registered = False


def own_parent_end(fd: int) -> None:
    """Record *fd* as a descriptor that fork children must close."""
    global _hook_registered
    if not _hook_registered:
        _hook_registered = True
        os.register_at_fork(after_in_child=_close_parent_ends)
    _parent_ends.add(fd)


def drop_parent_end(fd: int) -> None:
    """Forget *fd* (call it just before closing *fd*)."""
    _parent_ends.discard(fd)


def _close_parent_ends() -> None:
    for fd in list(_parent_ends):
        try:
            os.close(fd)
        except OSError:
            pass
    _parent_ends.clear()
