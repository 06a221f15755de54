"""W1-W10: what each timed run does.

A workload is one or more *figures*; a figure is what one table row per peer
reports.  ``figure.session(peer)`` is a context manager: it prepares what
the peer needs (not timed) and yields ``run()``, one timed run returning
``{"seconds": ...}`` (W5 also returns memory).  Every run checks its
answers, at least the first and last element of each array, so that no peer
is timed doing less; arrays are dropped only after the clock stops.

- W1 big results: ``map(make_array, specs, chunksize=1)``; each task returns
  a fresh float32 array written with ``np.full`` (not zeros: untouched zero
  pages would flatter every copy).
- W2 big arguments: ``map(ends_sum, arrays, chunksize=1)`` over float32
  arrays made for each run (outside the clock), so that no library can
  reuse what it sent in an earlier run; each task answers a float.
- W3 small tasks: ``map(inc, range(n))`` with the chunksize
  ``multiprocessing.Pool.map`` picks, given to every peer (joblib batches
  by itself); ``apply_async`` of every item, then every ``get``; ``apply``
  one after another.
- W4 queues: a child puts arrays made with ``np.full`` inside the timed
  region, the parent gets them (throughput); and a tiny int echoed by a
  child through a second queue (latency, per round trip).
- W5 held memory: W1's results read whole and held; the parent's growth of
  RssAnon and RssShmem from before the run (after ``malloc_trim``) to while
  it holds them.
- W6 a chain: the first task makes an array, each later one returns
  ``a + 1`` of the previous result (Ray tasks pass the ObjectRef on).
- W7 scaling: W1's first size with 1, 2 and 4 workers.
- W8 in place: W2's arguments, but each task normalises its whole argument
  in place (``a -= a.mean()``) before reading its ends, as code written for
  ``multiprocessing`` does.  A peer that hands out read-only arrays (Ray,
  shmpool with ``readonly=True``) pays the explicit copy it needs.
- W9 a shared argument: ``map(partial(shared_ends, arr), range(n),
  chunksize=1)``, one array made for each run (outside the clock) and given
  to every task of the map.
- W10 store pressure: W1's first size into a pool whose store holds only a
  quarter of the results (``shmpool-small-store``) beside one whose store
  holds them all: the results past the store's room go in-band.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import system, tasks
from .measure import check

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``QUICK`` trades size for time."""

    results: tuple = ((32, 8 * MIB), (8, 64 * MIB))
    arguments: tuple = ((32, 8 * MIB), (8, 64 * MIB))
    map_items: int = 100_000
    async_tasks: int = 10_000
    sequential: int = 1_000
    queue_items: tuple = (64, 8 * MIB)
    rounds: int = 1_000
    held: tuple = (32, 8 * MIB)
    chain: tuple = (10, 64 * MIB)
    scaling: tuple = (32, 8 * MIB)
    scaling_workers: tuple = (1, 2, 4)
    in_place: tuple = ((32, 8 * MIB),)
    shared: tuple = (16, 32 * MIB)


FULL = Sizes()
QUICK = Sizes(results=((16, 8 * MIB), (4, 64 * MIB)), arguments=((16, 8 * MIB),),
              map_items=10_000, async_tasks=1_000, sequential=100,
              queue_items=(16, 8 * MIB), rounds=200, held=(16, 8 * MIB),
              chain=(4, 16 * MIB), scaling=(16, 8 * MIB), in_place=((16, 8 * MIB),),
              shared=(16, 32 * MIB))


@dataclass
class Figure:
    key: str                 #: unique, e.g. "W1 32x8MiB"
    group: str               #: W1 .. W7
    label: str               #: what the table says
    op: str                  #: what a peer must have: map, apply_async, apply, queue
    session: Callable        #: session(peer) -> context manager yielding run()
    payload_bytes: int = 0   #: bytes moved by one run (for GB/s), 0 if not a transfer
    per: int = 1             #: the unit of a run: seconds / per (a round trip)
    workers: int = 0         #: its own worker count (W7), 0: the run's
    held_bytes: int = 0      #: W5: bytes of results held
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "queue" if self.op == "queue" else "pool"


def size(count: int, nbytes: int) -> str:
    return f"{count} × {nbytes // MIB} MiB"


def pool_chunksize(n: int, workers: int) -> int:
    """The chunksize ``multiprocessing.Pool.map`` picks for *n* items."""
    chunksize, extra = divmod(n, workers * 4)
    return chunksize + bool(extra)


def _session(make_run):
    """A session that needs no preparation: yields ``make_run(peer)``."""
    @contextlib.contextmanager
    def session(peer):
        yield make_run(peer)
    return session


def _ends(arr) -> tuple[float, float]:
    return float(arr[0]), float(arr[-1])


# -- W1, W7 ------------------------------------------------------------------

