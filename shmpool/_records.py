"""A pipe of whole records: many writers, many readers, no lock.

The pipe is opened in packet mode (``O_DIRECT``, Linux 3.4 and later):
each write of at most ``RECORD_SIZE`` (``PIPE_BUF``, 4096 bytes) is one
packet, written atomically, and each read returns exactly one packet to
exactly one reader.  So any number of processes and threads can write and
read at once without a lock around the pipe, and a process killed in the
middle of either cannot leave half a record behind or a lock held.  (The
standard library's queues frame messages over a plain pipe, which needs a
lock on each side; a process killed while holding one blocks every other
process for good.)

Both ends are non-blocking; waiting is done with ``poll``, so every wait
can have a timeout.  The kernel keeps at most ``capacity`` packets in the
pipe (asked for at creation, 256 KiB worth; fewer if the user's pipe quota
is spent); a full pipe makes ``write`` wait or report it.
"""

from __future__ import annotations

import fcntl
import math
import os
import select
import time
from multiprocessing.connection import Connection

__all__ = ["RecordPipe", "RECORD_SIZE"]

#: The largest record: the size the kernel writes atomically.
RECORD_SIZE = select.PIPE_BUF
_PIPE_BYTES = 256 * 1024


def _poll(fd: int, events: int, ms: int) -> bool:
    """Whether *fd* reports one of *events* (or hangs up) within *ms*
    milliseconds (-1: as long as it takes)."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(ms))


def _wait(fd: int, events: int, deadline: float | None) -> bool:
    """Wait until *fd* reports one of *events* (or hangs up); False once
    *deadline* (a ``time.monotonic()`` value, None: never) has passed."""
    if deadline is None:
        return _poll(fd, events, -1)
    remaining = deadline - time.monotonic()
    return remaining > 0 and _poll(fd, events, math.ceil(remaining * 1000))


def _ready_now(fd: int, event: int) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    return any(revents & event for _, revents in poller.poll(0))


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(timeout, 0.0)


class RecordPipe:
    """One packet-mode pipe.  Pickles (while spawning a process) by
    duplicating its two file descriptors, as a ``Connection`` does; fork
    children inherit them.  ``close_reader``/``close_writer`` close this
    process's ends only."""

    def __init__(self) -> None:
        r, w = os.pipe2(os.O_DIRECT | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:
            pass                  # the user's pipe quota is spent: the default size works
        self._init(Connection(r, writable=False), Connection(w, readable=False))

    def _init(self, reader: Connection, writer: Connection) -> None:
        # Connection objects own the descriptors: they close them when
        # dropped and know how to send them to a spawned process.
        self._reader = reader
        self._writer = writer

    @classmethod
    def _rebuild(cls, reader: Connection, writer: Connection) -> "RecordPipe":
        pipe = cls.__new__(cls)
        pipe._init(reader, writer)
        return pipe

    def __reduce__(self):
        return (RecordPipe._rebuild, (self._reader, self._writer))

    # -- writing -----------------------------------------------------------

    def write(self, record: bytes, timeout: float | None = None) -> bool:
        """Write *record* as one packet.  Waits up to *timeout* seconds
        (None: as long as it takes; 0: not at all) for room in the pipe and
        returns False if there was none.  Raises BrokenPipeError once no
        process has the reading end open."""
        if len(record) > RECORD_SIZE:
            raise ValueError(f"a record holds at most {RECORD_SIZE} bytes, got {len(record)}")
        fd = self._writer.fileno()
        deadline = _deadline(timeout)
        while True:
            try:
                os.write(fd, record)
                return True
            except BlockingIOError:
                pass
            if timeout == 0 or not _wait(fd, select.POLLOUT, deadline):
                return False

    # -- reading -----------------------------------------------------------

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next record, or None if none came within *timeout* seconds
        (None: wait as long as it takes; 0: do not wait).  Raises EOFError
        once every process has closed the writing end and the pipe is
        empty."""
        fd = self._reader.fileno()
        deadline = _deadline(timeout)
        while True:
            try:
                record = os.read(fd, RECORD_SIZE)
            except BlockingIOError:
                pass
            else:
                if not record:
                    raise EOFError("every writer of the pipe has closed it")
                return record
            if timeout == 0 or not _wait(fd, select.POLLIN, deadline):
                return None

    def readable(self) -> bool:
        """Whether a record is waiting now (another reader may take it)."""
        return _ready_now(self._reader.fileno(), select.POLLIN)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Wait up to *timeout* seconds (None: as long as it takes) until a
        record is waiting or every writer has closed the pipe, as
        ``Connection.poll`` does: then ``read`` returns or raises EOFError
        at once (unless another reader is faster)."""
        ms = -1 if timeout is None else math.ceil(max(timeout, 0.0) * 1000)
        return _poll(self._reader.fileno(), select.POLLIN, ms)

    def fileno(self) -> int:
        """The reading end's descriptor, for ``select`` and
        ``multiprocessing.connection.wait``."""
        return self._reader.fileno()

    def writable(self) -> bool:
        """Whether the pipe has room for a record now (another writer may
        take it)."""
        return _ready_now(self._writer.fileno(), select.POLLOUT)

    # -- closing -----------------------------------------------------------

    def close_reader(self) -> None:
        self._reader.close()

    def close_writer(self) -> None:
        self._writer.close()

    @property
    def reader_closed(self) -> bool:
        return self._reader.closed

    @property
    def writer_closed(self) -> bool:
        return self._writer.closed

