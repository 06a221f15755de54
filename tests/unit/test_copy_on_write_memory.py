"""What copy-on-write views cost in private memory: nothing for a reader,
about one page per page written for a writer."""

import gc

import numpy as np

import shmpool
from shmpool import testing
from shmpool._arena import PAGE_SIZE, written_pages

MiB = 1024 * 1024


def test_reader_grows_no_private_memory_and_writer_about_k_pages():
    nbytes = 64 * MiB
    with shmpool.ObjectStore(nbytes + 16 * MiB) as store:
        ref = store.put(np.ones(nbytes // 8))
        gc.collect()
        before = testing.private_bytes()
        got = store.get(ref)
        assert float(got.sum()) == nbytes // 8            # every page read
        address = got.__array_interface__["data"][0]
        read_growth = testing.private_bytes() - before
        assert read_growth < 0.05 * nbytes, f"a reader grew by {read_growth} bytes"
        assert written_pages(address, nbytes) == 0
        k = 100
        before = testing.private_bytes()
        got[:: PAGE_SIZE // 8][:k] = 2.0                  # one write in each of k pages
        write_growth = testing.private_bytes() - before
        assert written_pages(address, nbytes) == k
        assert k * PAGE_SIZE <= write_growth < k * PAGE_SIZE + 2 * MiB, write_growth
        assert float(store.get(ref).sum()) == nbytes // 8   # the object is unchanged
        del got
        gc.collect()
