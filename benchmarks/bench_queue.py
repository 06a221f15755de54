"""Wall time of shmpool's queues against multiprocessing's, side by side.

What is measured, in one run, for four queues (``shmpool.Queue``,
``multiprocessing.Queue``, ``shmpool.SimpleQueue``,
``multiprocessing.SimpleQueue``; one start method for all, ``fork`` unless
``--start-method`` says otherwise):

a. throughput: a producer process puts 64 arrays of 8 MiB (int64, every
   element written by ``np.full`` inside the timed region: the work
   itself), the parent gets them, checks the first element of each and
   drops it.  Timed from the parent's "go" to the last ``get``.
b. ping-pong: 10,000 rounds of a tiny message (an int) put by the parent
   on one queue, echoed back by a child on a second queue.

How: per workload and queue kind, one child process is started and serves
the warm-up and every repeat (process start-up is not timed).  The four
kinds take turns repeat after repeat, in a rotating order, so that a noisy
moment of the machine hits them alike.  Reported: the median wall time with
the min-max range, the ratio of the multiprocessing median to shmpool's
for the same kind, and whether each target is met (throughput at least
10x, ping-pong no slower).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

import shmpool
from shmpool import testing

MIB = 1024 * 1024
ITEMS, ITEM_BYTES = 64, 8 * MIB
ROUNDS = 10_000
REPEATS, QUICK_REPEATS = 7, 3
KINDS = ("shmpool.Queue", "multiprocessing.Queue",
         "shmpool.SimpleQueue", "multiprocessing.SimpleQueue")
PEER = {"shmpool.Queue": "multiprocessing.Queue",
        "shmpool.SimpleQueue": "multiprocessing.SimpleQueue"}
TARGETS = {"throughput": 10.0, "ping-pong": 1.0}


def make_queue(kind: str, ctx):
    library, cls = kind.split(".")
    if library == "shmpool":
        return getattr(shmpool.get_context(ctx.get_start_method()), cls)()
    return getattr(ctx, cls)()


# -- children (module level, for spawn) ------------------------------------

def produce(items, go, count: int, nbytes: int) -> None:
    while go.get() is not None:
        for i in range(count):
            items.put(np.full(nbytes // 8, i, dtype=np.int64))


def echo(requests, answers) -> None:
    while (x := requests.get()) is not None:
        answers.put(x)


# -- workloads ---------------------------------------------------------------

class Throughput:
    name = "throughput"

    def __init__(self, kind: str, ctx, count: int) -> None:
        self.items, self.go, self.count = make_queue(kind, ctx), ctx.SimpleQueue(), count
        self.child = ctx.Process(target=produce, args=(self.items, self.go, count, ITEM_BYTES),
                                 daemon=True)
        self.child.start()

    def run(self) -> None:
        self.go.put(True)
        for i in range(self.count):
            arr = self.items.get()
            if arr[0] != i:
                raise RuntimeError(f"item {i} arrived as {arr[0]}")
            del arr

    def stop(self) -> None:
        self.go.put(None)
        self.child.join()
        self.items.close()


class PingPong:
    name = "ping-pong"

    def __init__(self, kind: str, ctx, rounds: int) -> None:
        self.requests, self.answers = make_queue(kind, ctx), make_queue(kind, ctx)
        self.rounds = rounds
        self.child = ctx.Process(target=echo, args=(self.requests, self.answers), daemon=True)
        self.child.start()

    def run(self) -> None:
        for i in range(self.rounds):
            self.requests.put(i)
            if self.answers.get() != i:
                raise RuntimeError(f"round {i} answered wrongly")

    def stop(self) -> None:
        self.requests.put(None)
        self.child.join()
        self.requests.close()
        self.answers.close()


def bench(workload, size: int, ctx, repeats: int) -> dict[str, list[float]]:
    runners = {kind: workload(kind, ctx, size) for kind in KINDS}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for runner in runners.values():
            runner.run()                                   # warm-up
        for r in range(repeats):
            order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
            for kind in order:
                start = time.perf_counter()
                runners[kind].run()
                times[kind].append(time.perf_counter() - start)
    finally:
        for runner in runners.values():
            runner.stop()
    return times


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def report(name: str, unit: str, per: int, times: dict[str, list[float]]) -> list[dict]:
    print(f"\n{name} ({unit}, median (min-max) of {len(times[KINDS[0]])} repeats)")
    rows = []
    for kind in KINDS:
        s = {k: v * 1e3 / per for k, v in summary(times[kind]).items()}
        line = f"  {kind:30s} {s['median']:9.3f} ({s['min']:.3f}-{s['max']:.3f})"
        row = {"workload": name, "queue": kind, **{f"{k}_ms": v for k, v in s.items()}}
        if kind in PEER:
            ratio = statistics.median(times[PEER[kind]]) / statistics.median(times[kind])
            met = ratio >= TARGETS[name]
            line += f"   {PEER[kind]}/{kind} = {ratio:.2f}x (target >= {TARGETS[name]:g}x: " \
                    f"{'met' if met else 'MISSED'})"
            row.update(ratio=ratio, target=TARGETS[name], met=met)
        print(line)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1/10 of the rounds")
    parser.add_argument("--start-method", default="fork")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    ctx = multiprocessing.get_context(args.start_method)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    rounds = ROUNDS // 10 if args.quick else ROUNDS
    before = testing.live_names()
    print(f"queues, start method {args.start_method}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}")
    rows = report("throughput", f"ms for {ITEMS} x {ITEM_BYTES // MIB} MiB", 1,
                  bench(Throughput, ITEMS, ctx, repeats))
    rows += report("ping-pong", "us per round trip", rounds // 1000,
                   bench(PingPong, rounds, ctx, repeats))
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")
    left = testing.leaked_names(since=before, timeout=5.0)
    if left:
        print(f"LEAK: left in /dev/shm: {sorted(left)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"start_method": args.start_method, "repeats": repeats, "rounds": rounds,
                       "rows": rows}, f, indent=2)
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    main()
