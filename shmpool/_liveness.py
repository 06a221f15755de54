"""Whether a process is alive, as the kernel sees it: a locked byte of a file.

A process marks itself alive by holding an ``fcntl`` open-file-description
lock (``F_OFD_SETLK``, Linux 3.15+) on one byte of a shared file, through a
description of its own.  The kernel drops the lock when the last descriptor
of that description closes, which happens at the latest when the process
exits or is killed.  Anybody asks ``F_OFD_GETLK``: a byte still locked is a
live owner.  Unlike a recorded pid this is right after pid reuse and across
PID namespaces, and needs no timer.

The description must be private: a ``dup`` or a fork shares it, and with it
the lock.  ``open_private`` re-opens the file through ``/proc/self/fd`` (a
new description) with ``O_CLOEXEC``, so an ``exec`` drops it too; a fork
child that must not keep its parent alive closes its inherited copy.

Locks taken through one description never conflict with each other, so
``is_held`` through a description reports only *other* descriptions' locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

__all__ = ["open_private", "try_hold", "is_held"]

# struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid
# (pid_t), padded to the C size.  OFD locks require l_pid == 0.
_FLOCK = struct.Struct("hhqqi4x")


def open_private(fd: int) -> int:
    """A new, close-on-exec description of the file behind *fd*, opened
    for reading and writing; the caller owns (and closes) it."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


def try_hold(fd: int, byte: int) -> bool:
    """Lock *byte* through description *fd*, without waiting.  False if
    another description holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def is_held(fd: int, byte: int) -> bool:
    """Whether a description other than *fd*'s holds a lock on *byte* now."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                         _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    lock_type: int = _FLOCK.unpack(answer)[0]
    return lock_type != fcntl.F_UNLCK
