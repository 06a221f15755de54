"""The exception hierarchy of shmpool (layer 0: imports nothing of shmpool).

::

    ShmpoolError(Exception)
    +-- StoreError
    |   +-- ObjectNotFoundError  [KeyError]      unknown, deleted or forged ref
    |   +-- ObjectStateError                     seal twice, abort sealed, double free
    |   +-- StoreFullError       [MemoryError]   can never fit, or no space in time
    +-- ClosedError                               *you* closed the store
    +-- BrokenArenaError                          someone else broke it: bad magic,
    |                                             lock holder that never comes back
    +-- SerializationError   [pickle.PicklingError]  names the type; __cause__ = original
    +-- BrokenPoolError      [concurrent.futures.process.BrokenProcessPool]
        +-- WorkerDiedError                       .pid, .exitcode, .replaced; names the signal

Every new error also subclasses the standard library type a drop-in user
would already catch (bracketed above).  Messages are lowercase, name the
object, the size and the limit, then the fix.  Each class pickles, because
errors raised in a worker cross a process boundary.
"""

from __future__ import annotations

import pickle
import signal
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "ShmpoolError",
    "StoreError",
    "ObjectNotFoundError",
    "ObjectStateError",
    "StoreFullError",
    "ClosedError",
    "BrokenArenaError",
    "SerializationError",
    "BrokenPoolError",
    "WorkerDiedError",
]


class ShmpoolError(Exception):
    """Base class of every error shmpool raises itself."""


class StoreError(ShmpoolError):
    """An operation on the shared-memory object store failed."""


class ObjectNotFoundError(StoreError, KeyError):
    """The ref names no live object: it was deleted, freed, or never existed.

    A stale ref (its object was freed and the slot reused) and a forged ref
    both land here; neither ever reads another object's memory.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message like a dict key.
        return str(self.args[0]) if self.args else ""


class ObjectStateError(StoreError):
    """The object is in the wrong state for the call (e.g. sealing twice)."""


class StoreFullError(StoreError, MemoryError):
    """The object does not fit: it is larger than the store, or no space was
    freed before the wait for space ran out."""


class ClosedError(ShmpoolError):
    """The store was closed by this process; it cannot be used any more."""


class BrokenArenaError(ShmpoolError):
    """The shared arena is unusable for a reason outside this process: its
    header is not a shmpool header, or a lock holder never came back."""


class SerializationError(ShmpoolError, pickle.PicklingError):
    """An object could not be pickled for, or unpickled from, the store.

    The message names the object's type; ``__cause__`` is the original
    exception raised by pickle or by the object's own reducer.
    """


class BrokenPoolError(ShmpoolError, BrokenProcessPool):
    """The pool cannot run this task: it was terminated, or broke."""


class WorkerDiedError(BrokenPoolError):
    """A worker process died before answering.

    ``pid`` and ``exitcode`` (negative: the signal) name the process.  With
    ``replaced`` true (the Pool), the task it ran failed, the pool has
    already replaced the worker, and other tasks are unaffected.  With
    ``replaced`` false (the executor, as ``concurrent.futures`` does), the
    pool is broken: every task it had not finished fails with this error
    and it takes no new ones.
    """

    def __init__(self, pid: int, exitcode: int | None, replaced: bool = True) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.replaced = replaced
        if exitcode is not None and exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-exitcode}"
        else:
            how = f"exited with code {exitcode}"
        if replaced:
            super().__init__(
                f"worker process {pid} {how} while running the task (exitcode "
                f"{exitcode}); the pool replaced it (a crash in the task, os._exit, "
                f"or the OOM killer are the usual causes)")
        else:
            super().__init__(
                f"worker process {pid} {how} (exitcode {exitcode}), so the pool is "
                f"broken: every task it had not finished failed and it takes no new "
                f"ones; create a new one (a crash in a task, os._exit, an initializer "
                f"that raised, or the OOM killer are the usual causes)")

    def __reduce__(self):
        return (type(self), (self.pid, self.exitcode, self.replaced))


class NotARefError(TypeError):
    """A store method was given something that is not an ObjectRef.  Raised
    by validation, before any shared write (so it ends a locked section
    clean); a plain TypeError for callers."""
