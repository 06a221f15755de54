"""``Queue``, ``JoinableQueue`` and ``SimpleQueue`` over the store.

Same constructors, methods and exceptions as ``multiprocessing``'s queues;
store options are keyword-only.  A queue is a ``RecordPipe`` (records of at
most 4 KiB, written and read whole without locks) plus a store of its own:

- ``put`` pickles the value *at once*, in the calling thread.  A value
  whose pickle fits in a record travels in it; anything bigger goes into
  the queue's store and the record names it (21 bytes).  (The standard
  library pickles later, in a feeder thread, so changing an object after
  ``put`` can change what arrives; here the value put is the value got.)
- The record is written by the putting thread when the pipe has room and
  nothing of this process is waiting before it; otherwise by a feeder
  thread, in put order, as the standard library does for every item.
- ``get`` reads one record; a value from the store comes back as zero-copy,
  copy-on-write views (numpy arrays, Arrow buffers, ...) for buffers at or
  above ``threshold``, smaller ones as private copies.

Who holds an item in the store:

==================  ===============================================
put() .. written    the putting process (a hold: reaped if it dies)
in the pipe         the record (a retained count, added just before
                    the write, taken over by the reader)
got                 the getting process's views (reaped if it dies)
==================  ===============================================

A process killed mid-``put`` leaves at most an unsealed object, which is
aborted when its death is noticed, never a visible half-written one.  Two
windows of a few instructions remain (between adding the count and the
write, and between the read and taking it over): a process killed exactly
there leaves that item's memory to be freed with the store.

The store belongs to the process that created the queue: its name is
removed when that process exits or dies, and its memory, including items
put and never got, is freed when the last process using the queue drops
it.  Dead processes' holds are reaped when the store runs short of space.
"""

from __future__ import annotations

import collections
import errno
import multiprocessing
import threading
import traceback
import types
import weakref
from multiprocessing import context as mp_context
from multiprocessing import util
from queue import Empty, Full

import _multiprocessing

from ._errors import SerializationError
from ._records import RECORD_SIZE, RecordPipe
from ._serialization import DEFAULT_THRESHOLD, ObjectStore
from ._store import StoreStatistics

__all__ = ["Queue", "JoinableQueue", "SimpleQueue"]


def _multiprocessing_context(ctx):
    """A multiprocessing context from None, a multiprocessing context or a
    shmpool context."""
    ctx = getattr(ctx, "multiprocessing_context", ctx)
    return ctx if ctx is not None else multiprocessing.get_context()


class _Channel:
    """What every queue kind shares: the pipe, the store, and turning values
    into records and back."""

    def __init__(self, capacity, threshold, space_timeout, readonly) -> None:
        self._pipe = RecordPipe()
        self._store = ObjectStore(capacity, threshold=threshold, space_timeout=space_timeout,
                                  readonly=readonly)
        self._closed = False

    def _encode(self, obj):
        """``(message, held ref or None)`` for *obj*; see the module
        docstring.  Raises SerializationError or StoreFullError."""
        return self._store.encode_bounded(obj, RECORD_SIZE)

    def _receive(self, block: bool, timeout: float | None) -> bytes:
        """The next record; ``queue.Empty`` if none came in time."""
        record = self._pipe.read(None if block and timeout is None else
                                 (timeout if block else 0))
        if record is None:
            raise Empty
        return record

    def _decode(self, record: bytes):
        return self._store.decode(record)

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def statistics(self) -> StoreStatistics:
        """The queue's store: bytes and items in it now, peak, fallbacks."""
        return self._store.statistics()

    __class_getitem__ = classmethod(types.GenericAlias)


