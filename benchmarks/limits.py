"""The machine's own limits, measured in the same run as the workloads.

- memcpy: ``np.copyto`` of 64 MiB into memory already written (warm pages):
  the fastest one copy of a payload can be.
- first touch: the same copy into fresh shared memory (an anonymous shared
  mapping, as a store's new pages are), and what the first touch adds per
  GiB over the warm copy.
- a pipe round trip: one byte to a forked child and back over two pipes:
  the least a tiny message between processes can cost.
- the work of W1: ``np.full`` of every W1 array in turn, in one process,
  as the workers do it (fresh memory each time).  W1's limit is this
  sequential time divided by the worker count, plus one warm memcpy of the
  whole payload: the work shared perfectly among the workers, and the
  payload copied once.

Every case gets the warm-up and repeats of the figures, and the cases take
turns in rotating order.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import time

import numpy as np

from .measure import repeat_in_turns
from .workloads import MIB

COPY_BYTES = 64 * MIB
PIPE_ROUNDS = 2_000
GB = 1e9


def _timed(fn) -> dict:
    begin = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - begin}


def _echo_bytes(inbound: int, outbound: int) -> None:
    """Child: send back every byte received, until a zero byte."""
    while (b := os.read(inbound, 1)) and b != b"\0":
        os.write(outbound, b)


class _PipePartner:
    """A forked child at the other end of two pipes."""

    def __init__(self) -> None:
        self.to_child = os.pipe()
        self.from_child = os.pipe()
        ctx = multiprocessing.get_context("fork")
        self.child = ctx.Process(target=_echo_bytes,
                                 args=(self.to_child[0], self.from_child[1]), daemon=True)
        self.child.start()

    def round_trips(self, rounds: int) -> None:
        send, receive = self.to_child[1], self.from_child[0]
        for _ in range(rounds):
            os.write(send, b"x")
            if os.read(receive, 1) != b"x":
                raise RuntimeError("the pipe partner answered wrongly")

    def close(self) -> None:
        os.write(self.to_child[1], b"\0")
        self.child.join()
        for fd in self.to_child + self.from_child:
            os.close(fd)


def measure(w1_sizes: list[tuple[int, int]], repeats: int, on_step) -> dict:
    """Every limit; *w1_sizes* are W1's (count, nbytes) pairs."""
    src = np.full(COPY_BYTES // 8, 1.5)
    warm = np.empty_like(src)
    warm[...] = 0.0                                    # its pages exist now

    def copy_into_fresh_shared() -> None:
        with mmap.mmap(-1, COPY_BYTES) as region:      # MAP_SHARED | MAP_ANONYMOUS
            dst = np.frombuffer(region, dtype=src.dtype)
            np.copyto(dst, src)
            del dst

    def w1_work(count: int, nbytes: int):
        def work() -> None:
            for i in range(count):
                np.full(nbytes // 4, i + 0.5, dtype=np.float32)
        return work

    partner = _PipePartner()
    try:
        cases = {
            "memcpy": lambda: _timed(lambda: np.copyto(warm, src)),
            "fresh shared copy": lambda: _timed(copy_into_fresh_shared),
            "pipe round trip": lambda: _timed(lambda: partner.round_trips(PIPE_ROUNDS)),
        }
        for count, nbytes in w1_sizes:
            cases[f"work {count}x{nbytes // MIB}MiB"] = (
                lambda fn=w1_work(count, nbytes): _timed(fn))
        found = repeat_in_turns(cases, repeats, lambda name, n: on_step(f"limits · {name}", n),
                                "measuring the machine's limits")
    finally:
        partner.close()
    memcpy = found["memcpy"]["seconds"]["median"]
    fresh = found["fresh shared copy"]["seconds"]["median"]
    return {
        "copy_bytes": COPY_BYTES,
        "memcpy": found["memcpy"]["seconds"],
        "memcpy_GBps": COPY_BYTES / memcpy / GB,
        "fresh_shared_copy": found["fresh shared copy"]["seconds"],
        "fresh_shared_copy_GBps": COPY_BYTES / fresh / GB,
        "first_touch_s_per_GiB": (fresh - memcpy) * (1024**3 / COPY_BYTES),
        "pipe_rounds": PIPE_ROUNDS,
        "pipe_round_trip": found["pipe round trip"]["seconds"],
        "pipe_round_trip_us": found["pipe round trip"]["seconds"]["median"] / PIPE_ROUNDS * 1e6,
        "w1_work": {key.removeprefix("work "): value["seconds"]
                    for key, value in found.items() if key.startswith("work ")},
    }


def w1_limit(limits: dict, count: int, nbytes: int, workers: int) -> float | None:
    """Seconds W1 would take at the machine's limit: the work shared among
    *workers*, plus one warm memcpy of the payload."""
    work = limits.get("w1_work", {}).get(f"{count}x{nbytes // MIB}MiB")
    if work is None:
        return None
    return work["median"] / workers + count * nbytes / (limits["memcpy_GBps"] * GB)
