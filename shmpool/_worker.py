"""The worker process: run tasks from one pipe, answer on the same pipe.

A worker owns one end of a duplex pipe to its supervisor.  Every message,
both ways, starts with ``HEADER`` (job id, index in the job, status); what
follows is a store message (``ObjectStore.encode``): an in-band pickle for
small values, a ref for big ones.  The job and index stay readable even when
the payload cannot be unpickled, so every failure is reported for its task.

    supervisor -> worker   HEADER(job, index, TASK) + (kind, func, args, kwds)
                           ACK: the oldest answer in the store was received
                           STOP (b""): exit
    worker -> supervisor   HEADER(job, index, OK)    + result
                           HEADER(job, index, ERROR) + exception (remote
                               traceback as ``__cause__``)

Both sides *hold* what they send until the other side has its own hold:
the supervisor holds a task's arguments until the answer arrives; a worker
holds each answer that went through the store until the supervisor's ACK.
So a process that dies leaves no count behind that nobody owns: reaping
its holds frees everything it sent and nobody received.  A worker exits
after *maxtasks* tasks; the supervisor counts them too, and sends it no
more.  No threads run here.

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
import struct
# concurrent.futures' own carrier: its futures' exceptions must have that
# module's _RemoteTraceback as __cause__, as the standard library's do.
from concurrent.futures.process import _ExceptionWithTraceback
from itertools import starmap
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

from ._default_store import use_store
from ._errors import BrokenPoolError, SerializationError
from ._serialization import ObjectStore

__all__ = ["HEADER", "TASK", "OK", "ERROR", "APPLY", "MAP", "STARMAP", "ACK", "STOP",
           "Conventions", "run_worker"]

HEADER = struct.Struct("<QIB")
TASK, OK, ERROR = 0, 1, 2
APPLY, MAP, STARMAP = 0, 1, 2
ACK = b"A"
STOP = b""


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
        """*exc* as an answer: it carries its traceback across the pipe."""
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


def _encode_answer(store: ObjectStore, job: int, index: int, status: int, value,
                   conventions: Conventions):
    """The answer message, and the owning ref the worker keeps until ACK."""
    if conventions is Conventions.POOL:
        try:
            payload, held = store.encode_held(value)
        except SerializationError as exc:
            # The stdlib reports an unpicklable result or exception this way.
            status = ERROR
            payload, held = store.encode_held(MaybeEncodingError(exc.__cause__ or exc, value))
        return HEADER.pack(job, index, status) + payload, held
    try:
        payload, held = store.encode_held(value)
    except BaseException as exc:       # SystemExit in a __reduce__ is an answer too
        error = exc.__cause__ if isinstance(exc, SerializationError) and exc.__cause__ else exc
        status = ERROR
        try:
            payload, held = store.encode_held(conventions.wrap(error))
        except BaseException:          # the error itself does not pickle either
            payload, held = store.encode_held(conventions.wrap(SerializationError(
                f"cannot pickle the answer of the task, nor the error {error!r} "
                f"raised while pickling it")))
    return HEADER.pack(job, index, status) + payload, held


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


class _Inbox:
    """The worker's end of its pipe, watched together with the parent's
    sentinel.  Under fork this process holds a copy of the parent's end of
    the pipe too, so EOF never comes: the parent's sentinel is what tells
    that it died.  One poll object serves every wait (building a selector
    per message, as ``multiprocessing.connection.wait`` does, cost more than
    a small task)."""

    def __init__(self, conn, parent_sentinel: int) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._poller.register(parent_sentinel, select.POLLIN)

    def receive(self) -> bytes | None:
        """The next message, or None once the parent is gone."""
        ready = {fd for fd, _ in self._poller.poll()}
        if self._fd in ready:
            try:
                return self._conn.recv_bytes()
            except (EOFError, OSError):
                return None
        return None                      # only the parent's sentinel: it died


def _decode_task(store: ObjectStore, message, conventions: Conventions):
    """``(kind, func, args, kwds)`` of a TASK message."""
    payload = memoryview(message)[HEADER.size:]
    if conventions is Conventions.POOL:
        return store.decode(payload)
    try:
        return store.decode(payload)
    except BaseException as exc:
        raise BrokenPoolError(
            f"worker process {os.getpid()} cannot unpickle the task's function or "
            f"arguments, so the task did not run: {exc!r} (define the function at "
            f"module level of an importable module; check the arguments' "
            f"__reduce__)") from exc


def run_worker(conn, store: ObjectStore, initializer, initargs, maxtasks,
               conventions: Conventions = Conventions.POOL) -> None:
    """Process main: run tasks until told to stop, the parent dies, or
    *maxtasks* tasks are done and answered.  Failures follow *conventions*."""
    parent_sentinel = multiprocessing.parent_process().sentinel
    # Under fork this process inherited the parent's views; tasks get their
    # data as arguments, so do not keep the parent's objects alive.
    store.raw.forget_inherited_holds()
    use_store(store)         # shmpool.empty() in a task builds its result in place
    if initializer is not None:
        _run_initializer(initializer, initargs, conventions)
    inbox = _Inbox(conn, parent_sentinel)
    unacknowledged: collections.deque = collections.deque()
    done = 0
    while maxtasks is None or done < maxtasks:
        message = inbox.receive()
        if message is None or message == STOP:      # the parent is gone, or says stop
            return
        if message == ACK:
            store.release(unacknowledged.popleft())
            continue
        job, index, _ = HEADER.unpack_from(message)
        try:
            kind, func, args, kwds = _decode_task(store, message, conventions)
            answer, held = _encode_answer(store, job, index, OK, _call(kind, func, args, kwds),
                                          conventions)
        except conventions.answered as exc:
            answer, held = _encode_answer(store, job, index, ERROR, conventions.wrap(exc),
                                          conventions)
        func = args = kwds = None                   # drop views of the arguments now
        if held is not None:
            unacknowledged.append(held)
        conn.send_bytes(answer)
        done += 1
    # Retiring: wait for the last acknowledgements, so that nothing this
    # process sent is freed before the supervisor holds it.
    while unacknowledged:
        message = inbox.receive()
        if message is None:
            return
        if message == ACK:
            store.release(unacknowledged.popleft())