def big_results(count: int, nbytes: int, group: str = "W1", workers: int = 0,
                op: str = "map") -> Figure:
    """*op* "pressure": the same map, through a peer's ``pressure`` method."""
    map_name = "map" if op == "map" else op
    specs = [(i + 0.5, nbytes) for i in range(count)]
    expected = [(v, v) for v, _ in specs]

    def make_run(peer):
        def run() -> dict:
            begin = time.perf_counter()
            results = getattr(peer, map_name)(tasks.make_array, specs, 1)
            ends = [_ends(r) for r in results]
            elapsed = time.perf_counter() - begin
            check(ends == expected and all(r.nbytes == nbytes for r in results),
                  f"{peer.key}: wrong results")
            del results
            return {"seconds": elapsed}
        return run

    key = f"{group} {count}x{nbytes // MIB}MiB" + (f" {workers}w" if workers else "")
    label = f"{size(count, nbytes)} results"
    if workers:
        label += f", {workers} worker" + ("s" if workers > 1 else "")
    if op == "pressure":
        label += ", held, into a store with room for a quarter"
    return Figure(key, group, label, op, _session(make_run), count * nbytes,
                  workers=workers, extra={"count": count, "nbytes": nbytes})


# -- W2 ----------------------------------------------------------------------

def big_arguments(count: int, nbytes: int, group: str = "W2") -> Figure:
    """W2, and W8 (*group*): the same arguments, each task either reads its
    ends or normalises the whole argument in place first."""
    task = tasks.ends_sum if group == "W2" else tasks.normalise_in_place
    expected = [2 * i + 0.5 for i in range(count)]
    if group == "W8":        # x - mean(x): i + 0.5 - mean and i - mean
        expected = [task(_argument(i, nbytes)) for i in range(count)]

    def fresh_arrays() -> list[np.ndarray]:
        return [_argument(i, nbytes) for i in range(count)]

    def make_run(peer):
        def run() -> dict:
            arrays = fresh_arrays()
            begin = time.perf_counter()
            answers = peer.map(task, arrays, 1)
            elapsed = time.perf_counter() - begin
            check(answers == expected, f"{peer.key}: wrong answers")
            del arrays
            return {"seconds": elapsed}
        return run

    label = "arguments" if group == "W2" else "arguments, each normalised in place by its worker"
    return Figure(f"{group} {count}x{nbytes // MIB}MiB", group,
                  f"{size(count, nbytes)} {label}", "map", _session(make_run), count * nbytes)


