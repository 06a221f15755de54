"""The command line of every per-area script (``bench_pool.py``,
``bench_executor.py``, ``bench_queue.py``): some of the suite's figures, on
some of its peers, measured and reported by the suite's own code.  Only the
choice of figures and peers is the script's."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from . import report, suite, workloads


@dataclass(frozen=True)
class Area:
    """What one per-area script measures."""

    description: str
    groups: tuple[str, ...]                          #: the suite's figures, by group
    peers: tuple[str, ...]                           #: peer keys; mp-fork or mp-queue first
    extra: Callable[[workloads.Sizes], list] = lambda sizes: []   #: figures of its own


AREAS = {
    "pool": Area("shmpool.Pool against multiprocessing.Pool and ProcessPoolExecutor: "
                 "W1, W2, W3 and W6",
                 ("W1", "W2", "W3", "W6"), ("shmpool", "mp-fork", "cf-executor")),
    "executor": Area("shmpool.ProcessPoolExecutor against concurrent.futures' (and "
                     "multiprocessing.Pool, the reference): W1, W2, W3, and a map with the "
                     "executor's default chunksize=1",
                     ("W1", "W2", "W3"), ("shmpool-executor", "mp-fork", "cf-executor"),
                     lambda sizes: [workloads.small_map(sizes.map_items, chunksize=1)]),
    "queue": Area("shmpool's Queue and SimpleQueue against multiprocessing's: W4",
                  ("W4",), ("shmpool-queue", "mp-queue", "shmpool-simplequeue",
                            "mp-simplequeue")),
}


def main(name: str, argv: Sequence[str] | None = None) -> int:
    """Measure the figures of area *name* on its peers; print the summary
    and the target checks.  The exit status is 1 if the run left a process
    or a shared-memory name behind."""
    this = AREAS[name]
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = f"python -m benchmarks.bench_{name}"
    parser = argparse.ArgumentParser(prog=prog, description=this.description)
    parser.add_argument("--quick", action="store_true",
                        help=f"{suite.QUICK_REPEATS} repeats and the suite's smaller counts "
                             f"(the full run has {suite.REPEATS} repeats)")
    parser.add_argument("--repeats", type=int, help="timed runs per figure and peer")
    parser.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    parser.add_argument("--timeout", type=float, default=suite.FIGURE_TIMEOUT,
                        help="seconds a figure may take before it counts as hung: every "
                             "thread's traceback is dumped and the run exits")
    parser.add_argument("--out", metavar="DIR",
                        help="also write results.md, results.json and chart.png there")
    args = parser.parse_args(argv)
    args.only, args.peers = list(this.groups), list(this.peers)
    sizes = suite.sizes(args.quick)
    chosen = [f for f in workloads.figures(sizes) if f.group in this.groups] + this.extra(sizes)
    results = suite.run(args, " ".join([prog, *argv]), chosen)
    if args.out:
        for note in report.write_all(results, args.out):
            print(f"note: {note}")
    print(report.summary_text(results))
    return 1 if results["problems"] else 0
