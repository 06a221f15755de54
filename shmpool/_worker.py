"""The worker process: run tasks from one socket, answer on the same socket.

A worker owns one end of a stream socket to its supervisor and speaks the
protocol of ``_protocol``: it receives Task, ACK and STOP, and sends one
Answer per task, in order.

Both sides *hold* what they send until the other side has its own hold:
the supervisor holds a task's arguments until the answer arrives; a worker
holds each answer that went through the store until the supervisor's ACK.
So a process that dies leaves no count behind that nobody owns: reaping
its holds frees everything it sent and nobody received.  A worker exits
after *maxtasks* tasks; the supervisor counts them too, and sends it no
more.  No threads run here.

**A worker never outlives its parent.**  Every wait (for a task, for room
to send an answer) also watches the parent's sentinel, and the socket
reports end-of-file once the parent's end is closed everywhere: under
fork, each child closes its inherited copies of every supervisor's ends
(``_protocol.own_parent_end``), so only the parent holds them.  Where the thread
that started the worker lives as long as the parent (the main thread, or
a supervisor thread), the worker also asks the kernel to SIGKILL it when
that thread dies (``PR_SET_PDEATHSIG``), which ends even a task that
never returns.

Failures follow the rules of the front end the worker serves
(``Conventions``): ``multiprocessing.pool``'s for the Pool,
``concurrent.futures``' for the executor.  They differ in what a task may
raise and still be answered, in how an answer that cannot be pickled is
reported, and in what a failing initializer does (see ``Conventions``).
"""

from __future__ import annotations

import collections
import enum
import logging
import multiprocessing
import os
import select
# concurrent.futures' own carrier: its futures' exceptions must have that
# module's _RemoteTraceback as __cause__, as the standard library's do.
from concurrent.futures.process import _ExceptionWithTraceback
from itertools import starmap
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

from . import _posix
from ._default_store import use_store
from ._errors import BrokenPoolError, SerializationError
from ._protocol import ACK, APPLY, MAP, STOP, Answer, FrameReader, FrameWriter, Shared, Task
from ._serialization import ObjectStore

__all__ = ["Conventions", "run_worker"]



class Conventions(enum.Enum):
    """Whose rules a worker's failures follow: a drop-in must fail the way
    the class it replaces fails.

    ``POOL`` (``multiprocessing.pool``): a task's ``Exception`` is its
    answer, with the worker's traceback as a ``RemoteTraceback`` cause; a
    ``BaseException`` (SystemExit, ...) ends the worker.  An answer that
    cannot be pickled becomes ``MaybeEncodingError``.  A failing
    initializer ends the worker with its traceback on stderr.

    ``FUTURES`` (``concurrent.futures``): any ``BaseException`` of a task is
    its answer, with ``concurrent.futures``' own remote-traceback cause.  An
    answer that cannot be pickled is answered by the pickling error itself.
    A task that cannot be unpickled fails with BrokenPoolError (the standard
    library's worker dies there; this one says why and goes on).  A failing
    initializer is logged on the ``concurrent.futures`` logger and ends the
    worker with exit code 1, which breaks the executor.
    """

    POOL = "multiprocessing.pool"
    FUTURES = "concurrent.futures"

    def wrap(self, exc: BaseException):
        """*exc* as an answer: it carries its traceback across the socket."""
        if self is Conventions.POOL:
            return ExceptionWithTraceback(exc, exc.__traceback__)
        return _ExceptionWithTraceback(exc, exc.__traceback__)

    @property
    def answered(self) -> type[BaseException]:
        """What a task may raise and still be answered."""
        return Exception if self is Conventions.POOL else BaseException


def _call(kind: int, func, args, kwds):
    if kind == APPLY:
        return func(*args, **kwds)
    if kind == MAP:
        return list(map(func, args))
    return list(starmap(func, args))


def _encode_answer(store: ObjectStore, job: int, index: int, ok: bool, value,
                   conventions: Conventions) -> tuple[Answer, object]:
    """The answer, and the owning ref the worker keeps until ACK."""
    if conventions is Conventions.POOL:
        try:
            payload, held = store.encode_held(value)
        except SerializationError as exc:
            # The stdlib reports an unpicklable result or exception this way.
            ok = False
            payload, held = store.encode_held(MaybeEncodingError(exc.__cause__ or exc, value))
        return Answer(job, index, ok, payload), held
    try:
        payload, held = store.encode_held(value)
    except BaseException as exc:       # SystemExit in a __reduce__ is an answer too
        error = exc.__cause__ if isinstance(exc, SerializationError) and exc.__cause__ else exc
        ok = False
        try:
            payload, held = store.encode_held(conventions.wrap(error))
        except BaseException:          # the error itself does not pickle either
            payload, held = store.encode_held(conventions.wrap(SerializationError(
                f"cannot pickle the answer of the task, nor the error {error!r} "
                f"raised while pickling it")))
    return Answer(job, index, ok, payload), held


