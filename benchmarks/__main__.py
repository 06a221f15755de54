"""python -m benchmarks: shmpool against every installed peer, W1-W10.

Run from the repository root::

    python -m benchmarks [--quick] [--only W1,W4] [--peers shmpool,mp-fork]
                         [--workers N] [--repeats N] [--out benchmarks/results]
                         [--notes NOTE.md] [--redraw results.json]

Writes ``results.md``, ``results.json`` and ``chart.png`` under ``--out``,
then prints the summary tables and the target checks.  The exit status is
1 if the run left a process or a shared-memory name behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import peers, report, suite, targets, workloads
from .suite import FIGURE_TIMEOUT, QUICK_REPEATS, REPEATS

DEFAULT_OUT = os.path.join("benchmarks", "results")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="shmpool against multiprocessing, concurrent.futures, joblib and Ray: "
                    "W1-W10 and the machine's limits, in one run.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPEATS} repeats and smaller counts (under 2 minutes "
                             f"on 2 cores); the full run has {REPEATS} repeats")
    parser.add_argument("--only", metavar="W1,W4", type=_names,
                        help="run only these workloads (W1 .. W10)")
    parser.add_argument("--peers", metavar="KEY,...", type=_names,
                        help="run only these peers: " + ", ".join(c.key for c in peers.ALL_PEERS))
    parser.add_argument("--readonly", action="store_true",
                        help="also measure shmpool's pool and queue with readonly=True, "
                             "beside the copy-on-write default, in the same run")
    parser.add_argument("--workers", type=int, default=2,
                        help="workers per pool (default 2; W7 also uses 1, 2 and 4)")
    parser.add_argument("--repeats", type=int,
                        help=f"timed runs per figure and peer (default {REPEATS}, "
                             f"--quick {QUICK_REPEATS})")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"where results.md, results.json and chart.png go "
                             f"(default {DEFAULT_OUT})")
    parser.add_argument("--timeout", type=float, default=FIGURE_TIMEOUT,
                        help="seconds a figure may take before it counts as hung: every "
                             "thread's traceback is dumped and the run exits")
    parser.add_argument("--notes", metavar="MARKDOWN",
                        help="a markdown file to close results.md with (say where the time "
                             "goes where a target is missed); kept in results.json")
    parser.add_argument("--redraw", metavar="JSON",
                        help="measure nothing: write results.md and chart.png again from "
                             "a results.json")
    args = parser.parse_args(argv)
    if args.readonly:
        chosen = args.peers or [c.key for c in peers.DEFAULT_PEERS]
        args.peers = chosen + [c.key for c in peers.READONLY_PEERS if c.key not in chosen]
    unknown = set(args.peers or ()) - {c.key for c in peers.ALL_PEERS}
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    unknown = set(args.only or ()) - set(workloads.GROUPS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.redraw:
        with open(args.redraw, encoding="utf-8") as f:
            results = json.load(f)
        results["targets"] = targets.check(results)
    else:
        results = suite.run(args, " ".join(["python -m benchmarks", *argv]))
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            results["closing_note"] = f.read()
    notes = report.write_all(results, args.out)
    print(report.summary_text(results))
    for note in notes:
        print(f"note: {note}")
    print(f"written: {', '.join(os.path.join(args.out, n) for n in report.FILES)}")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