class _Sender:
    """One process's writing side of a queue.

    Records leave in put order: the putting thread writes its record itself
    when nothing of this process is waiting and the pipe has room; else the
    record joins a buffer that a feeder thread (started on first need)
    writes out, waiting for room as long as it takes.  The feeder holds no
    reference to the queue, so a dropped queue can be collected; ``close``
    lets it flush the buffer, then closes the writing end and detaches this
    process from the store (views already got stay readable).
    """

    def __init__(self, pipe: RecordPipe, store: ObjectStore) -> None:
        self._pipe = pipe
        self._store = store
        self._cond = threading.Condition(threading.Lock())
        self._buffer: collections.deque = collections.deque()
        self._busy = False             # the feeder is writing a record it took
        self._closing = False
        self.used = False              # this process has sent something
        self.thread: threading.Thread | None = None

    def send(self, message: bytes, held) -> None:
        """Send *message*; *held* (an owning ref or None) is kept until the
        record is in the pipe.  Never blocks on a full pipe."""
        self.used = True
        with self._cond:
            # A record naming a store object gets a count before the write;
            # look for room first rather than add a count only to take it back.
            if not self._buffer and not self._busy and (held is None or self._pipe.writable()):
                try:
                    if self.write(message, held, 0):
                        return
                except OSError as exc:      # no reader left: as the feeder would
                    self._report(exc)
                    return
            self._buffer.append((message, held))
            if self.thread is None:
                self.thread = threading.Thread(target=self._feed, name="shmpool-queue-feeder",
                                               daemon=True)
                self.thread.start()
            self._cond.notify()

    def write(self, message: bytes, held, timeout: float | None) -> bool:
        """Write *message* now, waiting up to *timeout* seconds for room
        (None: as long as it takes).  Once written, or on an error, *held* is
        released; if there was no room, False and the caller keeps it."""
        record = self._store.hand_over(message)
        try:
            written = self._pipe.write(record, timeout)
        except BaseException:
            self._take_back(record, message)
            self._release(held)
            raise
        if not written:
            self._take_back(record, message)
            return False
        self._release(held)
        return True

    def _take_back(self, record: bytes, message: bytes) -> None:
        """Drop the count ``hand_over`` added for a record never written."""
        if record is not message:
            self._store.discard(record)

    def _release(self, held) -> None:
        if held is not None:
            self._store.release(held)

    def _feed(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    break
                message, held = self._buffer.popleft()
                self._busy = True
            try:
                self.write(message, held, None)
            except Exception as exc:
                self._report(exc)
            finally:
                with self._cond:
                    self._busy = False
        self._finish()

    def _report(self, exc: Exception) -> None:
        """A record could not be written: print the error, as the standard
        library's feeder does, unless it is a closed pipe at shutdown."""
        broken_pipe = getattr(exc, "errno", None) == errno.EPIPE
        if not (broken_pipe and self._closing) and not util.is_exiting():
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    def close(self) -> None:
        """Let the feeder flush the buffer and finish; without a feeder,
        finish now.  Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
            if self.thread is not None:
                return
        self._finish()

    def _finish(self) -> None:
        self._pipe.close_writer()
        self._store.close()


def _join_thread(thread_ref: "weakref.ref[threading.Thread]") -> None:
    thread = thread_ref()
    if thread is not None:
        thread.join()


class Queue(_Channel):
    """A process-safe FIFO queue with the API of ``multiprocessing.Queue``.

    Args:
        maxsize: ``put`` blocks (or raises ``queue.Full``) while this many
            items are in the queue; 0 or less: no bound.
        ctx: a multiprocessing (or shmpool) context; its start method does
            not matter to the queue itself, only its semaphores come from it.
        capacity: bytes of shared memory the queue's store may use (default:
            the free space of /dev/shm, reserved only as used).
        threshold: buffers at or above this size arrive as copy-on-write
            views of shared memory; smaller ones as copies.
        space_timeout: seconds ``put`` waits for store space (a consumer
            that is behind) before it raises StoreFullError.
        readonly: items got are sealed, read-only views instead of
            copy-on-write ones (see ``ObjectStore``).

    Pass a queue to other processes as a ``Process`` argument or in Pool
    ``initargs`` (or let fork children inherit it), as with the standard
    library.  ``put`` raises ValueError after ``close()``, like ``get``.
    """

    def __init__(self, maxsize: int = 0, *, ctx=None, capacity: int | None = None,
                 threshold: int = DEFAULT_THRESHOLD, space_timeout: float | None = None,
                 readonly: bool = False):
        ctx = _multiprocessing_context(ctx)
        if maxsize <= 0:
            maxsize = _multiprocessing.SemLock.SEM_VALUE_MAX
        super().__init__(capacity, threshold, space_timeout, readonly)
        self._maxsize = maxsize
        self._sem = ctx.BoundedSemaphore(maxsize)
        self._reset()
        util.register_after_fork(self, Queue._reset)

    def _reset(self) -> None:
        """This process's side: no buffered records, no feeder yet."""
        self._closed = False
        self._joincancelled = False
        self._sender = _Sender(self._pipe, self._store)
        self._close_sender = util.Finalize(self, _Sender.close, args=(self._sender,),
                                           exitpriority=10)
        self._join_sender = None

    def __getstate__(self):
        mp_context.assert_spawning(self)
        return (self._maxsize, self._pipe, self._store, self._sem)

    def __setstate__(self, state) -> None:
        self._maxsize, self._pipe, self._store, self._sem = state
        self._reset()
        util.register_after_fork(self, Queue._reset)

    # -- putting -----------------------------------------------------------

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        """Put *obj* in the queue, pickled now.  Blocks while the queue holds
        ``maxsize`` items (up to *timeout* seconds, then ``queue.Full``).
        A value that cannot be pickled is reported through
        ``_on_queue_feeder_error`` and not put, as with the standard library."""
        self._check_closed()
        if not self._sem.acquire(block, timeout):
            raise Full
        try:
            message, held = self._encode(obj)
        except SerializationError as exc:
            self._sem.release()
            self._on_queue_feeder_error(exc.__cause__ or exc, obj)
            return
        except BaseException:
            self._sem.release()
            raise
        self._enqueue(message, held)

    def _enqueue(self, message: bytes, held) -> None:
        self._sender.send(message, held)
        if self._join_sender is None and self._sender.thread is not None:
            self._start_joining()

    def _start_joining(self) -> None:
        # Like the standard library: at exit, wait for the feeder to flush,
        # unless cancel_join_thread() said not to.
        if not self._joincancelled:
            thread = self._sender.thread
            self._join_sender = util.Finalize(thread, _join_thread,
                                              args=(weakref.ref(thread),), exitpriority=-5)

    def put_nowait(self, obj) -> None:
        return self.put(obj, False)

    @staticmethod
    def _on_queue_feeder_error(e, obj) -> None:
        """Called with the exception and the value when a value cannot be
        sent; prints the traceback.  Subclasses may override it."""
        traceback.print_exception(type(e), e, e.__traceback__)

    # -- getting -----------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None):
        """Remove and return the oldest item.  Blocks until one comes (up to
        *timeout* seconds, then ``queue.Empty``)."""
        self._check_closed()
        record = self._receive(block, timeout)
        self._sem.release()
        return self._decode(record)

    def get_nowait(self):
        return self.get(False)

    def qsize(self) -> int:
        """Items put and not yet got (approximate while others put/get)."""
        return self._maxsize - self._sem.get_value()

    def empty(self) -> bool:
        """True if no record is waiting in the pipe now (items still
        buffered in a putting process do not count, as in the standard
        library)."""
        return not self._pipe.readable()

    def full(self) -> bool:
        return self._sem.get_value() == 0

    # -- closing -----------------------------------------------------------

    def close(self) -> None:
        """This process will put and get no more: buffered items are still
        written (by the feeder), then its writing end closes.  As in the
        standard library, the reading end closes only if this process has
        put something (``empty()`` then raises OSError); it closes anyway
        when the queue is dropped."""
        if self._closed:
            return
        self._closed = True
        if self._sender.used:
            self._pipe.close_reader()
        self._close_sender()

    def join_thread(self) -> None:
        """Wait for the feeder to write everything out; after ``close``."""
        assert self._closed, f"Queue {self!r} not closed"
        if self._join_sender is not None:
            self._join_sender()

    def cancel_join_thread(self) -> None:
        """Do not wait for the feeder at exit (buffered items may be lost)."""
        self._joincancelled = True
        if self._join_sender is not None:
            self._join_sender.cancel()


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: a Queue with ``task_done``/``join``."""

    def __init__(self, maxsize: int = 0, *, ctx=None, **store_options):
        ctx = _multiprocessing_context(ctx)
        super().__init__(maxsize, ctx=ctx, **store_options)
        self._unfinished_tasks = ctx.Semaphore(0)
        self._cond = ctx.Condition()

    def __getstate__(self):
        return Queue.__getstate__(self) + (self._cond, self._unfinished_tasks)

    def __setstate__(self, state) -> None:
        Queue.__setstate__(self, state[:-2])
        self._cond, self._unfinished_tasks = state[-2:]

    def _enqueue(self, message: bytes, held) -> None:
        with self._cond:
            self._unfinished_tasks.release()
            super()._enqueue(message, held)

    def task_done(self) -> None:
        """Tell the queue one item got earlier is processed."""
        with self._cond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError("task_done() called too many times")
            if self._unfinished_tasks.get_value() == 0:
                self._cond.notify_all()

    def join(self) -> None:
        """Block until every item put has been got and ``task_done``."""
        with self._cond:
            if self._unfinished_tasks.get_value() != 0:
                self._cond.wait()


# Libraries that build their own pools on a context call the stdlib
# SimpleQueue's private ends (CPython 3.10 to 3.13 alike):
#
# - concurrent.futures.process: the manager thread waits on
#   ``result_queue._reader`` with ``multiprocessing.connection.wait`` (so
#   ``fileno``) and takes results with ``_reader.recv()``, the unpickled
#   object;
# - multiprocessing.pool: ``_quick_put = inqueue._writer.send``,
#   ``_quick_get = outqueue._reader.recv``; it waits on ``_reader`` as
#   above, ``poll()``s it before draining, a worker ``close()``s its
#   ``inqueue._writer`` and ``outqueue._reader``, and ``terminate``
#   acquires ``inqueue._rlock`` to drain the task queue.
#
# Neither calls ``send_bytes``/``recv_bytes`` on them.  shmpool's
# SimpleQueue therefore carries ends that do exactly those calls over its
# own pipe and store, rather than the context handing these libraries the
# stdlib's SimpleQueue: that way they behave as with the standard library
# and also get the store's zero-copy path for big tasks and results.

class _End:
    """What both ends share: a clear error for a call they do not offer."""

    __slots__ = ()
    _WHICH = _OFFERS = _INSTEAD = ""

    def __getattr__(self, name: str):
        raise AttributeError(
            f"the {self._WHICH} end of a shmpool.SimpleQueue has no {name!r}: it offers "
            f"{self._OFFERS}, the calls multiprocessing.pool and concurrent.futures make; "
            f"use the queue's {self._INSTEAD} otherwise")


class _ReadingEnd(_End):
    """A SimpleQueue's ``_reader``: the calls the standard library makes on
    its SimpleQueue's reading ``Connection``, with the same results.
    ``recv`` is the queue's ``get``."""

    __slots__ = ("_pipe", "_store")
    _WHICH, _OFFERS, _INSTEAD = "reading", "recv, poll, fileno, close and closed", "get() and empty()"

    def __init__(self, pipe: RecordPipe, store: ObjectStore) -> None:
        self._pipe = pipe
        self._store = store

    def recv(self):
        """The next item, unpickled; blocks until there is one.  EOFError
        once every writer has closed, OSError after ``close``."""
        return self._store.decode(self._pipe.read(None))

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether ``recv`` would return (or raise EOFError) at once,
        waiting up to *timeout* seconds (None: as long as it takes)."""
        return self._pipe.poll(timeout)

    def fileno(self) -> int:
        return self._pipe.fileno()

    def close(self) -> None:
        """Close this process's reading end only."""
        self._pipe.close_reader()

    @property
    def closed(self) -> bool:
        return self._pipe.reader_closed