def _run_initializer(initializer, initargs, conventions: Conventions) -> None:
    if conventions is Conventions.POOL:
        initializer(*initargs)
        return
    try:
        initializer(*initargs)
    except BaseException:
        logging.getLogger("concurrent.futures").critical(
            "Exception in initializer of worker process %d:", os.getpid(), exc_info=True)
        raise SystemExit(1) from None


class _Channel:
    """The worker's end of its socket, every wait watching the parent too.

    ``receive`` and ``send`` block until they are done or the parent is
    gone (its sentinel fires, or the socket reports end-of-file); there is
    no other bound.  While a send waits for room, what the supervisor sends
    is read and kept, so neither side waits for the other.  One poll object
    serves every wait (a selector per message, as
    ``multiprocessing.connection.wait`` builds, cost more than a small task).
    """

    def __init__(self, fd: int, parent_sentinel: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._sentinel = parent_sentinel
        self._reader = FrameReader(fd)
        self._writer = FrameWriter(fd)
        self._inbox: collections.deque = collections.deque()
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._poller.register(parent_sentinel, select.POLLIN)

    def parent_gone(self) -> bool:
        """True if the parent's sentinel has fired (does not wait)."""
        return self._wait(select.POLLIN, 0) is None

    def receive(self):
        """The next message, or None once the parent is gone."""
        while not self._inbox:
            if self._reader.eof or self._wait(select.POLLIN) is None:
                return None
            self._inbox.extend(self._reader.read())
        return self._inbox.popleft()

    def send(self, message) -> bool:
        """Send *message*; False if the parent is gone first."""
        self._writer.append(message)
        try:
            while not self._writer.flush():
                events = self._wait(select.POLLIN | select.POLLOUT)
                if events is None:
                    return False
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._inbox.extend(self._reader.read())
                    if self._reader.eof:
                        return False
        except OSError:                 # EPIPE: the parent's end is closed
            return False
        return True

    def _wait(self, events: int, timeout: int | None = None) -> int | None:
        """The events of the socket once one of *events* (or a hang-up)
        is there; None if the parent's sentinel fired."""
        self._poller.modify(self._fd, events)
        ready = dict(self._poller.poll(timeout))
        if self._sentinel in ready:
            return None
        return ready.get(self._fd, 0)


def _decode_task(store: ObjectStore, task: Task, conventions: Conventions):
    """``(call, func, args, kwds)`` of *task*."""
    if conventions is Conventions.POOL:
        return store.decode(task.payload)
    try:
        return store.decode(task.payload)
    except BaseException as exc:
        raise BrokenPoolError(
            f"worker process {os.getpid()} cannot unpickle the task's function or "
            f"arguments, so the task did not run: {exc!r} (define the function at "
            f"module level of an importable module; check the arguments' "
            f"__reduce__)") from exc


def run_worker(conn, store: ObjectStore, initializer, initargs, maxtasks,
               conventions: Conventions = Conventions.POOL, *,
               die_with_parent: bool = False) -> None:
    """Process main: run tasks until told to stop, the parent dies, or
    *maxtasks* tasks are done and answered.  Failures follow *conventions*.
    *conn* is the worker's end of its socket (a ``Connection``, for
    pickling under spawn); *die_with_parent*: set ``PR_SET_PDEATHSIG``
    (only when the starting thread lives as long as the parent)."""
    parent_sentinel = multiprocessing.parent_process().sentinel
    if die_with_parent:
        _posix.die_with_parent()
    channel = _Channel(conn.fileno(), parent_sentinel)
    if channel.parent_gone():           # it died before the line above
        return
    # Under fork this process keeps holding what it inherited, as any fork
    # child does: a task may read a global view the parent made before the
    # fork, and it must read what was put, not what later reuses the block.
    use_store(store)         # shmpool.empty() in a task builds its result in place
    if initializer is not None:
        _run_initializer(initializer, initargs, conventions)
    unacknowledged: collections.deque = collections.deque()
    done = 0
    while maxtasks is None or done < maxtasks:
        message = channel.receive()
        if message is None or message is STOP:      # the parent is gone, or says stop
            return
        if message is ACK:
            store.release(unacknowledged.popleft())
            continue
        try:
            kind, func, args, kwds = _decode_task(store, message, conventions)
            if type(func) is Shared:
                func = store.decode(func.message)
            answer, held = _encode_answer(store, message.job, message.index, True,
                                          _call(kind, func, args, kwds), conventions)
        except conventions.answered as exc:
            answer, held = _encode_answer(store, message.job, message.index, False,
                                          conventions.wrap(exc), conventions)
        func = args = kwds = message = None         # drop views of the arguments now
        if held is not None:
            unacknowledged.append(held)
        if not channel.send(answer):
            return
        done += 1
    # Retiring: wait for the last acknowledgements, so that nothing this
    # process sent is freed before the supervisor holds it.
    while unacknowledged:
        message = channel.receive()
        if message is None:
            return
        if message is ACK:
            store.release(unacknowledged.popleft())
