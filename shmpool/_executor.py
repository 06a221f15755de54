"""``shmpool.ProcessPoolExecutor``: ``concurrent.futures`` over the store.

::

    submit(fn, *args) --encode--> Supervisor.submit --> idle worker (or the queue)
          |                         on_dispatch: future RUNNING, or withdrawn
          v                                         if it was cancelled
       Future <-- set_result / set_exception <-- supervisor thread <-- answer
                  (callbacks, as_completed,        (decode: zero-copy views)
                   wait, asyncio wake up)

The executor is a front end over the same ``Supervisor`` as ``shmpool.Pool``
(one mechanism for processes, deaths and tasks), configured the way
``concurrent.futures`` behaves:

- **Broken on the first death.**  A worker that dies (any signal,
  ``os._exit``, the OOM killer, a failing initializer) breaks the executor:
  every future not yet finished fails with WorkerDiedError (a
  ``BrokenProcessPool``), the other workers are terminated, what they held in
  the store is released, and ``submit`` raises the same error afterwards.
- **Cancellable until a worker takes it.**  A future stays PENDING while its
  task waits in the queue; the supervisor asks ``_Futures.on_dispatch``
  just before handing the task to a worker, which marks it RUNNING or, if
  it was cancelled, withdraws it and releases its arguments.
- **Workers on demand** outside fork (as the standard library does): a
  worker is started when a task finds none idle, up to ``max_workers``.
  Under fork all start with the executor.
- **Shutdown** finishes every submitted task (``cancel_futures=True``
  cancels those not yet running), stops the workers and frees the store.
  A dropped executor shuts down the same way without blocking anyone.  At
  interpreter exit every executor is shut down and waited for, ahead of the
  exit handlers registered before the first executor started (one of them
  that submits gets the standard library's RuntimeError).

Ownership: the executor owns its store.  Arguments are copied once into it
(buffers at or above ``threshold``) and held until the task's answer
arrives; results are copy-on-write views of it that stay valid after shutdown.
Futures are completed, and their callbacks run, in the supervisor thread.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import threading
import time
import weakref
from concurrent.futures import Executor, Future

from ._errors import BrokenPoolError, SerializationError, WorkerDiedError
from ._serialization import DEFAULT_THRESHOLD, ObjectStore
from ._supervisor import Supervisor, worker_count
from ._protocol import APPLY, STARMAP
from ._worker import Conventions

__all__ = ["ProcessPoolExecutor"]


class _Futures:
    """The executor's unfinished futures by job id, and what the supervisor
    thread does with their answers.  It holds no reference to the executor,
    so that a dropped executor can be collected while its tasks finish.

    Whoever removes a job from ``_by_job`` completes its future: exactly one
    of ``on_dispatch`` (withdrawn), ``on_answer`` or ``on_failure``.
    """

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._by_job: dict[int, Future] = {}
        self._ids = itertools.count()

    def add(self, future: Future) -> int:
        job = next(self._ids)
        self._by_job[job] = future
        return job

    def forget(self, job: int) -> None:
        self._by_job.pop(job, None)

    def cancel_pending(self) -> None:
        """Cancel every future whose task no worker has taken yet."""
        for future in list(self._by_job.values()):
            future.cancel()

    # -- called by the supervisor --------------------------------------------

    def on_dispatch(self, job: int, index: int) -> bool:
        future = self._by_job.get(job)
        if future is None:
            return False
        if future.set_running_or_notify_cancel():
            return True
        self._by_job.pop(job, None)           # cancelled: waiters are notified now
        return False

    def on_answer(self, job: int, index: int, ok: bool, payload) -> None:
        future = self._by_job.pop(job, None)
        if future is None:
            self._store.discard(payload)
            return
        try:
            value = self._store.decode(payload)
        except BaseException as exc:          # SystemExit in a __reduce__ as well
            error = BrokenPoolError(
                f"cannot unpickle the answer of the task in the parent process: "
                f"{exc!r}; the task ran, its answer is lost (check the result's "
                f"or exception's __reduce__)")
            error.__cause__ = exc
            future.set_exception(error)
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def on_failure(self, job: int, index: int, exc: BaseException) -> None:
        future = self._by_job.pop(job, None)
        if future is None:
            return
        # A task still queued is PENDING (or CANCELLED: notify its waiters).
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(exc)


class _StoreCloser:
    """Closes the executor's store once both its supervisor has stopped and
    its owner is done with it (shut down or dropped), in either order.

    Not before: a broken executor's supervisor stops while the caller may
    still be pickling a task into the store; that task must fail with the
    executor's error, not with a closed store.
    """

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._waiting_for = {"supervisor", "owner"}

    def supervisor_stopped(self) -> None:
        self._done("supervisor")

    def owner_finished(self) -> None:
        self._done("owner")

    def _done(self, who: str) -> None:
        with self._lock:
            self._waiting_for.discard(who)
            close = not self._waiting_for
        if close:
            self._store.close()          # idempotent


def _dropped(supervisor: Supervisor, closer: _StoreCloser) -> None:
    """A dropped executor: finish the submitted tasks, then free everything;
    called from the garbage collector, so it never blocks."""
    supervisor.close()
    closer.owner_finished()


def _default_context(max_tasks_per_child):
    if max_tasks_per_child is not None:
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context()


class ProcessPoolExecutor(Executor):
    """A ``concurrent.futures`` executor running calls in worker processes.

    Args:
        max_workers: worker processes at most (default ``os.cpu_count()``,
            at most 127).
        mp_context: a multiprocessing context (or ``shmpool.get_context()``);
            default: the default context, or spawn if *max_tasks_per_child*
            is given.
        initializer, initargs: run ``initializer(*initargs)`` in each worker
            as it starts; if it raises, the executor breaks.
        max_tasks_per_child: tasks a worker runs before it is replaced (not
            with the fork start method, as in the standard library).
        capacity: bytes of shared memory the executor's store may use
            (default: the free space of /dev/shm, reserved only as used).
        threshold: buffers at or above this size go through the store.
        space_timeout: seconds to wait for store space before sending a
            value in-band instead.
        readonly: received values are sealed, read-only views instead of
            copy-on-write ones (see ``ObjectStore``).

    Raises:
        ValueError: *max_workers* or *max_tasks_per_child* below 1, or
            *max_tasks_per_child* with a fork context.
        TypeError: *initializer* not callable, *max_tasks_per_child* not an int.
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(),
                 *, max_tasks_per_child=None, capacity: int | None = None,
                 threshold: int = DEFAULT_THRESHOLD, space_timeout: float | None = None,
                 readonly: bool = False):
        self._shutdown = True                  # until fully built
        max_workers = worker_count(max_workers, "max_workers")
        if max_workers <= 0:
            raise ValueError(f"max_workers must be greater than 0, got {max_workers}")
        mp_context = getattr(mp_context, "multiprocessing_context", mp_context)
        if mp_context is None:
            mp_context = _default_context(max_tasks_per_child)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {initializer!r}")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError(f"max_tasks_per_child must be an integer, "
                                f"got {type(max_tasks_per_child).__name__}")
            if max_tasks_per_child <= 0:
                raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
            if mp_context.get_start_method(allow_none=False) == "fork":
                raise ValueError(
                    "max_tasks_per_child is incompatible with the 'fork' multiprocessing "
                    "start method; supply a different mp_context.")
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._store = ObjectStore(capacity, threshold=threshold, space_timeout=space_timeout,
                                  readonly=readonly)
        self._futures = _Futures(self._store)
        self._closer = _StoreCloser(self._store)
        try:
            # Under fork, start every worker now, before the caller starts
            # threads that a later fork would copy mid-flight.
            self._supervisor = Supervisor(
                mp_context, self._store, max_workers, initializer, tuple(initargs),
                max_tasks_per_child, self._futures.on_answer, self._futures.on_failure,
                break_on_death=True,
                start_on_demand=mp_context.get_start_method(allow_none=False) != "fork",
                on_dispatch=self._futures.on_dispatch, on_stop=self._closer.supervisor_stopped,
                conventions=Conventions.FUTURES)
        except BaseException:
            self._store.close()
            raise
        self._shutdown = False
        weakref.finalize(self, _dropped, self._supervisor, self._closer)
        _exit_handler.watch(self._supervisor)

    # -- submitting --------------------------------------------------------

    def _check_open(self) -> None:
        broken = self._supervisor.broken
        if broken is not None:
            raise WorkerDiedError(broken.pid, broken.exitcode, replaced=False)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exit_handler.exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _submit(self, task) -> Future:
        self._check_open()
        future = Future()
        try:
            message, held = self._store.encode_held(task)
        except SerializationError as exc:
            future.set_exception(exc.__cause__ or exc)     # as the stdlib does
            return future
        except BaseException:
            self._check_open()        # shut down meanwhile: say so
            raise
        job = self._futures.add(future)
        try:
            self._supervisor.submit(job, 0, message, held)
        except BaseException:
            self._futures.forget(job)
            if held is not None:
                self._store.release(held)
            self._check_open()        # broken or shut down meanwhile: say which
            raise
        return future

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Schedule ``fn(*args, **kwargs)``; return its Future at once.

        Pickling happens here, in the calling thread: arguments with big
        buffers are copied once into the store (waiting up to
        ``space_timeout`` for space, then sent in-band) and held there until
        the task ends.  This never waits for a worker: the task goes to an
        idle one, or waits in the queue (cancellable) until one is free.  A
        call that cannot be pickled returns a future failed with the
        pickling error.  The result is a copy-on-write view of the store when
        its buffers are at or above ``threshold``.

        Raises:
            BrokenProcessPool (BrokenPoolError): a worker died earlier.
            RuntimeError: after ``shutdown`` or interpreter exit.
        """
        return self._submit((APPLY, fn, args, kwargs))

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like ``map(fn, *iterables)``, the calls running in the workers.

        Every call is submitted before this returns (the iterables are
        consumed at once); the iterator yields results in order, each
        waiting at most until *timeout* seconds after this call.  With
        *chunksize* > 1 the calls go to the workers in chunks of that many.

        Raises:
            TimeoutError: from the iterator, once *timeout* has passed; the
                calls not yet running are cancelled.
            ValueError: *chunksize* below 1.
            Exception: the first call's exception, from the iterator.
        """
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        end = None if timeout is None else timeout + time.monotonic()
        calls = zip(*iterables)
        if chunksize == 1:
            futures = [self._submit((APPLY, fn, args, {})) for args in calls]
        else:
            futures = [self._submit((STARMAP, fn, chunk, {}))
                       for chunk in iter(lambda: list(itertools.islice(calls, chunksize)), [])]
        return _results(futures, end, chunked=chunksize > 1)

    # -- lifecycle ---------------------------------------------------------

    def shutdown(self, wait=True, *, cancel_futures=False) -> None:
        """Take no new tasks; finish the submitted ones, then stop the workers.

        With *cancel_futures*, the futures no worker has taken yet are
        cancelled first.  With *wait*, block until every worker has exited
        and the store is freed (a task that never ends blocks this forever,
        as in the standard library); otherwise that happens in the
        background.  Results already received stay readable.  Idempotent.
        """
        self._shutdown = True
        if cancel_futures:
            self._futures.cancel_pending()
        self._supervisor.close()
        if wait and threading.current_thread() is not self._supervisor.thread:
            self._supervisor.join()
        self._closer.owner_finished()     # the store goes once the workers have

    # The standard library's attribute names, for code (CPython's own tests
    # among it) that reads them.

    @property
    def _processes(self) -> dict:
        """``{pid: multiprocessing.Process}`` of the running workers (a snapshot)."""
        return self._supervisor.processes

    @property
    def _broken(self):
        """False, or the message of the death that broke the executor."""
        broken = self._supervisor.broken
        return False if broken is None else str(broken)

    def __repr__(self) -> str:
        state = ("broken" if self._supervisor.broken is not None
                 else "shut down" if self._shutdown else "running")
        return (f"<{type(self).__module__}.{type(self).__qualname__} {state} "
                f"max_workers={self._max_workers}>")

    def __reduce__(self):
        raise TypeError("executor objects cannot be passed between processes or pickled")


