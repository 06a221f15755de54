"""The demo behind ``python -m shmpool``: send an array to another process through the store
and read it there zero-copy, timed against pickling it through a pipe.

Options: ``--mib N`` (array size, default 64), ``--repeats N`` (default 5).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from multiprocessing.connection import wait

import numpy as np

from ._serialization import ObjectStore


def _reader(store: ObjectStore, conn) -> None:
    """Child: answer each message with what it saw of the array."""
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            return
        arr = store.decode(payload) if kind == "store" else payload
        conn.send((float(arr[-1]), arr.flags.writeable))
        del arr


def _median_ms(send, conn, child, repeats: int) -> tuple[float, tuple]:
    times, answer = [], None
    for _ in range(repeats + 1):                 # the first round warms up
        started = time.perf_counter()
        send()
        if conn not in wait([conn, child.sentinel], timeout=60):
            raise RuntimeError(f"the reader process {child.pid} died (exit code {child.exitcode})")
        answer = conn.recv()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3, answer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shmpool",
        description="Send an array to another process through the store, zero-copy, "
                    "and time it against pickling it through a pipe.")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")
    array = np.random.default_rng(0).random(args.mib * 2**20 // 8)
    with ObjectStore(4 * array.nbytes) as store:
        here, there = ctx.Pipe()
        child = ctx.Process(target=_reader, args=(store, there))
        child.start()
        store_ms, (last, writeable) = _median_ms(
            lambda: here.send(("store", store.encode(array))), here, child, args.repeats)
        pickle_ms, _ = _median_ms(lambda: here.send(("pickle", array)), here, child, args.repeats)
        here.send(("stop", None))
        child.join()
    assert last == array[-1]
    print(f"{args.mib} MiB float64 array to another process and back an answer "
          f"(median of {args.repeats}):")
    print(f"  through the shmpool store: {store_ms:8.1f} ms   "
          f"(the reader's array is a copy-on-write view: writeable={writeable})")
    print(f"  pickled through a pipe:    {pickle_ms:8.1f} ms")
    print(f"  shmpool is {pickle_ms / store_ms:.1f}x faster")
