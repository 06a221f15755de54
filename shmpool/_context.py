"""``shmpool.get_context``: a multiprocessing context whose Pool and queues are shmpool's.

Everything else (Process, Event, Lock, Manager, ...) is the wrapped
multiprocessing context's own.  The context is never made global: shmpool
never calls ``multiprocessing.set_start_method``.
"""

from __future__ import annotations

import multiprocessing

from ._pool import Pool
from ._queue import JoinableQueue, Queue, SimpleQueue

__all__ = ["Context", "get_context"]


class Context:
    """A multiprocessing context, except that ``Pool`` and the queues are
    shmpool's."""

    def __init__(self, multiprocessing_context) -> None:
        self.multiprocessing_context = multiprocessing_context

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

    def get_start_method(self, allow_none: bool = False) -> str:
        return self.multiprocessing_context.get_start_method(allow_none)

    def __getattr__(self, name: str):
        return getattr(self.multiprocessing_context, name)

    def __repr__(self) -> str:
        return f"<shmpool context {self.get_start_method()!r}>"


def get_context(method: str | None = None) -> Context:
    """Like ``multiprocessing.get_context(method)``, with shmpool's Pool."""
    return Context(multiprocessing.get_context(method))
