"""The worker process: run tasks from one pipe, answer on the same pipe.

A worker owns one end of a duplex pipe to its supervisor.  Every message,
both ways, starts with ``HEADER`` (job id, index in the job, status); what
follows is a store message (``ObjectStore.encode``): an in-band pickle for
small values, a ref for big ones.  The job and index stay readable even when
the payload cannot be unpickled, so every failure is reported for its task.

    supervisor -> worker   HEADER(job, index, TASK) + (kind, func, args, kwds)
                           b"" = stop
    worker -> supervisor   HEADER(job, index, OK)    + result
                           HEADER(job, index, ERROR) + exception (remote
                               traceback as ``__cause__``)
                           HEADER(0, 0, RETIRING)    after maxtasks tasks

Task arguments are *held* by the supervisor until the answer arrives; a
result is *retained* for the supervisor to adopt (see ``_serialization``).
No threads run here.
"""

from __future__ import annotations

import struct
from itertools import starmap
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

from ._errors import SerializationError
from ._serialization import ObjectStore

__all__ = ["HEADER", "TASK", "OK", "ERROR", "RETIRING", "APPLY", "MAP", "STARMAP",
           "STOP", "run_worker"]

HEADER = struct.Struct("<QIB")
TASK, OK, ERROR, RETIRING = 0, 1, 2, 3
APPLY, MAP, STARMAP = 0, 1, 2
STOP = b""


def _call(kind: int, func, args, kwds):
    if kind == APPLY:
        return func(*args, **kwds)
    if kind == MAP:
        return list(map(func, args))
    return list(starmap(func, args))


def _encode_answer(store: ObjectStore, job: int, index: int, status: int, value) -> bytes:
    try:
        payload = store.encode(value)
    except SerializationError as exc:
        # The stdlib reports an unpicklable result or exception this way.
        status = ERROR
        payload = store.encode(MaybeEncodingError(exc.__cause__ or exc, value))
    return HEADER.pack(job, index, status) + payload


def run_worker(conn, store: ObjectStore, initializer, initargs, maxtasks) -> None:
    """Process main: run tasks until told to stop, the pipe closes, or
    *maxtasks* tasks are done (then say RETIRING and return)."""
    if initializer is not None:
        initializer(*initargs)
    done = 0
    while maxtasks is None or done < maxtasks:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return                                  # the supervisor is gone
        if message == STOP:
            return
        job, index, _ = HEADER.unpack_from(message)
        try:
            kind, func, args, kwds = store.decode(memoryview(message)[HEADER.size:])
            answer = _encode_answer(store, job, index, OK, _call(kind, func, args, kwds))
        except Exception as exc:
            answer = _encode_answer(store, job, index, ERROR,
                                    ExceptionWithTraceback(exc, exc.__traceback__))
        func = args = kwds = None                   # drop views of the arguments now
        conn.send_bytes(answer)
        done += 1
    conn.send_bytes(HEADER.pack(0, 0, RETIRING))
