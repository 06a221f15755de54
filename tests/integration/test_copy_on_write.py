"""Received values are writable with page copy-on-write, in every process.

Each case: the write works, other readers and later gets still see the
original bytes, and sending a written view sends the written value.
"""

import numpy as np
import pandas as pd
import pytest

import shmpool
from conftest import DEADLOCK_TIMEOUT
from shmpool import testing

KiB, MiB = 1024, 1024 * 1024


# -- task functions (module level, for spawn) -------------------------------

def normalise_in_place(tile):
    tile -= tile.mean()
    return tile


def scale_in_place(arr):
    arr /= 255
    np.clip(arr, 0, 1, out=arr)
    return arr


def total(value):
    return float(np.asarray(value).sum())


def make_grid(n):
    return np.arange(n * n, dtype=np.float64).reshape(n, n)


def make_frame(rows):
    return pd.DataFrame({"a": np.arange(rows, dtype=np.float64),
                         "b": np.arange(rows, dtype=np.int64) % 7})


def edit_frame(df):
    df.loc[df["b"] == 3, "a"] = -1.0
    df.iloc[0, 0] = 42.0
    df.at[1, "b"] = 99
    return df


def frame_sums(df):
    return float(df["a"].sum()), int(df["b"].sum())


def _put_back_written(q_in, q_out):
    arr = q_in.get()                     # SimpleQueue.get takes no timeout
    arr[:1000] = -1.0                    # the child's write, sent back
    q_out.put(arr)


# -- tests ------------------------------------------------------------------

def test_worker_writes_its_argument_in_place(mp_context):
    tile = np.random.default_rng(0).random((256, 256)) * 255     # 512 KiB
    with shmpool.Pool(2, context=mp_context) as pool:
        store = testing.pool_store(pool)
        shared = store.get(store.put(tile))      # one store object, read by every task
        results = pool.map(normalise_in_place, [shared] * 4, chunksize=1)
        for result in results:               # no task saw another's write
            np.testing.assert_allclose(result, tile - tile.mean())
        np.testing.assert_array_equal(shared, tile)
        scaled = pool.apply(scale_in_place, (shared,))
        np.testing.assert_allclose(scaled, np.clip(tile / 255, 0, 1))
        np.testing.assert_array_equal(shared, tile)
        del shared, results, scaled


def test_executor_worker_writes_its_argument_in_place(mp_context):
    arr = np.full(64 * KiB, 510.0)                                  # 512 KiB
    with shmpool.ProcessPoolExecutor(2, mp_context=mp_context) as executor:
        got = executor.submit(scale_in_place, arr).result(DEADLOCK_TIMEOUT)
        assert (got == 1.0).all() and (arr == 510.0).all()
        del got


def test_caller_writes_results_and_sends_the_written_value(mp_context):
    with shmpool.Pool(2, context=mp_context) as pool:
        store = testing.pool_store(pool)
        result = pool.apply(make_grid, (256,))                     # 512 KiB
        assert testing.in_store(store, result) and result.flags.writeable
        original = store.put(result)          # untouched: referenced, no copy
        result += 1
        result[0, 0] = 0
        expected = make_grid(256) + 1
        expected[0, 0] = 0
        np.testing.assert_array_equal(result, expected)
        np.testing.assert_array_equal(store.get(original), make_grid(256))
        assert pool.apply(total, (result,)) == float(expected.sum())
        assert pool.apply(total, (store.get(original),)) == float(make_grid(256).sum())
        del result


def test_pandas_frames_are_writable_on_both_sides(mp_context):
    rows = 40_000                                                  # 640 KiB
    base = make_frame(rows)
    want = edit_frame(make_frame(rows))
    with shmpool.Pool(2, context=mp_context) as pool:
        store = testing.pool_store(pool)
        df = pool.apply(make_frame, (rows,))
        original = store.put(df)
        edit_frame(df)                               # .loc, .iloc, .at in the caller
        pd.testing.assert_frame_equal(df, want)
        pd.testing.assert_frame_equal(store.get(original), base)
        assert pool.apply(frame_sums, (df,)) == frame_sums(want)
        edited = pool.apply(edit_frame, (store.get(original),))   # in the worker
        pd.testing.assert_frame_equal(edited, want)
        pd.testing.assert_frame_equal(store.get(original), base)
        del df, edited


def test_arrow_backed_column_is_writable():
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"a": pd.array(np.arange(100_000), dtype="int64[pyarrow]")})
    with shmpool.ObjectStore(64 * MiB) as store:
        ref = store.put(df)
        got = store.get(ref)
        got.loc[np.arange(len(got)) % 2 == 0, "a"] = -1
        got.iloc[1, 0] = 7
        assert got["a"].iloc[0] == -1 and got["a"].iloc[1] == 7
        pd.testing.assert_frame_equal(store.get(ref), df)
        again = store.get(store.put(got))
        pd.testing.assert_frame_equal(again, got)
        del got, again


@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue"])
def test_queue_items_are_writable_and_sent_as_written(mp_context, kind):
    ctx = shmpool.get_context(mp_context.get_start_method())
    q_in, q_out = getattr(ctx, kind)(), getattr(ctx, kind)()
    arr = np.arange(128 * KiB, dtype=np.float64)                  # 1 MiB
    child = mp_context.Process(target=_put_back_written, args=(q_in, q_out))
    child.start()
    try:
        q_in.put(arr)
        back = q_out.get() if kind == "SimpleQueue" else q_out.get(timeout=DEADLOCK_TIMEOUT)
        assert (back[:1000] == -1.0).all()
        np.testing.assert_array_equal(back[1000:], arr[1000:])
        back *= 2                                      # and writable here too
        q_in.put(back)
        again = q_in.get() if kind == "SimpleQueue" else q_in.get(timeout=DEADLOCK_TIMEOUT)
        np.testing.assert_array_equal(again, back)
        del back, again
    finally:
        child.join(DEADLOCK_TIMEOUT)
    assert child.exitcode == 0
    q_in.close()
    q_out.close()


def test_read_only_pool_keeps_sealed_views(mp_context):
    with shmpool.Pool(1, context=mp_context, readonly=True) as pool:
        result = pool.apply(make_grid, (256,))
        assert not result.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            result[0, 0] = 1
        with pytest.raises(ValueError, match="read-only"):
            pool.apply(normalise_in_place, (result,))
        mine = shmpool.writable(result)
        mine += 1
        assert pool.apply(total, (mine,)) == float(make_grid(256).sum() + 256 * 256)
        del result
