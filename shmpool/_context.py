"""``shmpool.get_context``: a multiprocessing context whose Pool and queues are shmpool's.

The context is a ``multiprocessing.context.BaseContext``, so code that
checks for one (PyTorch's ``DataLoader(multiprocessing_context=...)``)
takes it.  ``Pool``, ``Queue``, ``JoinableQueue`` and ``SimpleQueue`` are
shmpool's; everything else (``Process``, ``Event``, ``Lock``, ``Manager``,
``get_start_method``, ...) is the wrapped multiprocessing context's own, so
processes keep its start method and locks are made exactly as it makes them.

Libraries that build their own machinery on a context work with this one:
``concurrent.futures.ProcessPoolExecutor(mp_context=ctx)`` gets its results
through shmpool's ``SimpleQueue`` and ``multiprocessing.pool.Pool(context=ctx)``
its tasks and results, both through the store (the queue's ``_reader`` and
``_writer`` ends are what these libraries call; see ``_queue``).

The context is never made global: shmpool never calls
``multiprocessing.set_start_method``.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

from ._pool import Pool
from ._queue import JoinableQueue, Queue, SimpleQueue

__all__ = ["Context", "get_context"]

#: What the wrapped context provides, unchanged.  Methods of BaseContext
#: would otherwise make objects with *this* context (``Lock(ctx=self)``);
#: forwarding them makes them exactly as the wrapped context does.
_FORWARDED = (
    "Array", "Barrier", "BoundedSemaphore", "Condition", "Event", "Lock", "Manager", "Pipe",
    "RLock", "RawArray", "RawValue", "Semaphore", "Value", "_check_available",
    "active_children", "allow_connection_pickling", "cpu_count", "current_process",
    "freeze_support", "get_logger", "log_to_stderr", "parent_process", "set_executable",
    "set_forkserver_preload", "set_start_method",
)


class Context(BaseContext):
    """A multiprocessing context, except that ``Pool`` and the queues are
    shmpool's.

    Args:
        multiprocessing_context: the concrete multiprocessing context
            (fork, spawn or forkserver) whose processes, locks and start
            method this context uses.  Kept as ``multiprocessing_context``.

    Thread-safe; holds no resources of its own.
    """

    def __init__(self, multiprocessing_context: BaseContext) -> None:
        self.multiprocessing_context = multiprocessing_context

    @property
    def Process(self):
        """The wrapped context's process class (it carries the start method)."""
        return self.multiprocessing_context.Process

    @property
    def _name(self) -> str:
        return self.multiprocessing_context._name

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
             **store_options) -> Pool:
        """``shmpool.Pool`` bound to this context's start method."""
        return Pool(processes, initializer, initargs, maxtasksperchild,
                    context=self.multiprocessing_context, **store_options)

    def Queue(self, maxsize=0, **store_options) -> Queue:
        """``shmpool.Queue`` whose semaphores come from this context."""
        return Queue(maxsize, ctx=self.multiprocessing_context, **store_options)

    def JoinableQueue(self, maxsize=0, **store_options) -> JoinableQueue:
        """``shmpool.JoinableQueue`` whose semaphores come from this context."""
        return JoinableQueue(maxsize, ctx=self.multiprocessing_context, **store_options)

    def SimpleQueue(self, **store_options) -> SimpleQueue:
        """``shmpool.SimpleQueue``."""
        return SimpleQueue(ctx=self.multiprocessing_context, **store_options)

    def get_context(self, method: str | None = None) -> "Context":
        """This context, or shmpool's context for start method *method*."""
        return self if method is None else get_context(method)

    def get_start_method(self, allow_none: bool = False) -> str:
        return self.multiprocessing_context.get_start_method(allow_none)

    def __getattr__(self, name: str):
        # Only for names BaseContext lacks (get_all_start_methods, ...).
        if name == "multiprocessing_context":        # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.multiprocessing_context, name)

    def __repr__(self) -> str:
        return f"<shmpool context {self.get_start_method()!r}>"


def _forward(name: str):
    def forwarded(self, *args, **kwargs):
        return getattr(self.multiprocessing_context, name)(*args, **kwargs)

    forwarded.__name__ = name
    forwarded.__qualname__ = f"Context.{name}"
    forwarded.__doc__ = f"The wrapped multiprocessing context's ``{name}``."
    return forwarded


for _attribute in _FORWARDED:
    setattr(Context, _attribute, _forward(_attribute))
del _attribute


def get_context(method: str | None = None) -> Context:
    """Like ``multiprocessing.get_context(method)``, with shmpool's Pool and
    queues: a ``multiprocessing.context.BaseContext`` for *method* (fork,
    spawn or forkserver; None: the default start method).

    Raises:
        ValueError: *method* is not a start method of this platform.
    """
    return Context(multiprocessing.get_context(method))
