"""``python -m benchmarks.bench_pool``: shmpool.Pool against multiprocessing.Pool
and ProcessPoolExecutor, on the suite's workloads (``benchmarks.area``)."""

import os
import sys

if not __package__:             # run as a file: python benchmarks/bench_pool.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import area  # noqa: E402

if __name__ == "__main__":
    sys.exit(area.main("pool"))
