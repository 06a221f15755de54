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
    +24 committed (bytes)        +32 token (random u64)   +40 flags (bit 0: read-only)
    +48..63 reserved
    +64 the lock: a robust, process-shared pthread mutex (MUTEX_SIZE bytes)

Bytes from HEADER_SIZE on belong to the allocator.

Copy-on-write.  Besides the shared mapping, each process may map the
same descriptor once more with ``MAP_PRIVATE`` (``export_private``, made on
first use and kept like the shared one).  Reading through it maps the
shared pages themselves: no copy, no private memory.  The first write to a
page gives this process a private copy of that page; nobody else sees it.
``written_pages`` counts such copies (``/proc/self/pagemap``) and
``drop_private`` discards them (``MADV_DONTNEED``), so that a block freed
and reused shows the shared bytes again.  Never ``MAP_POPULATE`` it: that
copies every page.

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

import numpy as np

from . import _posix
from ._errors import BrokenArenaError, ClosedError, StoreFullError

__all__ = ["Arena", "HEADER_SIZE", "MIN_CAPACITY", "PAGE_SIZE", "written_pages"]

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
_HEADER = struct.Struct("8sQQQQQ")
_COMMITTED_WORD = 24 // 8
_FLAG_READONLY = 1

# /proc/self/pagemap holds one u64 per virtual page (Linux
# Documentation/admin-guide/mm/pagemap.rst): bit 63 "present", bit 62
# "swapped", bit 61 "file page or shared anonymous".  In a MAP_PRIVATE
# mapping of the arena a page this process has written is anonymous: present
# with bit 61 clear, or swapped.  A page only read is a file page (bit 61
# set); one never touched is not present.  The bits are readable without
# privileges (only the frame number, bits 0-54, is hidden).
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 1 << 63, 1 << 62, 1 << 61


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
        self._private: mmap.mmap | None = None
        self.private_address = 0

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def create(cls, capacity: int | None = None, *, readonly: bool = False) -> "Arena":
        """Create and own a new arena of *capacity* bytes.  *readonly* is
        recorded in the header, so every attached process reads the same
        value (``readonly``).

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
                          secrets.randbits(63), _FLAG_READONLY if readonly else 0)
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
        if self._private is not None:
            try:
                self._private.close()
            except BufferError:
                pass        # private views still exported: unmapped with the last
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
    def readonly(self) -> bool:
        """True if views of objects are sealed read-only rather than
        copy-on-write; set at creation, the same in every process."""
        return bool(_HEADER.unpack_from(self._mmap, 0)[5] & _FLAG_READONLY)

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


    def export_private(self, offset: int, nbytes: int, *, fresh: bool = False):
        """Return ``(exporter, address)``: a writable buffer exporter over
        ``[offset, offset + nbytes)`` of this process's copy-on-write
        mapping (see the module docstring), and its address.

        *offset* must be page-aligned.  The range is shared with every other
        export of it from the process's one private mapping, so a write
        through one is seen by the others; with *fresh*, the exporter gets a
        private mapping of its own instead (unmapped with its last view; its
        first read of each 64 KiB pays a page fault).
        """
        self._check_open()
        if fresh:
            length = _round_up(max(nbytes, 1), PAGE_SIZE)
            mapping = mmap.mmap(self._fd, length, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            exporter = (ctypes.c_char * nbytes).from_buffer(mapping)
            return exporter, ctypes.addressof(exporter)
        if self._private is None:
            self._private = mmap.mmap(self._fd, self.capacity, flags=mmap.MAP_PRIVATE,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
            probe = ctypes.c_char.from_buffer(self._private)
            self.private_address = ctypes.addressof(probe)
            del probe
        exporter = (ctypes.c_char * nbytes).from_buffer(self._private, offset)
        return exporter, self.private_address + offset

    def drop_private(self, offset: int, nbytes: int) -> None:
        """Discard this process's private copies of the pages of
        ``[offset, offset + nbytes)`` in its private mapping: afterwards they
        read the shared bytes again.  *offset* must be page-aligned; the
        range is rounded up to whole pages.  One madvise call: never blocks
        on a lock, so finalizers may call it."""
        private = self._private
        if private is None or private.closed or nbytes <= 0:
            return
        private.madvise(mmap.MADV_DONTNEED, offset, _round_up(nbytes, PAGE_SIZE))

    def drop_all_private(self) -> None:
        """Discard every private page copy of this process (its views of
        the private mapping must not be used afterwards)."""
        private = self._private
        if private is not None and not private.closed:
            private.madvise(mmap.MADV_DONTNEED, 0, self.capacity)


def written_pages(address: int, nbytes: int) -> int:
    """How many pages of ``[address, address + nbytes)`` (any mapping of
    this process) hold a private copy: pages written through a
    copy-on-write view.  Reads ``/proc/self/pagemap`` (8 bytes a page,
    about 0.4 ms for 64 MiB); blocks on nothing else."""
    if nbytes <= 0:
        return 0
    first = address // PAGE_SIZE
    count = (address + nbytes - 1) // PAGE_SIZE - first + 1
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        data = os.pread(f.fileno(), 8 * count, 8 * first)
    entries = np.frombuffer(data, dtype=np.uint64)
    present = (entries & np.uint64(_PM_PRESENT)) != 0
    anon = (entries & np.uint64(_PM_FILE)) == 0
    swapped = (entries & np.uint64(_PM_SWAPPED)) != 0
    return int(np.count_nonzero((present & anon) | swapped))


def _attach(dupfd, capacity: int) -> Arena:
    fd = dupfd.detach()
    arena = Arena(fd, capacity, owner=False)
    magic = bytes(arena.buf[:8])
    if magic != MAGIC:
        arena.close()
        raise BrokenArenaError(
            f"descriptor {fd} does not hold a shmpool arena (magic {magic!r})")
    return arena
