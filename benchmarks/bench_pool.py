"""Wall time of shmpool.Pool against multiprocessing.Pool and ProcessPoolExecutor.

What is measured, in one run, for the three pools side by side (2 workers
each, one start method for all: ``fork`` unless ``--start-method`` says
otherwise):

a. big results: 32 tasks each returning a fresh 8 MiB float32 array, and
   8 tasks each returning a fresh 64 MiB one (``map``, chunksize 1).  The
   task writes every element (``np.full``; not ``np.zeros``, whose untouched
   zero pages would flatter every copy).  The parent reads one element of
   each result and holds all of them until the clock stops; they are
   dropped after.
b. big arguments: ``map`` (chunksize 1) over a list of 32 float32 arrays
   of 8 MiB, made once in the parent; each task answers the float
   ``arr[0] + arr[-1]``.
c. a chain: a 64 MiB result fed as the argument of the next task, 10
   stages (``apply``): the first task makes the array, each later one
   answers ``a + 1`` of the array it receives.  The parent reads one
   element of the last result.
d. small tasks: ``map`` of a trivial function over 100,000 ints (chunksize
   as ``multiprocessing.Pool.map`` would choose it, given to all three);
   10,000 ``apply_async`` then every ``get``; 1,000 ``apply`` one after
   another.  ProcessPoolExecutor does the same with ``map``,
   ``submit``/``result`` and ``submit(...).result()``.

How: for each workload, one pool per library is started (start-up, timed
from the constructor to the answer of a first trivial task, is reported
apart) and serves the warm-up run and every repeat of that workload; then
each pool is closed and joined (shutdown, also reported apart).  The three
pools take turns repeat after repeat, in a rotating order, so that a noisy
moment of the machine hits them alike.  Reported: the median wall time over
the repeats with the min-max range, the ratios of the medians, and whether
each target is met.  The load average is printed at the start and the end:
the numbers of a busy machine are not the numbers of an idle one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from shmpool import testing
from shmpool._pool import Pool as ShmPool

MIB = 1024 * 1024
WORKERS = 2
REPEATS, QUICK_REPEATS = 7, 3
SMALL_MAP, SMALL_ASYNC, SMALL_SEQUENTIAL = 100_000, 10_000, 1_000
QUICK_SCALE = 10                     # --quick: small tasks scaled down this much
CHAIN_STAGES, QUICK_CHAIN_STAGES = 10, 3
WORKLOAD_TIMEOUT = 900.0             # seconds before a workload counts as hung
SETTLE_SECONDS = 2.0                 # wait for in-flight releases before calling a leak
LIBRARIES = ("shmpool", "multiprocessing", "ProcessPoolExecutor")


# -- tasks (module level: every start method can pickle them) --------------

def noop(x=None):
    return x


def make_array(spec):
    """A fresh float32 array of *nbytes*, every element written as *value*."""
    value, nbytes = spec
    return np.full(nbytes // 4, value, dtype=np.float32)


def ends_sum(arr) -> float:
    return float(arr[0] + arr[-1])


def add_one(arr):
    return arr + 1


def inc(x: int) -> int:
    return x + 1


# -- the three pools behind one interface ----------------------------------

def pool_chunksize(n: int) -> int:
    """The chunksize ``multiprocessing.Pool.map`` picks for *n* items."""
    chunksize, extra = divmod(n, WORKERS * 4)
    return chunksize + bool(extra)


class _PoolRunner:
    """shmpool.Pool and multiprocessing.Pool: the same API."""

    name: str

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.pool = None

    def _make(self):
        raise NotImplementedError

    def start(self) -> float:
        """Start the pool; seconds until a first trivial task has answered."""
        begin = time.perf_counter()
        self.pool = self._make()
        self.call(noop, 0)
        return time.perf_counter() - begin

    def map(self, fn, items, chunksize: int) -> list:
        return self.pool.map(fn, items, chunksize)

    def submit_all(self, fn, items) -> list:
        pending = [self.pool.apply_async(fn, (x,)) for x in items]
        return [r.get() for r in pending]

    def call(self, fn, arg):
        return self.pool.apply(fn, (arg,))

    def stop(self) -> float | None:
        """Close and join; seconds it took (None if never started)."""
        if self.pool is None:
            return None
        begin = time.perf_counter()
        self.pool.close()
        self.pool.join()
        self.pool = None
        return time.perf_counter() - begin

    def problems(self) -> list[str]:
        """What the pool still holds after a workload that it should not."""
        return []


class ShmpoolRunner(_PoolRunner):
    name = "shmpool"

    def _make(self):
        return ShmPool(WORKERS, context=self.ctx)

    def problems(self) -> list[str]:
        # A worker holds its last answer until the supervisor's acknowledgement
        # reaches it, just after the result is set: give that a moment.
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            stats = self.pool.statistics()
            if (not stats.unfinished_results and not stats.store.live_objects
                    or time.monotonic() > deadline):
                break
            time.sleep(0.01)
        found = []
        if stats.unfinished_results:
            found.append(f"{stats.unfinished_results} unfinished results")
        if stats.store.live_objects:
            held = getattr(stats, "held_by_process", None)
            found.append(f"{stats.store.live_objects} store object(s) still live "
                         f"{SETTLE_SECONDS:g} s after every result was dropped"
                         + (f"; held by pid: (objects, bytes) {held}" if held else ""))
        if stats.store.fallbacks:
            found.append(f"{stats.store.fallbacks} in-band fallbacks (store full)")
        return found


class MultiprocessingRunner(_PoolRunner):
    name = "multiprocessing"

    def _make(self):
        return self.ctx.Pool(WORKERS)


class ExecutorRunner(_PoolRunner):
    name = "ProcessPoolExecutor"

    def _make(self):
        return concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=self.ctx)

    def map(self, fn, items, chunksize: int) -> list:
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def submit_all(self, fn, items) -> list:
        pending = [self.pool.submit(fn, x) for x in items]
        return [f.result() for f in pending]

    def call(self, fn, arg):
        return self.pool.submit(fn, arg).result()

    def stop(self) -> float | None:
        if self.pool is None:
            return None
        begin = time.perf_counter()
        self.pool.shutdown(wait=True)
        self.pool = None
        return time.perf_counter() - begin


RUNNERS = (ShmpoolRunner, MultiprocessingRunner, ExecutorRunner)


# -- workloads -------------------------------------------------------------

class WrongAnswer(RuntimeError):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise WrongAnswer(what)


@dataclass
class Workload:
    key: str
    label: str
    run: object                     # run(runner) -> seconds of one timed run
    targets: dict = field(default_factory=dict)   # library -> min ratio over shmpool
    cleanup: object = None          # cleanup(): drop what the workload keeps


def big_results(count: int, nbytes: int) -> Workload:
    specs = [(i + 0.5, nbytes) for i in range(count)]

    def run(runner) -> float:
        begin = time.perf_counter()
        results = runner.map(make_array, specs, 1)
        firsts = [float(r[0]) for r in results]            # touch each result
        elapsed = time.perf_counter() - begin
        _check(firsts == [v for v, _ in specs]
               and all(r.nbytes == nbytes for r in results), f"{runner.name}: wrong results")
        del results                                        # dropped after the clock
        return elapsed

    return Workload(f"results_{count}x{nbytes // MIB}MiB",
                    f"{count} × {nbytes // MIB} MiB results", run,
                    {"multiprocessing": 20.0, "ProcessPoolExecutor": 8.0})


def big_arguments(count: int, nbytes: int) -> Workload:
    arrays = []

    def run(runner) -> float:
        if not arrays:                                     # made once, on first use
            for i in range(count):
                arr = np.full(nbytes // 4, i + 0.5, dtype=np.float32)
                arr[-1] = i
                arrays.append(arr)
        begin = time.perf_counter()
        answers = runner.map(ends_sum, arrays, 1)
        elapsed = time.perf_counter() - begin
        _check(answers == [2 * i + 0.5 for i in range(count)], f"{runner.name}: wrong answers")
        return elapsed

    return Workload(f"args_{count}x{nbytes // MIB}MiB",
                    f"{count} × {nbytes // MIB} MiB arguments", run,
                    {"multiprocessing": 20.0, "ProcessPoolExecutor": 8.0}, arrays.clear)


def chain(stages: int, nbytes: int) -> Workload:
    def run(runner) -> float:
        begin = time.perf_counter()
        x = runner.call(make_array, (0.5, nbytes))
        for _ in range(stages - 1):
            x = runner.call(add_one, x)
        first = float(x[0])
        elapsed = time.perf_counter() - begin
        _check(first == 0.5 + stages - 1 and x.nbytes == nbytes, f"{runner.name}: wrong chain")
        del x
        return elapsed

    return Workload(f"chain_{stages}x{nbytes // MIB}MiB",
                    f"chain of {stages} × {nbytes // MIB} MiB", run,
                    {"multiprocessing": 30.0})


def small_map(n: int) -> Workload:
    def run(runner) -> float:
        begin = time.perf_counter()
        out = runner.map(inc, range(n), pool_chunksize(n))
        elapsed = time.perf_counter() - begin
        _check(len(out) == n and sum(out) == n * (n + 1) // 2, f"{runner.name}: wrong map")
        return elapsed

    return Workload(f"map_{n}", f"map over {n:,} ints", run, {"multiprocessing": 1.0})


def small_async(n: int) -> Workload:
    def run(runner) -> float:
        begin = time.perf_counter()
        out = runner.submit_all(inc, range(n))
        elapsed = time.perf_counter() - begin
        _check(sum(out) == n * (n + 1) // 2, f"{runner.name}: wrong apply_async")
        return elapsed

    return Workload(f"apply_async_{n}", f"{n:,} apply_async, then get", run,
                    {"multiprocessing": 1.0})


def small_sequential(n: int) -> Workload:
    def run(runner) -> float:
        total = 0
        begin = time.perf_counter()
        for i in range(n):
            total += runner.call(inc, i)
        elapsed = time.perf_counter() - begin
        _check(total == n * (n + 1) // 2, f"{runner.name}: wrong apply")
        return elapsed

    return Workload(f"apply_{n}", f"{n:,} sequential apply", run, {"multiprocessing": 2.0})


def workloads(quick: bool) -> list[Workload]:
    scale = QUICK_SCALE if quick else 1
    chosen = [big_results(32, 8 * MIB)]
    if not quick:
        chosen.append(big_results(8, 64 * MIB))
    chosen += [
        big_arguments(32, 8 * MIB),
        chain(QUICK_CHAIN_STAGES if quick else CHAIN_STAGES, 64 * MIB),
        small_map(SMALL_MAP // scale),
        small_async(SMALL_ASYNC // scale),
        small_sequential(SMALL_SEQUENTIAL // scale),
    ]
    return chosen


# -- measuring -------------------------------------------------------------

def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "samples_s": seconds}


def bench_workload(w: Workload, ctx, repeats: int, timeout: float) -> dict:
    faulthandler.dump_traceback_later(timeout, exit=True)    # a hang: tracebacks, exit
    runners = [cls(ctx) for cls in RUNNERS]
    startup, shutdown, problems = {}, {}, {}
    samples = {r.name: [] for r in runners}
    try:
        for r in runners:
            startup[r.name] = r.start()
        for r in runners:
            w.run(r)                                         # warm-up, not reported
        for rep in range(repeats):
            for r in runners[rep % 3:] + runners[:rep % 3]:
                samples[r.name].append(w.run(r))
        for r in runners:
            if found := r.problems():
                problems[r.name] = found
    finally:
        for r in reversed(runners):
            shutdown[r.name] = r.stop()
        if w.cleanup is not None:
            w.cleanup()
        faulthandler.cancel_dump_traceback_later()
    results = {name: summary(s) for name, s in samples.items()}
    shm = results["shmpool"]["median_s"]
    ratios = {"multiprocessing": results["multiprocessing"]["median_s"] / shm,
              "ProcessPoolExecutor": results["ProcessPoolExecutor"]["median_s"] / shm}
    return {"key": w.key, "label": w.label, "results": results, "ratios": ratios,
            "targets": w.targets, "startup_s": startup, "shutdown_s": shutdown,
            "problems": problems}


# -- report ----------------------------------------------------------------

def time_cell(r: dict) -> str:
    return f"{r['median_s']:.3g} ({r['min_s']:.3g}–{r['max_s']:.3g})"


def print_table(rows: list[dict]) -> None:
    print("| workload | shmpool (s) | multiprocessing (s) | ProcessPoolExecutor (s) "
          "| mp/shmpool | ppe/shmpool |")
    print("|:---|---:|---:|---:|---:|---:|")
    for row in rows:
        res, rat = row["results"], row["ratios"]
        print(f"| {row['label']} | {time_cell(res['shmpool'])} "
              f"| {time_cell(res['multiprocessing'])} "
              f"| {time_cell(res['ProcessPoolExecutor'])} "
              f"| {rat['multiprocessing']:.3g}x | {rat['ProcessPoolExecutor']:.3g}x |")


def lifecycle(rows: list[dict]) -> dict:
    """Start-up and shutdown seconds of every pool started, per library."""
    out = {}
    for lib in LIBRARIES:
        starts = [row["startup_s"][lib] for row in rows if lib in row["startup_s"]]
        stops = [row["shutdown_s"][lib] for row in rows if row["shutdown_s"].get(lib) is not None]
        out[lib] = {"startup": summary(starts), "shutdown": summary(stops)}
    return out


def print_lifecycle(life: dict) -> None:
    count = len(next(iter(life.values()))["startup"]["samples_s"])
    print(f"\nPool lifecycle, median (min–max) over the {count} pools of each library "
          f"(start-up: constructor to the answer of a first trivial task; "
          f"shutdown: close + join):\n")
    print("| pool | start-up (s) | shutdown (s) |")
    print("|:---|---:|---:|")
    for lib, r in life.items():
        print(f"| {lib} | {time_cell(r['startup'])} | {time_cell(r['shutdown'])} |")


def targets(rows: list[dict]) -> list[dict]:
    found = []
    for row in rows:
        for lib, goal in row["targets"].items():
            ratio = row["ratios"][lib]
            found.append({"workload": row["label"], "versus": lib, "ratio": ratio,
                          "goal": goal, "met": ratio >= goal})
    return found


def print_targets(found: list[dict]) -> None:
    short = {"multiprocessing": "mp", "ProcessPoolExecutor": "ppe"}
    met = sum(t["met"] for t in found)
    print(f"\nTargets (ratio of medians, other/shmpool), {met} of {len(found)} met:")
    for t in found:
        verdict = "met" if t["met"] else "MISSED"
        print(f"- {t['workload']}: {short[t['versus']]}/shmpool {t['ratio']:.3g}x "
              f"(target >= {t['goal']:g}x): {verdict}")


def own_names_in_dev_shm() -> set[str]:
    """Names this process created that are still in /dev/shm."""
    return {n for n in testing.live_names() if f"/shmp_{os.getpid()}_" in n}


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPEATS} repeats; 32 × 8 MiB results, big arguments, "
                             f"a chain of {QUICK_CHAIN_STAGES}, small tasks / {QUICK_SCALE}")
    parser.add_argument("--repeats", type=int,
                        help=f"timed repeats per workload (default {REPEATS}, "
                             f"--quick {QUICK_REPEATS})")
    parser.add_argument("--start-method", default="fork",
                        choices=multiprocessing.get_all_start_methods(),
                        help="start method of all three pools (default: fork)")
    parser.add_argument("--only", metavar="KEY", action="append",
                        help="run only the workloads whose key contains KEY (repeatable)")
    parser.add_argument("--timeout", type=float, default=WORKLOAD_TIMEOUT,
                        help="seconds a workload may take before it counts as hung: "
                             "tracebacks are dumped and the run exits")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    ctx = multiprocessing.get_context(args.start_method)

    chosen = workloads(args.quick)
    if args.only:
        chosen = [w for w in chosen if any(k in w.key for k in args.only)]
    print(f"{WORKERS} workers per pool, start method {args.start_method!r}, "
          f"{repeats} repeats; pid {os.getpid()}, cpus {os.cpu_count()}, "
          f"load average {load()}", flush=True)
    rows = []
    for w in chosen:
        begin = time.perf_counter()
        rows.append(bench_workload(w, ctx, repeats, args.timeout))
        print(f"  {w.label}: done in {time.perf_counter() - begin:.1f} s", flush=True)

    print(f"\nTimes: median (min–max) of {repeats} repeats, wall seconds per workload run.\n")
    print_table(rows)
    life = lifecycle(rows)
    print_lifecycle(life)
    found = targets(rows)
    print_targets(found)
    print(f"\nload average at the end: {load()}")

    warnings = [f"{row['label']}, {lib}: {p}"
                for row in rows for lib, problems in row["problems"].items() for p in problems]
    for line in warnings:
        print(f"WARNING: {line}")
    trouble = []
    children = multiprocessing.active_children()
    if children:
        trouble.append(f"worker processes still alive: {[c.pid for c in children]}")
    leftovers = own_names_in_dev_shm()
    if leftovers:
        trouble.append(f"LEAK: left in /dev/shm: {sorted(leftovers)}")
    for line in trouble:
        print(f"PROBLEM: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "repeats": repeats, "workers": WORKERS,
                       "start_method": args.start_method, "workloads": rows,
                       "lifecycle": life, "targets": found, "warnings": warnings,
                       "problems": trouble}, f, indent=2)
    if trouble:
        sys.exit(1)


if __name__ == "__main__":
    main()
