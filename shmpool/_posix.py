"""Operating-system primitives: nameless segments, the robust mutex, process checks.

Nothing here creates a name.  A segment is an anonymous file in the tmpfs
behind ``/dev/shm`` (``O_TMPFILE``), so it never has a name, not even for a
microsecond, while its memory is still counted against ``/dev/shm``: a full
``/dev/shm`` makes ``posix_fallocate`` fail rather than a first touch raise
SIGBUS.  Where ``O_TMPFILE`` is refused, ``memfd_create`` (also nameless)
stands in.  The lock lives inside the segment (``RobustMutex``).  So there is
nothing that another user, another PID namespace or a reused pid could
collide with, and nothing to sweep after a crash.

``RobustMutex`` calls glibc's pthread functions through ctypes.  They are in
``libc.so.6`` from glibc 2.34 on and in ``libpthread.so.0`` before that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import re
import signal
import sys
import time

from ._errors import StoreFullError

__all__ = [
    "SHM_DIR",
    "MUTEX_SIZE",
    "RobustMutex",
    "commit_pages",
    "create_segment",
    "die_with_parent",
    "process_is_alive",
    "shm_free_bytes",
    "shmpool_names",
]

SHM_DIR = "/dev/shm"
_PR_SET_PDEATHSIG = 1
#: What earlier versions of shmpool named their objects in ``/dev/shm``
#: (``shmp_<pid>_<hex>``, semaphores with a ``sem.`` prefix).  Nothing
#: creates such names any more; tests look for them to prove it.
_NAME_RE = re.compile(r"^(sem\.)?shmp_\d+_[0-9a-f]+$")


def shm_free_bytes() -> int:
    """Bytes still free in the tmpfs behind ``/dev/shm``."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def create_segment(nbytes: int) -> int:
    """Create a sparse shared-memory file of *nbytes* that has no name, and
    return its descriptor (owned by the caller, close-on-exec).

    The memory lives as long as some process keeps the descriptor or a
    mapping of it open; nothing of it is ever visible in ``/dev/shm``.

    Raises:
        StoreFullError: the kernel refused to create the file.
    """
    try:
        # O_EXCL: the file can never be given a name later (linkat).
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        # No O_TMPFILE here (kernel, file system or Python build).
        try:
            fd = os.memfd_create("shmpool", os.MFD_CLOEXEC)
        except OSError as exc:
            raise StoreFullError(
                f"cannot create a {nbytes}-byte shared-memory segment: {exc}") from exc
    try:
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        os.close(fd)
        raise StoreFullError(
            f"cannot size a shared-memory segment to {nbytes} bytes: {exc}") from exc
    return fd


def commit_pages(fd: int, offset: int, nbytes: int) -> bool:
    """Reserve real memory for ``[offset, offset + nbytes)`` of a segment.

    tmpfs allocates a page on first touch; touching a page when ``/dev/shm``
    is full kills the process with SIGBUS.  posix_fallocate reserves the pages
    up front and fails cleanly instead.  Returns False when there is no room.
    """
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            return False
        raise
    return True


def process_is_alive(pid: int) -> bool:
    """True if *pid* names a running (not zombie) process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state letter follows the parenthesised command name.
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started
    it dies (``PR_SET_PDEATHSIG``; Linux only, elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def shmpool_names() -> set[str]:
    """Every name in ``/dev/shm`` shaped like an old shmpool name, whoever
    owns it.  Only read, never removed: none of them is this process's."""
    try:
        return {entry for entry in os.listdir(SHM_DIR) if _NAME_RE.match(entry)}
    except OSError:
        return set()


# -- the robust mutex -------------------------------------------------------

#: Bytes reserved for a ``pthread_mutex_t``.  glibc's is 40 bytes on x86-64
#: and 48 on aarch64 (24 on 32-bit targets); 64 covers every Linux target.
MUTEX_SIZE = 64
_GLIBC_MUTEX_SIZE = {"x86_64": 40, "aarch64": 48, "ppc64le": 40, "s390x": 40,
                     "riscv64": 40, "i686": 24, "armv7l": 24}
assert max(_GLIBC_MUTEX_SIZE.values()) <= MUTEX_SIZE
assert ctypes.sizeof(ctypes.c_char * MUTEX_SIZE) == MUTEX_SIZE

#: glibc keeps the owner's thread id in the low 30 bits of the mutex's first
#: u32 (the futex word; the top two bits are "waiters" and "owner died").
#: The layout is glibc's ABI (static initialisers depend on it).
FUTEX_TID_MASK = 0x3FFFFFFF

