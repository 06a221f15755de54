"""Crash cleanup for the one name an arena keeps: its semaphore.

Segments have no name to leak (``_posix.create_unlinked_segment``).  The
semaphore must keep a name while the arena lives, so three nets catch it:

1. a normal close, or interpreter exit (``atexit``), unlinks it;
2. SIGKILL of the owner: the standard library's resource tracker, a separate
   process, sees its client go and unlinks every name still registered;
3. SIGKILL of the whole process group (tracker included): the next shmpool
   start on the machine sweeps every ``shmp_<pid>_*`` name whose owner pid is
   dead.

Only the creator registers a name (CPython gh-82300: a tracker that unlinks
what a mere reader attached to destroys memory others still use).
"""

from __future__ import annotations

import os
import warnings

from multiprocessing import resource_tracker

from . import _posix

__all__ = ["register_owned", "unregister_owned", "sweep_dead_owners"]

_swept_in_pid = 0


def register_owned(sem_name: str) -> None:
    """Ask the resource tracker to unlink *sem_name* if this process dies."""
    resource_tracker.register(sem_name, "semaphore")


def unregister_owned(sem_name: str) -> None:
    """The owner unlinked *sem_name* itself; the tracker may forget it."""
    resource_tracker.unregister(sem_name, "semaphore")


def sweep_dead_owners(*, force: bool = False) -> list[str]:
    """Unlink every shmpool name whose owner process is gone.

    Runs once per process (on its first arena) unless *force*.  Returns the
    names it removed, and warns once with their count, as the resource
    tracker does for leaked semaphores.
    """
    global _swept_in_pid
    if _swept_in_pid == os.getpid() and not force:
        return []
    _swept_in_pid = os.getpid()
    removed = []
    for name, pid in _posix.leftover_names():
        if pid != os.getpid() and not _posix.process_is_alive(pid):
            _posix.unlink_name(name)
            removed.append(name)
    if removed:
        warnings.warn(
            f"shmpool removed {len(removed)} shared-memory name(s) left by dead "
            f"processes: {', '.join(removed[:5])}",
            RuntimeWarning, stacklevel=3)
    return removed
