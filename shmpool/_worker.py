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
"""

from __future__ import annotations

import collections
import multiprocessing
import struct
from itertools import starmap
from multiprocessing.connection import wait
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

from ._default_store import use_store
from ._errors import SerializationError
from ._serialization import ObjectStore

__all__ = ["HEADER", "TASK", "OK", "ERROR", "APPLY", "MAP", "STARMAP", "ACK", "STOP",
           "run_worker"]

HEADER = struct.Struct("<QIB")
TASK, OK, ERROR = 0, 1, 2
APPLY, MAP, STARMAP = 0, 1, 2
ACK = b"A"
STOP = b""


def _call(kind: int, func, args, kwds):
    if kind == APPLY:
        return func(*args, **kwds)
    if kind == MAP:
        return list(map(func, args))
    return list(starmap(func, args))


def _encode_answer(store: ObjectStore, job: int, index: int, status: int, value):
    """The answer message, and the owning ref the worker keeps until ACK."""
    try:
        payload, held = store.encode_held(value)
    except SerializationError as exc:
        # The stdlib reports an unpicklable result or exception this way.
        status = ERROR
        payload, held = store.encode_held(MaybeEncodingError(exc.__cause__ or exc, value))
    return HEADER.pack(job, index, status) + payload, held


def _receive(conn, parent_sentinel) -> bytes | None:
    """The next message, or None once the parent is gone.  Under fork this
    process holds a copy of the parent's end of the pipe too, so EOF never
    comes: the parent's sentinel is what tells that it died."""
    while True:
        ready = wait([conn, parent_sentinel])
        if conn in ready:
            try:
                return conn.recv_bytes()
            except (EOFError, OSError):
                return None
        if parent_sentinel in ready:
            return None


def run_worker(conn, store: ObjectStore, initializer, initargs, maxtasks) -> None:
    """Process main: run tasks until told to stop, the parent dies, or
    *maxtasks* tasks are done and answered."""
    parent_sentinel = multiprocessing.parent_process().sentinel
    # Under fork this process inherited the parent's views; tasks get their
    # data as arguments, so do not keep the parent's objects alive.
    store.raw.forget_inherited_holds()
    use_store(store)         # shmpool.empty() in a task builds its result in place
    if initializer is not None:
        initializer(*initargs)
    unacknowledged: collections.deque = collections.deque()
    done = 0
    while maxtasks is None or done < maxtasks:
        message = _receive(conn, parent_sentinel)
        if message is None or message == STOP:      # the parent is gone, or says stop
            return
        if message == ACK:
            store.release(unacknowledged.popleft())
            continue
        job, index, _ = HEADER.unpack_from(message)
        try:
            kind, func, args, kwds = store.decode(memoryview(message)[HEADER.size:])
            answer, held = _encode_answer(store, job, index, OK, _call(kind, func, args, kwds))
        except Exception as exc:
            answer, held = _encode_answer(store, job, index, ERROR,
                                          ExceptionWithTraceback(exc, exc.__traceback__))
        func = args = kwds = None                   # drop views of the arguments now
        if held is not None:
            unacknowledged.append(held)
        conn.send_bytes(answer)
        done += 1
    # Retiring: wait for the last acknowledgements, so that nothing this
    # process sent is freed before the supervisor holds it.
    while unacknowledged:
        message = _receive(conn, parent_sentinel)
        if message is None:
            return
        if message == ACK:
            store.release(unacknowledged.popleft())