def _argument(i: int, nbytes: int) -> np.ndarray:
    arr = np.full(nbytes // 4, i + 0.5, dtype=np.float32)
    arr[-1] = i
    return arr


# -- W9 ----------------------------------------------------------------------

def shared_argument(count: int, nbytes: int) -> Figure:
    expected = [2 * 0.5 + i for i in range(count)]

    def make_run(peer):
        def run() -> dict:
            arr = np.full(nbytes // 4, 0.5, dtype=np.float32)   # fresh: nothing reusable
            begin = time.perf_counter()
            answers = peer.map(functools.partial(tasks.shared_ends, arr), range(count), 1)
            elapsed = time.perf_counter() - begin
            check(answers == expected, f"{peer.key}: wrong answers")
            del arr
            return {"seconds": elapsed}
        return run

    return Figure(f"W9 shared {count}x{nbytes // MIB}MiB", "W9",
                  f"one {nbytes // MIB} MiB array shared by {count} tasks", "map",
                  _session(make_run), nbytes)


# -- W3 ----------------------------------------------------------------------

def _total(n: int) -> int:
    return n * (n + 1) // 2          # sum of inc(i) for i in range(n)


def small_map(n: int, chunksize: int | None = None) -> Figure:
    """*chunksize* None: the one ``multiprocessing.Pool.map`` picks."""
    def make_run(peer):
        def run() -> dict:
            begin = time.perf_counter()
            out = peer.map(tasks.inc, range(n), chunksize or pool_chunksize(n, peer.workers))
            elapsed = time.perf_counter() - begin
            check(len(out) == n and out[0] == 1 and sum(out) == _total(n),
                  f"{peer.key}: wrong map")
            return {"seconds": elapsed}
        return run

    if chunksize is None:
        return Figure(f"W3 map {n}", "W3", f"map over {n:,} ints", "map", _session(make_run))
    return Figure(f"W3 map {n} chunksize {chunksize}", "W3",
                  f"map over {n:,} ints, chunksize {chunksize}", "map", _session(make_run))


def small_async(n: int) -> Figure:
    def make_run(peer):
        def run() -> dict:
            begin = time.perf_counter()
            out = peer.apply_async(tasks.inc, range(n))
            elapsed = time.perf_counter() - begin
            check(len(out) == n and sum(out) == _total(n), f"{peer.key}: wrong apply_async")
            return {"seconds": elapsed}
        return run

    return Figure(f"W3 apply_async {n}", "W3", f"{n:,} apply_async, then get", "apply_async",
                  _session(make_run))


def small_sequential(n: int) -> Figure:
    def make_run(peer):
        def run() -> dict:
            total = 0
            begin = time.perf_counter()
            for i in range(n):
                total += peer.apply(tasks.inc, i)
            elapsed = time.perf_counter() - begin
            check(total == _total(n), f"{peer.key}: wrong apply")
            return {"seconds": elapsed}
        return run

    return Figure(f"W3 apply {n}", "W3", f"{n:,} sequential apply", "apply",
                  _session(make_run))


# -- W4 ----------------------------------------------------------------------

@contextlib.contextmanager
def _child_on_queues(peer, target, *args, stop: int):
    """Two queues of *peer* and a child running ``target(q0, q1, *args)``;
    on the way out, None on queue *stop* ends the child."""
    queues = (peer.queue(), peer.queue())
    child = peer.spawn(target, *queues, *args)
    try:
        yield queues
    finally:
        queues[stop].put(None)
        peer.join(child)
        for q in queues:
            peer.close(q)


def queue_throughput(count: int, nbytes: int) -> Figure:
    @contextlib.contextmanager
    def session(peer):
        with _child_on_queues(peer, tasks.produce, count, nbytes, stop=1) as (items, go):
            def run() -> dict:
                ends = []
                begin = time.perf_counter()
                go.put(True)
                for _ in range(count):
                    arr = items.get()
                    ends.append(_ends(arr))
                    del arr
                elapsed = time.perf_counter() - begin
                check(ends == [(i, i) for i in range(count)], f"{peer.key}: wrong items")
                return {"seconds": elapsed}
            yield run

    return Figure(f"W4 queue {count}x{nbytes // MIB}MiB", "W4",
                  f"queue: {size(count, nbytes)} arrays", "queue", session, count * nbytes)


def queue_latency(rounds: int) -> Figure:
    @contextlib.contextmanager
    def session(peer):
        with _child_on_queues(peer, tasks.echo, stop=0) as (requests, answers):
            def run() -> dict:
                wrong = 0
                begin = time.perf_counter()
                for i in range(rounds):
                    requests.put(i)
                    wrong += answers.get() != i
                elapsed = time.perf_counter() - begin
                check(not wrong, f"{peer.key}: {wrong} rounds answered wrongly")
                return {"seconds": elapsed}
            yield run

    return Figure(f"W4 ping-pong {rounds}", "W4", "queue: tiny message round trip",
                  "queue", session, per=rounds)


# -- W5 ----------------------------------------------------------------------

def held_memory(count: int, nbytes: int) -> Figure:
    specs = [(i + 0.5, nbytes) for i in range(count)]

    def make_run(peer):
        def run() -> dict:
            gc.collect()
            system.malloc_trim()
            before = system.rss()
            begin = time.perf_counter()
            results = peer.map(tasks.make_array, specs, 1)
            elapsed = time.perf_counter() - begin
            whole = [float(r.min()) == float(r.max()) == v            # reads every page
                     for r, (v, _) in zip(results, specs)]
            holding = system.rss()
            check(all(whole) and len(whole) == count, f"{peer.key}: wrong results")
            del results
            return {"anon_bytes": holding.anon - before.anon,
                    "shmem_bytes": holding.shmem - before.shmem, "seconds": elapsed}
        return run

    return Figure(f"W5 held {count}x{nbytes // MIB}MiB", "W5",
                  f"memory while holding {size(count, nbytes)} results", "map",
                  _session(make_run), held_bytes=count * nbytes)


# -- W6 ----------------------------------------------------------------------

def chain(stages: int, nbytes: int) -> Figure:
    last = 0.5 + stages - 1

    def make_run(peer):
        def run() -> dict:
            begin = time.perf_counter()
            x = peer.chain(tasks.make_array, (0.5, nbytes), tasks.add_one, stages)
            ends = _ends(x)
            elapsed = time.perf_counter() - begin
            check(ends == (last, last) and x.nbytes == nbytes, f"{peer.key}: wrong chain")
            del x
            return {"seconds": elapsed}
        return run

    return Figure(f"W6 chain {stages}x{nbytes // MIB}MiB", "W6",
                  f"chain of {stages} × {nbytes // MIB} MiB results", "apply",
                  _session(make_run), stages * nbytes)


# -- all of them -------------------------------------------------------------

GROUPS = {
    "W1": "big results",
    "W2": "big arguments",
    "W3": "small tasks",
    "W4": "queues",
    "W5": "the parent's memory while it holds results",
    "W6": "a chain of big results",
    "W7": "scaling with the number of workers",
    "W8": "a worker normalises its argument in place",
    "W9": "one big argument shared by every task of a map",
    "W10": "big results into a store too small for them",
}


def figures(sizes: Sizes) -> list[Figure]:
    """Every figure of a run, W1 to W10, in the order they are measured."""
    found = [big_results(c, n) for c, n in sizes.results]
    found += [big_arguments(c, n) for c, n in sizes.arguments]
    found += [small_map(sizes.map_items), small_async(sizes.async_tasks),
              small_sequential(sizes.sequential)]
    found += [queue_throughput(*sizes.queue_items), queue_latency(sizes.rounds)]
    found += [held_memory(*sizes.held), chain(*sizes.chain)]
    found += [big_results(*sizes.scaling, group="W7", workers=w) for w in sizes.scaling_workers]
    found += [big_arguments(c, n, group="W8") for c, n in sizes.in_place]
    found += [shared_argument(*sizes.shared),
              big_results(*sizes.results[0], group="W10", op="pressure")]
    return found
