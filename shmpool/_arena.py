"""One shared-memory segment, mapped in every process that uses the store.

The creating process owns the arena.  The segment never has a name
(``_posix.create_segment``); other processes receive its file descriptor:
inherited under fork, passed with ``multiprocessing.reduction.DupFd`` when an
Arena is pickled for spawn or forkserver.  The kernel frees the memory when
the last descriptor and mapping are gone.  The arena's lock lives in its
header, so an arena owns no name at all: even SIGKILL of the whole process
group leaves nothing behind, and no start-up has anything to sweep.

The segment is sparse: it is mapped at its full capacity, but memory is
reserved (``posix_fallocate``) only as the allocator's high-water mark
grows, in COMMIT_CHUNK steps.  A full ``/dev/shm`` therefore shows up as a
failed commit, which the layers above turn into StoreFullError or a fallback,
never as a SIGBUS on first touch.

Arena header (native u64 at offsets from the segment start)::

    +0  magic b"SHMPOOL\\x02"    +8  capacity (bytes)     +16 owner pid
    +24 committed (bytes)        +32 token (random u64)   +40..63 reserved
    +64 the lock: a robust, process-shared pthread mutex (MUTEX_SIZE bytes)

Bytes from HEADER_SIZE on belong to the allocator.

Shared words are written through ``Arena.words`` (u64) and
``Arena.words32`` (u32), never with ``struct.pack_into``: see the comment
at ``_HEADER``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import struct
from multiprocessing import reduction

from . import _posix
from ._errors import BrokenArenaError, ClosedError, StoreFullError

__all__ = ["Arena", "HEADER_SIZE", "MIN_CAPACITY"]

MAGIC = b"SHMPOOL\x02"
MUTEX_OFFSET = 64
HEADER_SIZE = MUTEX_OFFSET + _posix.MUTEX_SIZE
PAGE_SIZE = mmap.PAGESIZE
#: Memory is reserved in steps of this size.  Larger steps mean fewer
#: fallocate calls on a growing store; smaller ones reserve less memory that
#: is never used.
COMMIT_CHUNK = 2 * 1024 * 1024
#: The smallest arena worth creating (tests use small ones on purpose).
MIN_CAPACITY = 64 * 1024

# A word that another process may read after this one is SIGKILLed must go
# from its old value to its new one in a single store.  struct.pack_into
# cannot do that: it zeroes its target first and only then converts and
# copies the value, so a process killed in between leaves 0 behind (and the
# standard-size "<" packers also store a u64 one byte at a time).  Assigning
# to an item of a "Q" memoryview converts the value first and then copies
# the 8 bytes at once.  _HEADER is packed only by create(), before any other
# process can see the arena.  The layout is this machine's, which is the
# only machine that maps it.
_HEADER = struct.Struct("8sQQQQ")
_COMMITTED_WORD = 24 // 8


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class Arena:
    """A mapped shared-memory segment, with the mutex that guards it inside.

    Ownership: the creator (``Arena.create``) made the segment and its
    mutex; every copy (the creator's, unpickled ones, ones inherited by
    fork) owns only its descriptor and mapping.  ``mutex`` is the lock that
    the allocator builds its protocol on (``_allocator``); nothing else
    takes it.  Process-safe; the mutable header field ``committed`` is only
    written under the arena lock, by ``commit_up_to``.

    ``close()`` never invalidates a live view: while buffers exported from
    the mapping exist, the mapping stays until the last of them is gone.
    """

    def __init__(self, fd: int, capacity: int, *, owner: bool, new: bool = False) -> None:
        self._fd = fd
        self._mmap = mmap.mmap(fd, capacity)
        self.buf = memoryview(self._mmap)
        #: The segment as native u64 words: ``words[offset // 8]``.  Stores
        #: through it never leave a half-written word (see ``_HEADER``).
        self.words = self.buf.cast("Q")
        #: The same as native u32 words: ``words32[offset // 4]``.
        self.words32 = self.buf.cast("I")
        probe = ctypes.c_char.from_buffer(self._mmap)
        self.address = ctypes.addressof(probe)
        del probe
        self.capacity = capacity
        memory = (ctypes.c_char * _posix.MUTEX_SIZE).from_buffer(self._mmap, MUTEX_OFFSET)
        init = _posix.RobustMutex.initialize if new else _posix.RobustMutex
        self.mutex = init(memory)
        self.is_owner = owner
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def create(cls, capacity: int | None = None) -> "Arena":
        """Create and own a new arena of *capacity* bytes.

        *capacity* defaults to the free space of ``/dev/shm``; an explicit
        capacity larger than that free space is refused, since it could only
        fail later.  Nothing is reserved until it is allocated.

        Raises:
            StoreFullError: *capacity* exceeds the free space of /dev/shm.
            ValueError: *capacity* is below MIN_CAPACITY.
        """
        free = _posix.shm_free_bytes()
        if capacity is None:
            capacity = free // PAGE_SIZE * PAGE_SIZE
        elif capacity < MIN_CAPACITY:
            raise ValueError(
                f"capacity must be at least {MIN_CAPACITY} bytes, got {capacity}")
        elif capacity > free:
            raise StoreFullError(
                f"cannot create a store of {capacity} bytes: /dev/shm has only "
                f"{free} bytes free (pass a smaller capacity= or free /dev/shm)")
        capacity = _round_up(capacity, PAGE_SIZE)
        fd = _posix.create_segment(capacity)
        try:
            first = min(COMMIT_CHUNK, capacity)
            if not _posix.commit_pages(fd, 0, first):
                raise StoreFullError(
                    f"cannot reserve {first} bytes in /dev/shm for a new store")
            arena = cls(fd, capacity, owner=True, new=True)
        except BaseException:
            os.close(fd)
            raise
        _HEADER.pack_into(arena.buf, 0, MAGIC, capacity, os.getpid(), first,
                          secrets.randbits(63))
        return arena

    def __reduce__(self):
        self._check_open()
        return (_attach, (reduction.DupFd(self._fd), self.capacity))

    def close(self) -> None:
        """Drop this process's mapping and descriptor.  Idempotent.  Live
        views keep the mapping alive.  Never call it while holding the lock."""
        if self._closed:
            return
        self._closed = True
        self.mutex.close()                  # its export of the mapping goes first
        self.words.release()
        self.words32.release()
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError:
            pass            # views still exported: unmapped when the last dies
        os.close(self._fd)

    def fileno(self) -> int:
        """The segment's file descriptor in this process (owned by the arena)."""
        self._check_open()
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the store's arena is closed in this process")

    # -- header ------------------------------------------------------------

    @property
    def token(self) -> int:
        """Random 63-bit id of this arena, the same in every process."""
        return _HEADER.unpack_from(self._mmap, 0)[4]

    @property
    def owner_pid(self) -> int:
        return _HEADER.unpack_from(self._mmap, 0)[2]

    @property
    def committed(self) -> int:
        """Bytes from the start of the segment backed by reserved memory."""
        return self.words[_COMMITTED_WORD]

    def commit_up_to(self, end: int) -> bool:
        """Reserve memory for the segment up to byte *end*.

        Call with the arena lock held.  Returns False if ``/dev/shm`` has no
        room left; the caller must then not touch bytes past ``committed``.
        """
        committed = self.committed
        new_end = min(_round_up(end, COMMIT_CHUNK), self.capacity)
        if new_end <= committed:
            return True
        if not _posix.commit_pages(self._fd, committed, new_end - committed):
            return False
        self.words[_COMMITTED_WORD] = new_end
        return True

    # -- buffers -----------------------------------------------------------

    def export(self, offset: int, nbytes: int):
        """Return a new buffer exporter over ``[offset, offset + nbytes)``.

        The exporter is a ctypes array: every memoryview or numpy array built
        on it keeps *it* alive, so a ``weakref.finalize`` on the exporter
        fires only after the last derived view is gone (see DESIGN.md: a
        finalizer on a memoryview fires too early).
        """
        self._check_open()
        return (ctypes.c_char * nbytes).from_buffer(self._mmap, offset)


def _attach(dupfd, capacity: int) -> Arena:
    fd = dupfd.detach()
    arena = Arena(fd, capacity, owner=False)
    magic = bytes(arena.buf[:8])
    if magic != MAGIC:
        arena.close()
        raise BrokenArenaError(
            f"descriptor {fd} does not hold a shmpool arena (magic {magic!r})")
    return arena
