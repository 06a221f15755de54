"""Operating-system primitives: segments, the named semaphore, process checks.

This is the only module that imports ``posix_ipc``; its errors are translated
into shmpool's here and nowhere else.

Names.  Every name shmpool creates in ``/dev/shm`` reads
``shmp_<owner pid>_<16 random hex digits>``: unguessable, mode 0600, and
carrying the owner's pid so that a later start can sweep what a dead owner
left behind (see ``_tracker``).  Segments keep their name only for the few
microseconds between creation and unlink; what crosses to other processes is
the file descriptor.  The semaphore keeps its name for the life of the arena,
because a spawned process can only open it by name.
"""

from __future__ import annotations

import errno
import os
import re
import secrets

import posix_ipc

from ._errors import BrokenArenaError, StoreFullError

__all__ = [
    "SHM_DIR",
    "NamedSemaphore",
    "commit_pages",
    "create_unlinked_segment",
    "leftover_names",
    "new_name",
    "process_is_alive",
    "shm_free_bytes",
    "unlink_name",
]

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^(sem\.)?(shmp_(\d+)_[0-9a-f]+)$")


def new_name(owner_pid: int | None = None) -> str:
    """Return a fresh name ``/shmp_<pid>_<token>`` (64 random bits)."""
    pid = os.getpid() if owner_pid is None else owner_pid
    return f"/shmp_{pid}_{secrets.token_hex(8)}"


def shm_free_bytes() -> int:
    """Bytes still free in the tmpfs behind ``/dev/shm``."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def create_unlinked_segment(nbytes: int) -> int:
    """Create a sparse shared-memory file of *nbytes*, unlink its name at once,
    and return the file descriptor (owned by the caller, close-on-exec).

    Nothing of it is left in ``/dev/shm``: the memory lives as long as some
    process keeps the descriptor or a mapping of it open.
    """
    name = new_name()
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=nbytes)
    except posix_ipc.Error as exc:
        raise StoreFullError(
            f"cannot create a {nbytes}-byte shared-memory segment: {exc}") from exc
    try:
        fd = os.dup(shm.fd)
    finally:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(name)
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


def leftover_names() -> list[tuple[str, int]]:
    """Every shmpool name in ``/dev/shm`` as ``(posix name, owner pid)``."""
    found = []
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return found
    for entry in entries:
        m = _NAME_RE.match(entry)
        if m:
            kind = "sem" if m.group(1) else "shm"
            found.append((f"{kind}:/{m.group(2)}", int(m.group(3))))
    return found


def unlink_name(tagged_name: str) -> None:
    """Unlink a name returned by leftover_names(); a missing name is fine."""
    kind, name = tagged_name.split(":", 1)
    try:
        if kind == "sem":
            posix_ipc.unlink_semaphore(name)
        else:
            posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


class NamedSemaphore:
    """A process-shared binary semaphore with a name in ``/dev/shm``.

    Thread- and process-safe.  ``try_acquire`` never blocks; ``acquire`` waits
    at most *timeout* seconds.  After fork the child may use the parent's
    handle; a spawned process opens it again by name (``open``).
    """

    def __init__(self, sem: posix_ipc.Semaphore, name: str) -> None:
        self._sem = sem
        self.name = name

    @classmethod
    def create(cls) -> "NamedSemaphore":
        name = new_name()
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=1)
        return cls(sem, name)

    @classmethod
    def open(cls, name: str) -> "NamedSemaphore":
        try:
            return cls(posix_ipc.Semaphore(name), name)
        except posix_ipc.ExistentialError as exc:
            raise BrokenArenaError(
                f"the arena lock {name} no longer exists: the store's owner "
                f"closed it or exited") from exc

    def try_acquire(self) -> bool:
        try:
            self._sem.acquire(0)
        except posix_ipc.BusyError:
            return False
        return True

    def acquire(self, timeout: float) -> bool:
        try:
            self._sem.acquire(timeout)
        except posix_ipc.BusyError:
            return False
        return True

    def release(self) -> None:
        self._sem.release()

    def close(self) -> None:
        try:
            self._sem.close()
        except posix_ipc.ExistentialError:
            pass

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_semaphore(self.name)
        except posix_ipc.ExistentialError:
            pass