class _WritingEnd(_End):
    """A SimpleQueue's ``_writer``: ``send`` is the queue's ``put``."""

    __slots__ = ("_pipe", "_store", "_sender")
    _WHICH, _OFFERS, _INSTEAD = "writing", "send, close and closed", "put()"

    def __init__(self, pipe: RecordPipe, store: ObjectStore, sender: _Sender) -> None:
        self._pipe = pipe
        self._store = store
        self._sender = sender

    def send(self, obj) -> None:
        """Put *obj*, pickled now; blocks while the pipe is full.  Raises
        what pickling *obj* raised, as ``Connection.send`` does (callers
        such as ``multiprocessing.pool`` catch that), OSError after
        ``close``."""
        try:
            message, held = self._store.encode_bounded(obj, RECORD_SIZE)
        except SerializationError as exc:
            if exc.__cause__ is None:
                raise
            raise exc.__cause__ from None
        self._sender.write(message, held, None)

    def close(self) -> None:
        """Close this process's writing end only (the store stays attached:
        this process may still read)."""
        self._pipe.close_writer()

    @property
    def closed(self) -> bool:
        return self._pipe.writer_closed


class _NoLock:
    """Stands for the stdlib SimpleQueue's reader lock, which
    ``multiprocessing.pool``'s ``terminate`` acquires (and never releases)
    to drain the task queue without its workers.  shmpool's readers take no
    lock (records are read whole), so workers may go on reading while the
    pool drains: that drains the queue too."""

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc) -> None:
        pass


