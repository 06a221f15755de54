"""Helpers for testing code that uses shmpool (and shmpool's own tests).

The one sanctioned place that looks at internals: what is in ``/dev/shm``,
and the invariant checks of a store.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import _default_store, _posix
from ._serialization import ObjectStore
from ._store import RawStore, StoreStatistics

if TYPE_CHECKING:
    from ._executor import ProcessPoolExecutor
    from ._pool import Pool
    from ._queue import Queue, SimpleQueue

__all__ = [
    "live_names",
    "leaked_names",
    "names_in_use",
    "private_bytes",
    "check_invariants",
    "raw_store",
    "pool_store",
    "queue_store",
    "in_store",
    "in_any_store",
    "settled_statistics",
    "die_holding_store_lock",
    "FailsToUnpickle",
    "die_while_writing_object",
]


def live_names() -> set[str]:
    """Every name now in ``/dev/shm``, whoever made it: ``multiprocessing``'s
    named semaphores (``sem.mp-*``), other programs' segments, and names of
    earlier shmpool versions.  (A store itself has none.)"""
    try:
        return set(os.listdir(_posix.SHM_DIR))
    except OSError:
        return set()


def names_in_use(pids: Iterable[int] | None = None) -> set[str]:
    """Names in ``/dev/shm`` whose file a live process has mapped or open
    (every process, or those of *pids*).  A named semaphore stays mapped in
    every process that uses it, so one that nobody maps can only be
    unlinked.  Files are matched by inode: glibc maps a semaphore under a
    temporary name before it links the real one, so paths would not match."""
    names = {}
    for name in live_names():
        try:
            st = os.stat(os.path.join(_posix.SHM_DIR, name))
        except OSError:
            continue                           # unlinked meanwhile
        names[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = name
    used: set[tuple[int, int, int]] = set()
    for pid in (os.listdir("/proc") if pids is None else map(str, pids)):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(_posix.SHM_DIR + "/"):
                        major, minor = fields[3].split(":")
                        used.add((int(major, 16), int(minor, 16), int(fields[4])))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(_posix.SHM_DIR + "/"):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    used.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
        except OSError:
            continue                           # gone meanwhile, or not ours to read
    return {name for key, name in names.items() if key in used}


def leaked_names(since: set[str], timeout: float = 5.0) -> set[str]:
    """Names that appeared in ``/dev/shm`` after the snapshot *since*, that
    no live process has mapped or open, and that are still there after
    waiting up to *timeout* seconds for them to go (the resource tracker, a
    separate process, unlinks a dead client's names a moment later).

    Nobody can use such a name any more: it is a leak, whoever made it
    (shmpool, or a test's own ``multiprocessing`` objects)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = live_names() - since
        if extra:
            extra -= names_in_use()
        if not extra or time.monotonic() >= deadline:
            return extra
        time.sleep(0.05)      # polling a directory; there is no event to wait on


def private_bytes() -> int:
    """This process's private resident memory: its anonymous pages
    (``RssAnon``), where copies live; shared memory it maps is not counted."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux 4.5 or later)")


def raw_store(store: ObjectStore | RawStore) -> RawStore:
    """The byte-level store behind an ObjectStore."""
    return store.raw if isinstance(store, ObjectStore) else store


def check_invariants(store: ObjectStore | RawStore) -> None:
    """Walk the arena and assert every allocator and object-table invariant."""
    raw_store(store)._check_invariants()


def pool_store(pool: Pool | ProcessPoolExecutor) -> ObjectStore:
    """The store a Pool or ProcessPoolExecutor moves its arguments and
    results through."""
    store: ObjectStore = pool._store
    return store


def queue_store(queue: Queue | SimpleQueue) -> ObjectStore:
    """The store a Queue, JoinableQueue or SimpleQueue moves big items through."""
    store: ObjectStore = queue._store
    return store


def in_store(store: ObjectStore | RawStore, array: Any) -> bool:
    """Whether *array*'s memory lies inside *store*'s shared memory: in the
    shared mapping, or in a copy-on-write view of an object this process
    holds (a page written since is still counted as in the store)."""
    import numpy as np
    raw = raw_store(store)
    region = np.frombuffer(raw._arena.buf, np.uint8)
    try:
        if np.shares_memory(array, region):
            return True
    finally:
        del region
    address = np.asarray(array).__array_interface__["data"][0]
    return any(start <= address < entry[0] for start, entry in list(raw._exports.items()))


def in_any_store(array: Any) -> bool:
    """Whether *array*'s memory lies in any store this process has open (a
    view that came through some pool's or queue's store, zero-copy)."""
    from ._store import _open_stores
    return any(in_store(store, array) for store in list(_open_stores))


def settled_statistics(store: ObjectStore | RawStore, baseline: StoreStatistics,
                       timeout: float = 10.0) -> StoreStatistics:
    """Statistics of *store* once its live objects and bytes in use are back
    to *baseline*'s, or as they are after *timeout* seconds.  Releases by
    other processes (a worker acknowledging a result) take a moment."""
    deadline = time.monotonic() + timeout
    while True:
        stats = store.statistics()
        done = (stats.live_objects, stats.in_use) == (baseline.live_objects, baseline.in_use)
        if done or time.monotonic() >= deadline:
            return stats
        time.sleep(0.01)      # polling shared counters; there is no event to wait on


def die_holding_store_lock(_: object = None) -> None:
    """In a pool worker: take the store's lock, then SIGKILL this process."""
    store = _default_store.default_store()
    store.raw._alloc.lock()
    os.kill(os.getpid(), signal.SIGKILL)


def die_while_writing_object(nbytes: int = 1 << 20) -> None:
    """In a pool worker: create an object, write half of it, SIGKILL self."""
    builder = _default_store.default_store().raw.create(nbytes)
    builder.view[: nbytes // 2] = b"x" * (nbytes // 2)
    os.kill(os.getpid(), signal.SIGKILL)


class FailsToUnpickle:
    """Pickles fine; raises RuntimeError when unpickled (in the receiver)."""

    def __reduce__(self) -> tuple[Callable[[], object], tuple[()]]:
        return _refuse_to_unpickle, ()


def _refuse_to_unpickle() -> object:
    raise RuntimeError("refusing to unpickle")
