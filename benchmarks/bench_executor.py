"""``python -m benchmarks.bench_executor``: shmpool.ProcessPoolExecutor against
concurrent.futures', on the suite's workloads (``benchmarks.area``)."""

import os
import sys

if not __package__:             # run as a file: python benchmarks/bench_executor.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import area  # noqa: E402

if __name__ == "__main__":
    sys.exit(area.main("executor"))
