"""Throughput of the shared-memory object store against pickle and memcpy.

What is measured, in one run:

a. ``ObjectStore.put`` + ``get`` round trips of a float64 array of random
   data (random, not zeros: zero pages would flatter every copy).  One round
   trip is ``ref = store.put(arr); out = store.get(ref); del out;
   store.release(ref)``: one copy into shared memory and a zero-copy read.
   One store (1 GiB) serves every repeat, so freed blocks are reused and its
   pages are warm.
b. ``pickle.loads(pickle.dumps(arr, protocol=5))`` of the same array: the
   in-band copy that plain multiprocessing pays.
c. ``np.copyto(dst, arr)`` into a preallocated, already-written ``dst``:
   the memcpy limit that a one-copy put can at best reach.
d. Allocate/free pairs per second of the raw ``FreeListAllocator``.
e. Across processes: a forked child that was given the store as a Process
   argument receives a ref to a 64 MiB array through a pipe, ``get``s it and
   answers its sum; against sending the array itself through the pipe.  The
   child is started once and serves every repeat, so process start-up is not
   timed.  The parent's time runs from the private array to the answer
   (``put`` and ``release`` included), and the parent keeps its ref until
   the child has answered.

How: the number of calls per sample of each case is doubled until a sample
lasts at least MIN_SAMPLE_SECONDS (as ``timeit.autorange`` does), so that
tiny sizes are not timer noise.  Then the suite's measuring rules
(``benchmarks.measure``): one warm-up sample, then the repeats, the cases of
one size taking turns in rotating order, so that a noisy moment of the
machine hits them alike.  Reported: the median time per call over the
repeats, with the min-max range.  ``--json`` writes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pickle
import sys
import time

import numpy as np

from shmpool import ObjectRef, ObjectStore, testing
from shmpool._allocator import FreeListAllocator
from shmpool._arena import Arena

if not __package__:             # run as a file: python benchmarks/bench_store.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import repeat_in_turns  # noqa: E402
from benchmarks.report import scaled_range, size_label  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
SIZES = [KIB, 64 * KIB, MIB, 8 * MIB, 64 * MIB, 256 * MIB]
QUICK_MAX_SIZE = 64 * MIB
STORE_CAPACITY = 1024 * MIB
MIN_SAMPLE_SECONDS = 0.02
ALLOC_PAIRS = 20_000
ALLOC_PAYLOAD = 1000
CROSS_PROCESS_SIZE = 64 * MIB
TARGET_SIZE = 64 * MIB
TARGET_RATIO = 1.5


# -- timing ----------------------------------------------------------------

def _time_calls(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


def _calls_per_sample(fn) -> int:
    """Warm *fn* up, then find how many calls fill MIN_SAMPLE_SECONDS."""
    fn()
    number = 1
    while _time_calls(fn, number) < MIN_SAMPLE_SECONDS:
        number *= 2
    return number


def measure(cases: dict, repeats: int) -> dict[str, dict]:
    """Seconds per call of each case in *cases*: ``{name: summary}``."""
    numbers = {name: _calls_per_sample(fn) for name, fn in cases.items()}
    runs = {name: (lambda fn=fn, n=numbers[name]: {"seconds": _time_calls(fn, n) / n})
            for name, fn in cases.items()}
    return {name: m["seconds"] for name, m in repeat_in_turns(runs, repeats).items()}


# -- a, b, c: one size -----------------------------------------------------

def random_array(nbytes: int) -> np.ndarray:
    return np.random.default_rng(nbytes).random(nbytes // 8)


def bench_size(store: ObjectStore, nbytes: int, repeats: int) -> dict:
    arr = random_array(nbytes)
    dst = np.empty_like(arr)
    dst[...] = arr                      # written once: its pages are warm

    def store_round_trip():
        ref = store.put(arr)
        out = store.get(ref)
        del out
        store.release(ref)

    cases = {
        "shmpool": store_round_trip,
        "pickle": lambda: pickle.loads(pickle.dumps(arr, protocol=5)),
        "memcpy": lambda: np.copyto(dst, arr),
    }
    results = measure(cases, repeats)
    live = store.statistics().live_objects
    if live:
        raise RuntimeError(f"{live} objects still live after the {nbytes}-byte round trips")
    shm, pkl, mem = (results[k]["median"] for k in ("shmpool", "pickle", "memcpy"))
    return {"nbytes": nbytes, **results,
            "shmpool_over_memcpy": shm / mem, "pickle_over_shmpool": pkl / shm}


# -- d: the allocator ------------------------------------------------------

def bench_allocator(repeats: int) -> dict:
    arena = Arena.create(16 * MIB)
    try:
        alloc = FreeListAllocator.format(arena)

        def pairs():
            for _ in range(ALLOC_PAIRS):
                alloc.free(alloc.try_allocate(ALLOC_PAYLOAD))

        found = repeat_in_turns({"allocator": lambda: {"pairs_per_s": ALLOC_PAIRS / _time_calls(
            pairs, 1)}}, repeats)
    finally:
        arena.close()
    return {"pairs": ALLOC_PAIRS, "payload_bytes": ALLOC_PAYLOAD,
            "pairs_per_s": found["allocator"]["pairs_per_s"]}


# -- e: across processes ---------------------------------------------------

def sum_server(store: ObjectStore, conn) -> None:
    """Child: answer the sum of each array received, itself or as a ref."""
    while (msg := conn.recv()) is not None:
        arr = store.get(msg) if isinstance(msg, ObjectRef) else msg
        total = float(arr.sum())
        del arr                     # drop the view before answering
        conn.send(total)
    store.close()


def bench_cross_process(store: ObjectStore, repeats: int) -> dict:
    arr = random_array(CROSS_PROCESS_SIZE)
    expected = float(arr.sum())
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=sum_server, args=(store, child_conn))
    child.start()

    def via_store() -> float:
        ref = store.put(arr)
        parent_conn.send(ref)
        total = parent_conn.recv()  # the ref stays alive until the answer
        store.release(ref)
        return total

    def via_pipe() -> float:
        parent_conn.send(arr)
        return parent_conn.recv()

    try:
        cases = {"shmpool": via_store, "pipe": via_pipe}
        for fn in cases.values():
            if not math.isclose(fn(), expected, rel_tol=1e-12):
                raise RuntimeError("the child answered a wrong sum")
        results = measure(cases, repeats)
    finally:
        parent_conn.send(None)
        child.join()
    return {"nbytes": CROSS_PROCESS_SIZE, **results,
            "pipe_over_shmpool": results["pipe"]["median"] / results["shmpool"]["median"]}


# -- report ----------------------------------------------------------------

def time_cell(r: dict) -> str:
    return scaled_range(r, 1e3)                 # milliseconds


def print_table(rows: list[dict]) -> None:
    print("| size | shmpool put+get (ms) | pickle (ms) | memcpy (ms) "
          "| shmpool/memcpy ratio | pickle/shmpool speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {size_label(r['nbytes'])} | {time_cell(r['shmpool'])} "
              f"| {time_cell(r['pickle'])} | {time_cell(r['memcpy'])} "
              f"| {r['shmpool_over_memcpy']:.2f} | {r['pickle_over_shmpool']:.2f}x |")


def print_report(rows: list[dict], alloc: dict, cross: dict, repeats: int) -> None:
    print(f"Times: median (min–max) of {repeats} repeats, per call.\n")
    print_table(rows)
    rate = alloc["pairs_per_s"]
    print(f"\nallocator: {rate['median']:,.0f} allocate/free pairs/s "
          f"(median of {repeats}; {rate['min']:,.0f}–{rate['max']:,.0f}; "
          f"{alloc['pairs']} pairs of {alloc['payload_bytes']}-byte payloads)")
    label = size_label(cross["nbytes"])
    print(f"cross-process, {label}: child get + sum {time_cell(cross['shmpool'])} ms, "
          f"Pipe send/recv + sum {time_cell(cross['pipe'])} ms, "
          f"pipe/shmpool speedup {cross['pipe_over_shmpool']:.2f}x")
    target = next(r for r in rows if r["nbytes"] == TARGET_SIZE)
    print(f"{size_label(TARGET_SIZE)} put+get / memcpy = "
          f"{target['shmpool_over_memcpy']:.2f} (target <= {TARGET_RATIO})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"stop at {size_label(QUICK_MAX_SIZE)}, 5 repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    names_before = testing.live_names()
    repeats = 5 if args.quick else 9
    sizes = [n for n in SIZES if not args.quick or n <= QUICK_MAX_SIZE]

    with ObjectStore(STORE_CAPACITY) as store:
        rows = [bench_size(store, n, repeats) for n in sizes]
        cross = bench_cross_process(store, repeats)
    alloc = bench_allocator(repeats)
    print_report(rows, alloc, cross, repeats)

    leftovers = testing.leaked_names(since=names_before)
    if leftovers:
        print(f"LEAK: left in /dev/shm: {sorted(leftovers)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "repeats": repeats, "sizes": rows,
                       "allocator": alloc, "cross_process": cross,
                       "target_ratio": TARGET_RATIO}, f, indent=2)


if __name__ == "__main__":
    main()