_PTHREAD_MUTEX_ERRORCHECK = 2
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_CLOCK_MONOTONIC = time.CLOCK_MONOTONIC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Pthread:
    """The pthread functions, bound once per process on first use.

    ``trylock``, ``unlock`` and ``consistent`` never block, so they keep the
    GIL (``PyDLL``: no release and re-take around a call of a few hundred
    nanoseconds).  ``clocklock`` may wait, so it releases the GIL (``CDLL``).
    """

    _loaded: "_Pthread | None" = None

    def __init__(self) -> None:
        for name in ("c", "pthread"):
            path = ctypes.util.find_library(name)
            if path and hasattr(ctypes.CDLL(path), "pthread_mutex_consistent"):
                break
        else:
            raise OSError("found no C library with robust pthread mutexes "
                          "(shmpool needs glibc on Linux)")
        blocking, quick = ctypes.CDLL(path), ctypes.PyDLL(path)
        voidp, intp = ctypes.c_void_p, ctypes.c_int

        def bind(lib, name, *argtypes):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), intp
            return fn

        self.attr_init = bind(quick, "pthread_mutexattr_init", voidp)
        self.attr_destroy = bind(quick, "pthread_mutexattr_destroy", voidp)
        self.attr_settype = bind(quick, "pthread_mutexattr_settype", voidp, intp)
        self.attr_setpshared = bind(quick, "pthread_mutexattr_setpshared", voidp, intp)
        self.attr_setrobust = bind(quick, "pthread_mutexattr_setrobust", voidp, intp)
        self.init = bind(quick, "pthread_mutex_init", voidp, voidp)
        # The two calls of every hold: no argtypes, so a c_void_p argument
        # goes through without a conversion (a third less time per call).
        raw = ctypes.PyDLL(path)
        self.trylock, self.unlock = raw.pthread_mutex_trylock, raw.pthread_mutex_unlock
        self.trylock.restype = self.unlock.restype = intp
        self.consistent = bind(quick, "pthread_mutex_consistent", voidp)
        timespec_p = ctypes.POINTER(_Timespec)
        if hasattr(blocking, "pthread_mutex_clocklock"):              # glibc >= 2.30
            clocklock = bind(blocking, "pthread_mutex_clocklock", voidp, intp, timespec_p)
            self.clock = _CLOCK_MONOTONIC
            self.timedlock = lambda m, ts: clocklock(m, _CLOCK_MONOTONIC, ts)
        else:
            self.clock = time.CLOCK_REALTIME
            self.timedlock = bind(blocking, "pthread_mutex_timedlock", voidp, timespec_p)

    @classmethod
    def get(cls) -> "_Pthread":
        if cls._loaded is None:
            cls._loaded = cls()
        return cls._loaded


class RobustMutex:
    """A process-shared, robust, error-checking pthread mutex in shared memory.

    *memory* is a writable ctypes object of MUTEX_SIZE bytes inside a shared
    mapping; the mutex keeps it (and so the mapping) alive.  Every method
    returns the pthread error number (0 for success) and raises nothing of
    its own: the caller (``_allocator``) decides what each one means.

    - ``try_acquire`` never blocks.  ``acquire_for(seconds)`` waits at most
      that long, with the GIL released; a signal does not end the wait early
      (glibc restarts the futex wait), so callers keep slices short.
    - EOWNERDEAD: the caller now holds the mutex, and its previous owner died
      holding it (the kernel's robust-futex list reports it).  The caller must
      call ``make_consistent`` before releasing, or the mutex becomes
      unusable (ENOTRECOVERABLE).
    - EDEADLK: the calling thread already holds it.  EPERM (release): the
      calling thread does not hold it.

    Ownership is per thread: the thread that acquired it must release it.
    """

    __slots__ = ("_memory", "_word", "_fns", "closed", "try_acquire", "release")

    def __init__(self, memory) -> None:
        assert ctypes.sizeof(memory) >= MUTEX_SIZE
        self._fns = _Pthread.get()
        self._bind(memory)
        #: Set by ``close()``; callers check it before acquiring.
        self.closed = False

    def _bind(self, memory) -> None:
        self._memory = memory                 # keeps the memory mapped
        self._word = ctypes.c_uint32.from_buffer(memory)
        address = ctypes.c_void_p(ctypes.addressof(memory))
        # The two calls of every lock hold, bound without a Python frame.
        #: ``try_acquire()``: never blocks.
        self.try_acquire = functools.partial(self._fns.trylock, address)
        #: ``release()``: never blocks.
        self.release = functools.partial(self._fns.unlock, address)

    @classmethod
    def initialize(cls, memory) -> "RobustMutex":
        """Initialise a new mutex in *memory* (nobody may use it yet)."""
        mutex = cls(memory)
        fns = mutex._fns
        attr = ctypes.create_string_buffer(64)        # pthread_mutexattr_t is 4 or 8
        checks = [fns.attr_init(attr),
                  fns.attr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK),
                  fns.attr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
                  fns.attr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
                  fns.init(memory, attr)]
        fns.attr_destroy(attr)
        failed = next((rc for rc in checks if rc), 0)
        if failed:
            raise OSError(failed, f"cannot initialise the store's robust mutex: "
                                  f"{os.strerror(failed)}")
        return mutex

    def acquire_for(self, seconds: float) -> int:
        deadline = time.clock_gettime(self._fns.clock) + seconds
        sec = int(deadline)
        ts = _Timespec(sec, int((deadline - sec) * 1e9))
        return self._fns.timedlock(self._memory, ctypes.byref(ts))

    def make_consistent(self) -> int:
        return self._fns.consistent(self._memory)

    def close(self) -> None:
        """Let go of the shared memory (the mapping may then be unmapped).
        Never call it while holding the mutex.  A call after this one acts
        on a private stand-in, never on unmapped memory."""
        self.closed = True
        self._bind((ctypes.c_char * MUTEX_SIZE)())     # all zeros: a valid mutex

    def owner_tid(self) -> int:
        """Thread id of the holder (0: free, or its holder died), as the
        holder's PID namespace numbers it."""
        return self._word.value & FUTEX_TID_MASK
