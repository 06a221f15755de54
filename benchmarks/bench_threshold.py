"""Where a message buffer is cheaper through the store than pickled in-band.

For each buffer size, times ``store.decode(store.encode(arr))`` of a float64
array of random data, then drops the result, on two stores:

- ``threshold=0``: every buffer goes into the store and the message is a
  ref (a store object created, retained, adopted, read zero-copy, freed);
- ``threshold=2**62``: every buffer is pickled in-band into the message.

Both run in one process with no pipe in between, so the in-band path is
spared the pipe's write and read: the crossover found here is an upper
bound on the threshold worth using.  The suite's measuring rules
(``benchmarks.measure``): each path is warmed up once, then the two are
timed call by call, taking turns, and the median per size is reported with
the min-max range.  The library's default is
``shmpool._serialization.DEFAULT_THRESHOLD``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from shmpool import ObjectStore, testing
from shmpool._serialization import DEFAULT_THRESHOLD

if not __package__:             # run as a file: python benchmarks/bench_threshold.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import repeat_in_turns  # noqa: E402
from benchmarks.report import scaled_range, size_label  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 4 * MIB]
STORE_CAPACITY = 64 * MIB
ALWAYS_STORE, NEVER_STORE = 0, 2**62
LARGE = MIB                   # sizes from here on get fewer repeats


def repeats_for(nbytes: int, quick: bool) -> int:
    if quick:
        return 50 if nbytes < LARGE else 20
    return 200 if nbytes < LARGE else 50


def time_round_trip(store: ObjectStore, arr: np.ndarray) -> float:
    start = time.perf_counter()
    out = store.decode(store.encode(arr))
    del out
    return time.perf_counter() - start


def bench_size(via_store: ObjectStore, in_band: ObjectStore, nbytes: int,
               repeats: int) -> dict:
    arr = np.random.default_rng(nbytes).random(nbytes // 8)
    runs = {name: (lambda store=store: {"seconds": time_round_trip(store, arr)})
            for name, store in (("store", via_store), ("inband", in_band))}
    found = repeat_in_turns(runs, repeats)
    return {"nbytes": nbytes, "repeats": repeats,
            **{name: m["seconds"] for name, m in found.items()}}


def crossover(rows: list[dict]) -> int | None:
    """Smallest size from which the store path is faster at every larger size."""
    found = None
    for row in reversed(rows):
        if row["store"]["median"] >= row["inband"]["median"]:
            break
        found = row["nbytes"]
    return found


def time_cell(r: dict) -> str:
    return scaled_range(r, 1e6)                 # microseconds


def print_report(rows: list[dict]) -> None:
    print("Times: median (min–max) per encode+decode, in microseconds.\n")
    print("| size | repeats | via store, threshold=0 (us) | in-band, threshold=2**62 (us) "
          "| in-band/store | faster |")
    print("|---:|---:|---:|---:|---:|:---|")
    for r in rows:
        ratio = r["inband"]["median"] / r["store"]["median"]
        faster = "store" if ratio > 1 else "in-band"
        print(f"| {size_label(r['nbytes'])} | {r['repeats']} | {time_cell(r['store'])} "
              f"| {time_cell(r['inband'])} | {ratio:.2f} | {faster} |")
    size = crossover(rows)
    where = size_label(size) if size else "none of the sizes measured"
    print(f"\nstore path faster from: {where} "
          f"(library default threshold: {size_label(DEFAULT_THRESHOLD)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    names_before = testing.live_names()
    with ObjectStore(STORE_CAPACITY, threshold=ALWAYS_STORE) as via_store, \
            ObjectStore(STORE_CAPACITY, threshold=NEVER_STORE) as in_band:
        rows = [bench_size(via_store, in_band, n, repeats_for(n, args.quick))
                for n in SIZES]
    print_report(rows)
    leftovers = testing.leaked_names(since=names_before)
    if leftovers:
        print(f"LEAK: left in /dev/shm: {sorted(leftovers)}")


if __name__ == "__main__":
    main()
