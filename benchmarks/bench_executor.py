"""Wall time of shmpool.ProcessPoolExecutor against concurrent.futures'.

What is measured, in one run, for both executors side by side (2 workers
each, one start method for both: ``fork`` unless ``--start-method`` says
otherwise):

a. big results: ``map`` of 32 tasks each returning a fresh 8 MiB float32
   array (``np.full``: every page written); the parent reads one element of
   each result and holds all of them until the clock stops.
b. big arguments: ``map`` over 32 float32 arrays of 8 MiB made once in the
   parent; each task answers the float ``arr[0] + arr[-1]``.
c. submit latency: 1,000 ``submit(inc, i).result()`` one after another.
d. small map: ``list(map(inc, range(10_000)))`` with the default
   ``chunksize=1``: 10,000 futures each way.

How: as ``bench_pool.py`` (whose workloads and helpers a and b reuse): for
each workload, one executor per library serves a warm-up run and every
repeat; the two take turns, in alternating order; reported are the median
wall time with the min-max range and the ratio of the medians
(concurrent.futures / shmpool, so above 1 means shmpool is faster), checked
against the targets: at least 10x for big results and big arguments, at
least 1x (no slower) for submit latency and the small map.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import json
import multiprocessing
import os
import sys
import time

try:                                   # python benchmarks/bench_executor.py
    import bench_pool
except ImportError:                    # python -m benchmarks.bench_executor
    from benchmarks import bench_pool

from shmpool import ProcessPoolExecutor

WORKERS = 2
REPEATS, QUICK_REPEATS = 7, 3
SUBMITS, SMALL_MAP = 1_000, 10_000
QUICK_SCALE = 10                       # --quick: small workloads scaled down this much
TARGETS = {"results": 10.0, "args": 10.0, "submit": 1.0, "map": 1.0}
LIBRARIES = ("shmpool", "concurrent.futures")


class _ExecutorRunner:
    """One executor behind the interface bench_pool's workloads use."""

    name: str

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.executor = None

    def _make(self):
        raise NotImplementedError

    def start(self) -> float:
        begin = time.perf_counter()
        self.executor = self._make()
        self.call(bench_pool.noop, 0)
        return time.perf_counter() - begin

    def map(self, fn, items, chunksize: int = 1) -> list:
        return list(self.executor.map(fn, items, chunksize=chunksize))

    def call(self, fn, arg):
        return self.executor.submit(fn, arg).result()

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class ShmpoolRunner(_ExecutorRunner):
    name = "shmpool"

    def _make(self):
        return ProcessPoolExecutor(WORKERS, mp_context=self.ctx)


class StdlibRunner(_ExecutorRunner):
    name = "concurrent.futures"

    def _make(self):
        return concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=self.ctx)


def small_map(n: int) -> bench_pool.Workload:
    def run(runner) -> float:
        begin = time.perf_counter()
        out = runner.map(bench_pool.inc, range(n))        # the default chunksize=1
        elapsed = time.perf_counter() - begin
        bench_pool._check(sum(out) == n * (n + 1) // 2, f"{runner.name}: wrong map")
        return elapsed

    return bench_pool.Workload(f"map_{n}", f"map over {n:,} ints (chunksize 1)", run)


def workloads(quick: bool) -> list[tuple[str, bench_pool.Workload]]:
    """``(target key, workload)`` pairs."""
    scale = QUICK_SCALE if quick else 1
    sequential = bench_pool.small_sequential(SUBMITS // scale)
    sequential.label = f"{SUBMITS // scale:,} sequential submit().result()"
    return [("results", bench_pool.big_results(32, 8 * bench_pool.MIB)),
            ("args", bench_pool.big_arguments(32, 8 * bench_pool.MIB)),
            ("submit", sequential),
            ("map", small_map(SMALL_MAP // scale))]


def bench(target: str, w: bench_pool.Workload, ctx, repeats: int, timeout: float) -> dict:
    faulthandler.dump_traceback_later(timeout, exit=True)    # a hang: tracebacks, exit
    runners = [ShmpoolRunner(ctx), StdlibRunner(ctx)]
    samples = {r.name: [] for r in runners}
    try:
        for r in runners:
            r.start()
            w.run(r)                                         # warm-up, not reported
        for rep in range(repeats):
            for r in (runners if rep % 2 == 0 else runners[::-1]):
                samples[r.name].append(w.run(r))
    finally:
        for r in runners:
            r.stop()
        if w.cleanup is not None:
            w.cleanup()
        faulthandler.cancel_dump_traceback_later()
    results = {name: bench_pool.summary(s) for name, s in samples.items()}
    ratio = results["concurrent.futures"]["median_s"] / results["shmpool"]["median_s"]
    return {"key": w.key, "label": w.label, "results": results, "ratio": ratio,
            "target": TARGETS[target], "met": ratio >= TARGETS[target]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPEATS} repeats; small workloads / {QUICK_SCALE}")
    parser.add_argument("--repeats", type=int, help=f"timed repeats (default {REPEATS})")
    parser.add_argument("--start-method", default="fork",
                        choices=multiprocessing.get_all_start_methods())
    parser.add_argument("--timeout", type=float, default=bench_pool.WORKLOAD_TIMEOUT,
                        help="seconds a workload may take before it counts as hung")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    ctx = multiprocessing.get_context(args.start_method)
    print(f"{WORKERS} workers per executor, start method {args.start_method!r}, "
          f"{repeats} repeats; cpus {os.cpu_count()}, load average {bench_pool.load()}",
          flush=True)
    rows = []
    for target, w in workloads(args.quick):
        rows.append(bench(target, w, ctx, repeats, args.timeout))
        print(f"  {w.label}: done", flush=True)

    print(f"\nMedian (min–max) of {repeats} repeats, wall seconds per run; "
          f"ratio = concurrent.futures / shmpool.\n")
    print("| workload | shmpool (s) | concurrent.futures (s) | ratio | target |")
    print("|:---|---:|---:|---:|:---|")
    for row in rows:
        res = row["results"]
        verdict = "met" if row["met"] else "MISSED"
        print(f"| {row['label']} | {bench_pool.time_cell(res['shmpool'])} "
              f"| {bench_pool.time_cell(res['concurrent.futures'])} "
              f"| {row['ratio']:.3g}x | >= {row['target']:g}x {verdict} |")
    print(f"\nload average at the end: {bench_pool.load()}")
    trouble = []
    if children := multiprocessing.active_children():
        trouble.append(f"worker processes still alive: {[c.pid for c in children]}")
    if leftovers := bench_pool.own_names_in_dev_shm():
        trouble.append(f"LEAK: left in /dev/shm: {sorted(leftovers)}")
    for line in trouble:
        print(f"PROBLEM: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeats": repeats, "workers": WORKERS, "start_method": args.start_method,
                       "workloads": rows, "problems": trouble}, f, indent=2)
    if trouble:
        sys.exit(1)


if __name__ == "__main__":
    main()
