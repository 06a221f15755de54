"""Every supported type round-trips through the store, zero-copy where it can."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import shmpool
from shmpool import testing

DTYPES = ["bool", "int8", "uint16", "int32", "int64", "float16", "float32", "float64",
          "complex128", "datetime64[ns]", "timedelta64[s]", "S7", "U5",
          [("a", "<i4"), ("b", "<f8")]]


_in_store = testing.in_store


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["C", "F"])
def test_arrays_of_every_dtype_and_order(store, dtype, order):
    # 6000 items: at least a page, so the array is a view, not a copy.
    arr = np.asarray(np.arange(6000).reshape(30, 40, 5) % 2, order=order).astype(
        dtype, order=order)
    ref = store.put(arr)
    got = store.get(ref)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert np.array_equal(got, arr)
    assert got.flags.writeable                      # copy-on-write
    assert _in_store(store, got)
    if order == "F":
        assert got.flags.f_contiguous


@pytest.mark.parametrize("index", [np.s_[::2], np.s_[:, ::-1], np.s_[1:, ::3, 2]])
def test_non_contiguous_arrays_arrive_equal_and_writable(store, index):
    base = np.random.default_rng(0).random((80, 60, 8))
    arr = base[index]
    got = store.get(store.put(arr))
    assert np.array_equal(got, arr)
    assert got.flags.writeable
    assert _in_store(store, got)


@pytest.mark.parametrize("dtype", ["int32", "datetime64[ns]", "S7"], ids=str)
def test_read_only_store_hands_out_read_only_arrays(dtype):
    arr = (np.arange(6000) % 2).astype(dtype)
    with shmpool.ObjectStore(16 * 1024 * 1024, readonly=True) as ro:
        got = ro.get(ro.put(arr))
        assert np.array_equal(got, arr) and not got.flags.writeable
        assert _in_store(ro, got)
        with pytest.raises(ValueError, match="read-only"):
            got[0] = got[1]
        del got


def test_transposed_array_keeps_values(store):
    arr = np.arange(12.0).reshape(3, 4).T
    assert np.array_equal(store.get(store.put(arr)), arr)


def test_object_arrays_round_trip(store):
    arr = np.array([{"a": 1}, None, "x", np.arange(3)], dtype=object)
    got = store.get(store.put(arr))
    assert got[0] == {"a": 1} and got[1] is None and got[2] == "x"
    assert np.array_equal(got[3], np.arange(3))


def test_zero_dim_and_scalar(store):
    assert store.get(store.put(np.float32(1.5))) == np.float32(1.5)
    assert store.get(store.put(np.array(7))) == 7


def test_pandas_frame_round_trips_zero_copy(store):
    df = pd.DataFrame({"x": np.arange(10_000.0), "y": np.arange(10_000),
                       "s": ["a", "b"] * 5_000})
    got = store.get(store.put(df))
    pd.testing.assert_frame_equal(got, df)
    assert _in_store(store, got["x"].to_numpy())


def test_pandas_series_and_index(store):
    s = pd.Series(np.arange(100.0), index=pd.date_range("2024-01-01", periods=100))
    pd.testing.assert_series_equal(store.get(store.put(s)), s)


@pytest.mark.parametrize("make", [
    lambda: pa.array(np.arange(10_000)),
    lambda: pa.record_batch({"a": np.arange(1000.0), "b": pa.array(["x"] * 1000)}),
    lambda: pa.table({"a": np.arange(1000), "b": np.arange(1000.0)}),
], ids=["array", "record_batch", "table"])
def test_arrow_objects_round_trip_zero_copy(store, make):
    obj = make()
    got = store.get(store.put(obj))
    assert got.equals(obj)
    first = got if isinstance(got, pa.Array) else got.column(0)
    if isinstance(first, pa.ChunkedArray):
        first = first.chunks[0]
    data = first.buffers()[1]
    assert _in_store(store, np.frombuffer(data, np.uint8))


def test_bytes_bytearray_memoryview(store):
    big = bytes(range(256)) * 4096
    assert store.get(store.put(big)) == big
    ba = bytearray(b"abc" * 1000)
    got = store.get(store.put(ba))
    assert type(got) is bytearray and got == ba
    mv = memoryview(np.arange(24, dtype=np.int32).reshape(2, 12))
    got = store.get(store.put(mv))
    assert isinstance(got, memoryview) and not got.readonly
    assert got.format == "i" and got.shape == (2, 12) and got.tolist() == mv.tolist()


def test_nested_containers_of_arrays(store):
    value = {"a": [np.ones(5), (np.zeros((2, 2)), "text")], "b": {1, 2}, "c": None}
    got = store.get(store.put(value))
    assert np.array_equal(got["a"][0], value["a"][0])
    assert np.array_equal(got["a"][1][0], value["a"][1][0])
    assert got["a"][1][1] == "text" and got["b"] == {1, 2} and got["c"] is None


def test_a_view_put_again_is_referenced_not_copied(store):
    first = store.get(store.put(np.random.default_rng(1).random(1 << 18)))
    in_use = store.statistics().in_use
    again = store.get(store.put({"same": first, "slice": first[1000:2000]}))
    grew = store.statistics().in_use - in_use
    assert grew < 64 * 1024                       # a frame, not another 2 MiB copy
    assert _in_store(store, again["same"]) and _in_store(store, again["slice"])
    assert np.array_equal(again["same"], first)
    assert np.array_equal(again["slice"], first[1000:2000])


def test_empty_is_writable_then_sealed_without_copy(store):
    arr = store.empty((256, 256), dtype=np.float32)
    assert arr.flags.writeable
    arr[:] = 3.0
    in_use = store.statistics().in_use
    ref = store.put(arr)
    assert store.statistics().in_use - in_use < 64 * 1024
    assert not arr.flags.writeable                 # sealed means sealed
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 1
    got = store.get(ref)
    assert _in_store(store, got) and float(got.sum()) == 3.0 * 256 * 256


def test_zeros_is_zero_even_over_reused_memory(store):
    dirty = store.empty(100_000)
    dirty[:] = 42
    del dirty                                      # aborted: its block is reused
    assert not store.zeros(100_000).any()


def test_empty_array_dropped_unsealed_is_freed(store):
    baseline = store.statistics()
    arr = store.empty((1000, 1000))
    assert store.statistics().live_objects == baseline.live_objects + 1
    del arr
    assert store.statistics().live_objects == baseline.live_objects


def test_empty_refuses_object_dtype_and_negative_shape(store):
    with pytest.raises(TypeError, match="Python objects"):
        store.empty(3, dtype=object)
    with pytest.raises(ValueError, match="negative"):
        store.empty((-1, 2))


def test_received_arrays_refuse_writes_and_writable_gives_a_private_copy():
    with shmpool.ObjectStore(16 * 1024 * 1024, readonly=True) as store:
        _writable_gives_a_private_copy(store)


def _writable_gives_a_private_copy(store):
    got = store.get(store.put({"x": np.arange(1000.0),
                               "df": pd.DataFrame({"a": np.arange(1000.0)})}))
    with pytest.raises(ValueError, match="read-only"):
        got["x"][0] = 5
    with pytest.raises(ValueError):
        got["x"].flags.writeable = True
    mine = shmpool.writable(got)
    mine["x"][0] = 5
    mine["df"].iloc[0, 0] = 9.0
    assert got["x"][0] == 0 and not np.shares_memory(mine["x"], got["x"])
    view = shmpool.writable(store.get(store.put(memoryview(b"abc" * 2000))))
    view[0] = ord("z")
    assert bytes(view[:3]) == b"zbc"
    del got, mine, view


def test_module_level_api_uses_a_default_store():
    arr = shmpool.zeros((4, 4))
    arr[0, 0] = 1
    ref = shmpool.put({"a": arr, "e": shmpool.empty(3, dtype=np.int8)})
    got = shmpool.get(ref)
    assert got["a"][0, 0] == 1 and got["e"].dtype == np.int8
    assert shmpool.statistics().live_objects >= 1
    del got, ref, arr
    shmpool._default_store.default_store().close()   # the leak guard checks this test too
