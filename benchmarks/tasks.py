"""The functions workers run, for the suite and for every per-area script.
They are module level, so that spawn, loky and Ray pickle them by reference."""

from __future__ import annotations

import numpy as np

__all__ = ["add_one", "call", "echo", "ends_sum", "inc", "make_array", "map_chunk",
           "noop", "normalise_in_place", "produce", "shared_ends"]


def noop(x=None):
    return x


def make_array(spec):
    """A fresh float32 array of *nbytes*, every element written as *value*
    (``np.full``, not zeros: untouched zero pages would flatter every copy)."""
    value, nbytes = spec
    return np.full(nbytes // 4, value, dtype=np.float32)


def ends_sum(arr) -> float:
    return float(arr[0] + arr[-1])


def normalise_in_place(arr) -> float:
    """W8: ``arr -= arr.mean()`` in place, then the ends' sum.  A read-only
    argument (Ray's, or shmpool's with ``readonly=True``) is copied first:
    the copy such code needs there."""
    if not arr.flags.writeable:
        arr = np.array(arr)
    arr -= arr.mean()
    return float(arr[0] + arr[-1])


def shared_ends(arr, i: int) -> float:
    """W9: every task of a map gets the same *arr* (through a ``partial``)."""
    return float(arr[0] + arr[-1]) + i


def add_one(arr):
    return arr + 1


def inc(x: int) -> int:
    return x + 1


def call(fn, *args):
    """Run ``fn(*args)``: Ray tasks run every function through this one."""
    return fn(*args)


def map_chunk(fn, chunk: list) -> list:
    """``[fn(x) for x in chunk]``: one Ray task per chunk of a map."""
    return [fn(x) for x in chunk]


def produce(items, go, count: int, nbytes: int) -> None:
    """Queue child: on each "go", put *count* int64 arrays of *nbytes*, the
    i-th filled with i; None on *go* ends it."""
    while go.get() is not None:
        for i in range(count):
            items.put(np.full(nbytes // 8, i, dtype=np.int64))


def echo(requests, answers) -> None:
    """Queue child: put back every request until a None."""
    while (x := requests.get()) is not None:
        answers.put(x)
