"""``shmpool.Pool``: ``multiprocessing.Pool`` over the shared-memory store.

Same constructor, methods, results and exceptions as the standard library;
store options are keyword-only.  What differs, on purpose:

- arguments and results with buffers at or above ``threshold`` travel
  through the store; results arrive as zero-copy, copy-on-write views;
- a worker that dies fails its task with WorkerDiedError (a
  BrokenProcessPool) within moments, and the pool replaces it; the standard
  library waits forever;
- ``terminate()`` fails unfinished results instead of leaving them pending.

Results are set, and callbacks run, in the supervisor thread, as the
standard library runs them in its result-handler thread.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import multiprocessing.pool
import os
import threading
import traceback
import types
import warnings
import weakref
from dataclasses import dataclass
from multiprocessing import util

from ._errors import BrokenPoolError, SerializationError
from ._serialization import DEFAULT_THRESHOLD, ObjectStore
from ._store import StoreStatistics
from ._supervisor import Supervisor, worker_count
from ._protocol import APPLY, MAP, STARMAP, Shared

__all__ = ["Pool", "ApplyResult", "AsyncResult", "MapResult", "IMapIterator",
           "PoolStatistics"]

_job_ids = itertools.count()
#: Tasks a worker may hold: one running, one waiting in its socket.  The
#: waiting one starts as soon as the first is done, without a round trip
#: through the supervisor thread: 2,000 tasks of 200 us on 2 workers take
#: 0.27 s instead of 0.40 s (multiprocessing: 0.50 s).  A long task can delay
#: the one queued behind it, as in the standard library's shared task queue.
PIPELINE_DEPTH = 2
#: Tasks a worker may hold while many wait (``Supervisor``'s *burst*): one
#: write then carries a share of the queue, instead of one task per answer.
PIPELINE_BURST = 32
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"


@dataclass(frozen=True)
class PoolStatistics:
    """What a pool is doing and what it pins in shared memory."""

    store: StoreStatistics
    """The pool's store: bytes in use, live objects, fallbacks, ..."""
    worker_pids: tuple[int, ...]
    """The worker processes now running."""
    unfinished_results: int
    """Results not yet ready (each may hold its arguments in the store)."""
    held_by_process: dict
    """``{pid: (objects, bytes)}`` held in the store by each process: the
    parent (results it still references, arguments of running tasks) and
    each worker (what its running task reads)."""


#: Guards every result's list of waiters (held for a few instructions).
_waiters_lock = threading.Lock()


