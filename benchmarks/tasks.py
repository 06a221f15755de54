"""The functions workers run.  They are module level, so that spawn, loky
and Ray pickle them by reference.  The suite's workloads are those of
``bench_pool.py`` and ``bench_queue.py``, so their task functions are the same
ones."""

from __future__ import annotations

from .bench_pool import add_one, ends_sum, inc, make_array, noop
from .bench_queue import echo, produce

__all__ = ["add_one", "call", "echo", "ends_sum", "inc", "make_array", "map_chunk",
           "noop", "produce"]


def call(fn, *args):
    """Run ``fn(*args)``: Ray tasks run every function through this one."""
    return fn(*args)


def map_chunk(fn, chunk: list) -> list:
    """``[fn(x) for x in chunk]``: one Ray task per chunk of a map."""
    return [fn(x) for x in chunk]
