"""The Pool when its store is full: values fall back in-band, counted, and
a fallback waits for space only when waiting can free some."""

import warnings

import numpy as np
import pytest

import shmpool

from conftest import DEADLOCK_TIMEOUT

MiB = 1 << 20


def make_array(i):
    return np.full(MiB, float(i), dtype=np.float64)     # 8 MiB


def test_full_store_falls_back_at_once_and_counts_it():
    # 64 MiB hold a few 8 MiB results; the caller keeps every result, so
    # nothing can ever be freed: no fallback may wait its space_timeout,
    # which is longer than the deadline of the whole map.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", shmpool.StoreFullWarning)
        with shmpool.Pool(2, capacity=64 * MiB, space_timeout=2 * DEADLOCK_TIMEOUT) as pool:
            result = pool.map_async(make_array, range(32), chunksize=1)
            held = result.get(DEADLOCK_TIMEOUT)
            fallbacks = pool.statistics().store.fallbacks
    assert [a[0] for a in held] == [float(i) for i in range(32)]
    assert 0 < fallbacks < 32