class ApplyResult:
    """The result of ``apply_async``; ``AsyncResult`` is the same class.

    ``get``/``wait`` block until the answer is set (in the supervisor
    thread, after the callback has run) or *timeout* seconds pass.  A
    result costs no lock until a thread waits for it unready: each waiting
    thread then parks on a lock of its own, released when the result is set.
    """

    def __init__(self, pool: "Pool", callback, error_callback) -> None:
        self._pool = pool
        self._ready = False
        self._waiters: list | None = None
        self._lock = threading.Lock()
        self._job = next(_job_ids)
        self._cache = pool._cache
        self._callback = callback
        self._error_callback = error_callback
        self._shared = None             # (store, ref) the call's tasks share
        self._cache[self._job] = self

    def ready(self) -> bool:
        return self._ready

    def successful(self) -> bool:
        if not self._ready:
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if self._ready:
            return
        waiter = threading.Lock()
        waiter.acquire()
        with _waiters_lock:
            if self._ready:
                return
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
        if timeout is None:
            waiter.acquire()
        elif timeout <= 0 or not waiter.acquire(True, timeout):
            with _waiters_lock:             # timed out: stop waiting for it
                if not self._ready:
                    self._waiters.remove(waiter)

    def get(self, timeout: float | None = None):
        self.wait(timeout)
        if not self._ready:
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, index: int, success: bool, value) -> None:
        self._success, self._value = success, value
        self._finish(success, value)

    def _finish(self, success: bool, value) -> None:
        try:
            callback = self._callback if success else self._error_callback
            if callback is not None:
                callback(value)
        except Exception:
            traceback.print_exc()        # a failing callback must not stop the pool
        finally:
            self._cache.pop(self._job, None)
            _drop_shared(self)
            self._mark_ready()
            self._pool = None

    def _mark_ready(self) -> None:
        with _waiters_lock:
            self._ready = True
            waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.release()

    __class_getitem__ = classmethod(types.GenericAlias)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: ready once every chunk
    has answered; the first failure is what ``get`` raises."""

    def __init__(self, pool, chunksize: int, length: int, callback, error_callback) -> None:
        super().__init__(pool, callback, error_callback=error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        if chunksize <= 0:
            self._number_left = 0
            self._mark_ready()
            self._cache.pop(self._job, None)
            self._pool = None
        else:
            self._number_left = length // chunksize + bool(length % chunksize)

    def _set(self, index: int, success: bool, value) -> None:
        with self._lock:
            self._number_left -= 1
            if success and self._success:
                start = index * self._chunksize
                self._value[start:start + self._chunksize] = value
            elif not success and self._success:
                self._success, self._value = False, value      # the first error
            done = self._number_left == 0
        if done:
            self._finish(self._success, self._value)


class IMapIterator:
    """The iterator of ``imap`` (in order) and ``imap_unordered``."""

    def __init__(self, pool: "Pool", *, ordered: bool = True) -> None:
        self._pool = pool
        self._cond = threading.Condition(threading.Lock())
        self._job = next(_job_ids)
        self._cache = pool._cache
        self._items: collections.deque = collections.deque()
        self._index = 0
        self._length: int | None = None
        self._unsorted: dict[int, tuple[bool, object]] = {}
        self._ordered = ordered
        self._shared = None
        self._cache[self._job] = self

    def __iter__(self):
        return self

    def next(self, timeout: float | None = None):
        with self._cond:
            if not self._items:
                if self._index == self._length:
                    self._pool = None
                    raise StopIteration from None
                self._cond.wait(timeout)
                if not self._items:
                    if self._index == self._length:
                        self._pool = None
                        raise StopIteration from None
                    raise multiprocessing.TimeoutError from None
            success, value = self._items.popleft()
        if success:
            return value
        raise value

    __next__ = next

    def _set(self, index: int, success: bool, value) -> None:
        with self._cond:
            if not self._ordered or index == self._index:
                self._items.append((success, value))
                self._index += 1
                while self._ordered and self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
                self._cond.notify()
            else:
                self._unsorted[index] = (success, value)
            if self._index == self._length:
                self._cache.pop(self._job, None)
                _drop_shared(self)
                self._pool = None

    def _set_length(self, length: int) -> None:
        with self._cond:
            self._length = length
            if self._index == length:
                self._cond.notify()
                self._cache.pop(self._job, None)
                _drop_shared(self)
                self._pool = None


def _drop_shared(result) -> None:
    """Release the function *result*'s tasks shared (its last task is
    answered, or none is left to run)."""
    shared, result._shared = result._shared, None
    if shared is not None:
        store, ref = shared
        store.release(ref)


def _weakly(method):
    """Call *method* while its object lives; afterwards do nothing.  The
    supervisor thread must not keep its pool alive (a dropped running pool
    warns and shuts down, as the standard library's does)."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        if bound is not None:
            bound(*args)
    return call


def _chunks(iterable, size: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _flatten(chunked):
    for chunk in chunked:
        yield from chunk


class Pool(multiprocessing.pool.Pool):
    """A process pool with the API of ``multiprocessing.Pool``.

    It is a ``multiprocessing.pool.Pool`` for ``isinstance`` (dask, for one,
    takes only those as pools), and keeps the two attributes libraries read:
    ``_processes`` (the worker count) and ``_pool`` (the worker ``Process``
    objects now running).  None of the standard library's machinery runs:
    its ``__init__`` is never called, and every public method is this
    class's own.

    Args:
        processes: worker count (default ``os.cpu_count()``, at most 127).
        initializer, initargs: run ``initializer(*initargs)`` in each worker.
        maxtasksperchild: tasks a worker runs before it is replaced.
        context: a multiprocessing context (or ``shmpool.get_context()``).
        capacity: bytes of shared memory the pool's store may use (default:
            the free space of /dev/shm, reserved only as used).
        threshold: buffers at or above this size go through the store.
        space_timeout: seconds to wait for store space before sending a
            value in-band instead.
        readonly: received values are sealed, read-only views instead of
            copy-on-write ones (see ``ObjectStore``).

    The pool owns its store; closing, terminating or garbage-collecting the
    pool at exit frees it.  Results already received stay readable.
    """

    def __init__(self, processes=None, initializer=None, initargs=(),
                 maxtasksperchild=None, context=None, *, capacity: int | None = None,
                 threshold: int = DEFAULT_THRESHOLD, space_timeout: float | None = None,
                 readonly: bool = False):
        self._state = "INIT"
        processes = worker_count(processes, "processes")
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
                not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        ctx = getattr(context, "multiprocessing_context", context) or multiprocessing.get_context()
        self._processes = processes
        self._cache: dict[int, object] = {}
        self._feeders = 0
        self._lock = threading.Lock()
        self._store = ObjectStore(capacity, threshold=threshold, space_timeout=space_timeout,
                                  readonly=readonly)
        try:
            self._supervisor = Supervisor(
                ctx, self._store, processes, initializer, initargs, maxtasksperchild,
                _weakly(self._on_answer), _weakly(self._on_failure), depth=PIPELINE_DEPTH,
                burst=PIPELINE_BURST)
        except BaseException:
            self._store.close()
            raise
        self._state = RUN
        self._finalizer = util.Finalize(self, Pool._shutdown,
                                        args=(self._supervisor, self._store), exitpriority=15)

    # -- submitting --------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _submit(self, result, index: int, task) -> None:
        try:
            message, held = self._store.encode_held(task)
        except SerializationError as exc:
            result._set(index, False, exc.__cause__ or exc)      # as the stdlib does
            return
        try:
            self._supervisor.submit(result._job, index, message, held)
        except BrokenPoolError as exc:
            if held is not None:
                self._store.release(held)
            result._set(index, False, exc)

    def _share(self, result, func):
        """*func* as every task of *result*'s call sends it: encoded now,
        once; if it needs the store (a ``partial`` over a big array, say),
        the tasks carry a 21-byte ``Shared`` message naming one store
        object, held by *result* until its last task is answered."""
        try:
            message, held = self._store.encode_held(func)
        except SerializationError:
            return func                  # each task reports it, as the stdlib does
        if held is None:
            return func                  # small: pickled with each task
        result._shared = (self._store, held)
        return Shared(message)

    def apply(self, func, args=(), kwds=None):
        """Call ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None):
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        self._submit(result, 0, (APPLY, func, tuple(args), dict(kwds or {})))
        return result

    def map(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, MAP, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, STARMAP, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, STARMAP, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, kind, chunksize=None, callback=None,
                   error_callback=None):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        result = MapResult(self, chunksize, len(iterable), callback, error_callback)
        if chunksize:
            func = self._share(result, func)
            for index, chunk in enumerate(_chunks(iterable, chunksize)):
                self._submit(result, index, (kind, func, chunk, {}))
        return result

    def imap(self, func, iterable, chunksize=1):
        """Like ``map``, lazily: results come in order as they are ready."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Like ``imap``, but results come in the order they finish."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func, iterable, chunksize, *, ordered):
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        result = IMapIterator(self, ordered=ordered)
        with self._lock:
            self._feeders += 1
        threading.Thread(target=self._feed, args=(result, func, iterable, chunksize),
                         name="shmpool-imap-feeder", daemon=True).start()
        return _flatten(result) if chunksize > 1 else result

    def _feed(self, result: IMapIterator, func, iterable, chunksize: int) -> None:
        # Like the standard library's task handler, consume the caller's
        # iterable lazily, in a thread of its own.
        count = 0
        try:
            func = self._share(result, func)
            for index, chunk in enumerate(_chunks(iterable, chunksize)):
                task = (APPLY, func, (chunk[0],), {}) if chunksize == 1 else (MAP, func, chunk, {})
                self._submit(result, index, task)
                count = index + 1
        except Exception as exc:            # the caller's iterable failed
            result._set(count, False, exc)
            count += 1
        finally:
            result._set_length(count)
            with self._lock:
                self._feeders -= 1
                close_now = self._feeders == 0 and self._state == CLOSE
            if close_now:
                self._supervisor.close()

    # -- answers (supervisor thread) ---------------------------------------

    def _on_answer(self, job: int, index: int, ok: bool, payload) -> None:
        result = self._cache.get(job)
        if result is None:
            self._store.discard(payload)         # its job already failed
            return
        try:
            value = self._store.decode(payload)
        except Exception as exc:
            result._set(index, False, exc)
            return
        result._set(index, ok, value)

    def _on_failure(self, job: int, index: int, exc: BaseException) -> None:
        result = self._cache.get(job)
        if result is not None:
            result._set(index, False, exc)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Take no new tasks; workers exit once the submitted ones are done."""
        with self._lock:
            if self._state != RUN:
                return
            self._state = CLOSE
            feeding = self._feeders
        if not feeding:
            self._supervisor.close()

    def terminate(self) -> None:
        """Stop the workers now; unfinished results fail with BrokenPoolError."""
        self._state = TERMINATE
        self._finalizer()

    def join(self) -> None:
        """Wait for the workers to exit, after ``close()`` or ``terminate()``."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._supervisor.join()
        self._finalizer()

    @staticmethod
    def _shutdown(supervisor: Supervisor, store: ObjectStore) -> None:
        supervisor.terminate()
        supervisor.join()
        store.close()

    @property
    def _pool(self) -> list:
        """The worker ``Process`` objects now running (a new list each time),
        as the standard library's Pool keeps them."""
        return list(self._supervisor.processes.values())

    def _repopulate_pool(self) -> None:
        """Workers are replaced by the supervisor as they exit; nothing to do."""

    def statistics(self) -> PoolStatistics:
        """The store's statistics, the workers, and the unfinished results."""
        return PoolStatistics(store=self._store.statistics(),
                              worker_pids=tuple(self._supervisor.pids),
                              unfinished_results=len(self._cache),
                              held_by_process=self._store.raw.usage_by_process())

    def __del__(self, _warn=warnings.warn):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return (f"<{type(self).__module__}.{type(self).__qualname__} "
                f"state={self._state} pool_size={self._processes}>")

    def __reduce__(self):
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled")
