"""A map's function is encoded once per call: a big ``partial`` goes into
the store once, whatever the number of tasks, and is the value at call time."""

import functools
import os

import numpy as np

import shmpool

from conftest import DEADLOCK_TIMEOUT

MiB = 1 << 20


def scaled_sum(arr, i):
    return float(arr.sum()) * i


def test_shared_argument_is_stored_once_per_call():
    big = np.ones(4 * MiB // 8)                      # 4 MiB
    with shmpool.Pool(2) as pool:
        idle = pool.statistics().store
        assert idle.peak_in_use == idle.in_use           # a fresh store: the table only
        result = pool.map_async(functools.partial(scaled_sum, big), range(16), chunksize=1)
        assert result.get(DEADLOCK_TIMEOUT) == [float(big.size) * i for i in range(16)]
        peak = pool.statistics().store.peak_in_use - idle.in_use
        assert big.nbytes <= peak < 2 * big.nbytes   # one copy at most at once, not 16
        held = pool.statistics().held_by_process.get(os.getpid(), (0, 0))
        assert held[1] < big.nbytes                  # let go after the last answer


def test_shared_argument_is_the_value_at_call_time():
    big = np.ones(MiB)                               # 8 MiB
    with shmpool.Pool(2) as pool:
        result = pool.map_async(functools.partial(scaled_sum, big), range(8), chunksize=1)
        big[:] = 5                                   # after the call: not seen
        assert result.get(DEADLOCK_TIMEOUT) == [float(MiB) * i for i in range(8)]
        it = pool.imap(functools.partial(scaled_sum, big), range(4))
        big[:] = 7
        assert list(it) == [5.0 * MiB * i for i in range(4)]