def _result_or_cancel(future: Future, end: float | None):
    try:
        return future.result(None if end is None else end - time.monotonic())
    finally:
        future.cancel()                   # a no-op unless it failed to arrive in time


def _results(futures: list, end: float | None, *, chunked: bool):
    """Yield the results of *futures* in order; references to a result are
    dropped as soon as it is yielded.  Closed early, cancel the rest."""
    futures.reverse()
    try:
        while futures:
            if not chunked:
                yield _result_or_cancel(futures.pop(), end)
                continue
            chunk = _result_or_cancel(futures.pop(), end)
            chunk.reverse()
            while chunk:
                yield chunk.pop()
    finally:
        for future in futures:
            future.cancel()


class _ExitHandler:
    """At interpreter exit, shut every executor down and wait for it, as the
    standard library does.  Registered with ``atexit`` when the first
    executor starts, so it runs before the exit handlers registered earlier
    (a handler that submits then gets the standard library's RuntimeError)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._supervisors: weakref.WeakSet = weakref.WeakSet()
        self._registered = False
        self.exiting = False

    def watch(self, supervisor: Supervisor) -> None:
        with self._lock:
            self._supervisors.add(supervisor)
            if not self._registered:
                self._registered = True
                atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        self.exiting = True
        with self._lock:
            supervisors = list(self._supervisors)
        for supervisor in supervisors:
            supervisor.close()
        for supervisor in supervisors:
            supervisor.join()


_exit_handler = _ExitHandler()
