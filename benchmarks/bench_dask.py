"""What shmpool gains under dask's process scheduler, which sends bytes.

dask's ``scheduler="processes"`` pickles every task and every result with
cloudpickle itself and hands the pool *bytes*: array buffers are inside
them, in-band, so no pool can pass them by reference.  shmpool moves such
bytes through its store (one copy in, one copy out of the pickled bytes)
instead of a pipe, which is all it can save.

One workload, in one run: a dask array of 8 blocks of 32 MiB (``float64``,
made in the workers by ``da.random.random``), computed back to the parent
(256 MiB of results), with ``pool=``:

- ``concurrent.futures`` (dask's default executor), spawn;
- the same executor on ``shmpool.get_context("spawn")`` (results through
  the store as bytes);
- ``shmpool.ProcessPoolExecutor``, spawn;

and, for contrast, the same blocks made and returned by
``shmpool.ProcessPoolExecutor.map`` directly (no dask: the arrays go out of
band, by reference).  Each pool is made once and warmed up; the variants
take turns; reported: the median of ``--repeats`` wall times and its ratio
to dask's default.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import time

import numpy as np

import shmpool

MIB = 1024 * 1024
BLOCKS, ROWS, COLS = 8, 512, 8192            # 8 blocks of 512 x 8192 float64 = 32 MiB


def _block(i: int) -> np.ndarray:
    return np.random.default_rng(i).random((ROWS, COLS))


def _dask_compute(pool) -> float:
    import dask.array as da

    x = da.random.random((BLOCKS * ROWS, COLS), chunks=(ROWS, COLS))
    started = time.perf_counter()
    result = x.compute(scheduler="processes", pool=pool)
    elapsed = time.perf_counter() - started
    assert result.shape == (BLOCKS * ROWS, COLS)
    return elapsed


def _direct(executor) -> float:
    started = time.perf_counter()
    results = list(executor.map(_block, range(BLOCKS)))
    elapsed = time.perf_counter() - started
    assert sum(r.nbytes for r in results) == BLOCKS * ROWS * COLS * 8
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    pools = {
        "dask, concurrent.futures (default)": concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn),
        "dask, concurrent.futures on shmpool's context": concurrent.futures.ProcessPoolExecutor(
            2, mp_context=shmpool.get_context("spawn")),
        "dask, shmpool.ProcessPoolExecutor": shmpool.ProcessPoolExecutor(2, mp_context=spawn),
    }
    direct = shmpool.ProcessPoolExecutor(2, mp_context=spawn)
    runs: dict[str, list[float]] = {name: [] for name in [*pools, "no dask: shmpool executor.map"]}
    for repeat in range(args.repeats + 1):              # the first round warms up
        for name, pool in pools.items():
            elapsed = _dask_compute(pool)
            if repeat:
                runs[name].append(elapsed)
        elapsed = _direct(direct)
        if repeat:
            runs["no dask: shmpool executor.map"].append(elapsed)
    baseline = statistics.median(runs["dask, concurrent.futures (default)"])
    print(f"{BLOCKS} blocks of {ROWS * COLS * 8 // MIB} MiB to the parent, 2 workers, spawn, "
          f"median of {args.repeats}")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"  {name:48s} {median:7.3f} s   {baseline / median:5.2f}x")
    for pool in [*pools.values(), direct]:
        pool.shutdown()


if __name__ == "__main__":
    main()