class SimpleQueue(_Channel):
    """``multiprocessing.SimpleQueue``: no size, no feeder thread; ``put``
    writes the record itself and blocks while the pipe is full.

    Store options as for ``Queue``.  ``_reader``, ``_writer`` and ``_rlock``
    do what ``multiprocessing.pool`` and ``concurrent.futures`` call on the
    standard library's (see above), so a ``multiprocessing.pool.Pool`` or
    ``concurrent.futures.ProcessPoolExecutor`` built on ``shmpool.get_context()``
    moves its tasks and results through the store.
    """

    _rlock = _NoLock()

    def __init__(self, *, ctx=None, capacity: int | None = None,
                 threshold: int = DEFAULT_THRESHOLD, space_timeout: float | None = None,
                 readonly: bool = False):
        super().__init__(capacity, threshold, space_timeout, readonly)
        self._reset()
        util.register_after_fork(self, SimpleQueue._reset)

    def _reset(self) -> None:
        self._closed = False
        self._sender = _Sender(self._pipe, self._store)   # never starts a feeder
        self._close_sender = util.Finalize(self, _Sender.close, args=(self._sender,),
                                           exitpriority=10)
        self._reader = _ReadingEnd(self._pipe, self._store)
        self._writer = _WritingEnd(self._pipe, self._store, self._sender)

    def __getstate__(self):
        mp_context.assert_spawning(self)
        return (self._pipe, self._store)

    def __setstate__(self, state) -> None:
        self._pipe, self._store = state
        self._reset()
        util.register_after_fork(self, SimpleQueue._reset)

    def put(self, obj) -> None:
        """Put *obj*, pickled now; blocks while the pipe is full.  A value
        that cannot be pickled raises what pickling raised, as with the
        standard library."""
        self._writer.send(obj)

    def get(self):
        """Remove and return the oldest item; blocks until there is one."""
        return self._reader.recv()

    def empty(self) -> bool:
        return not self._pipe.readable()

    def close(self) -> None:
        """Close this process's ends of the pipe and detach it from the
        store (views already got stay readable).  Idempotent."""
        self._closed = True
        self._pipe.close_reader()
        self._close_sender()

