"""Write, release, reuse, read: a freed and reused block never shows a
private page left by an earlier copy-on-write view, here or in a fork child."""

import gc
import multiprocessing
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEADLOCK_TIMEOUT
from shmpool._arena import PAGE_SIZE
from shmpool._store import RawStore

CAPACITY = 4 * 1024 * 1024

s_sizes = st.integers(min_value=PAGE_SIZE, max_value=8 * PAGE_SIZE + 100)
s_step = st.tuples(s_sizes, st.lists(st.integers(0, 10**9), max_size=6), st.booleans())


def _make(store: RawStore, nbytes: int, byte: int):
    builder = store.create(nbytes)
    builder.view[:] = bytes([byte]) * nbytes
    return builder.seal()


def _child_checks(store, conn):
    """Give up the inherited holds, written view included
    (``forget_inherited_holds``), then read whatever the parent allocates next over the same
    memory: it must show the new bytes, not the pages the child inherited."""
    try:
        store.forget_inherited_holds()
        conn.send(True)
        while True:
            job = conn.recv()
            if job is None:
                break
            ref, nbytes, byte = job
            conn.send(store.get(ref).tobytes() == bytes([byte]) * nbytes)
    finally:
        conn.close()
        os._exit(0)


@settings(max_examples=40)
@given(steps=st.lists(s_step, min_size=1, max_size=8))
def test_reused_blocks_never_show_stale_private_pages(steps):
    ctx = multiprocessing.get_context("fork")
    with RawStore(CAPACITY, space_timeout=0.1) as store:
        children = []
        for i, (nbytes, writes, fork) in enumerate(steps):
            byte = i % 250 + 1
            ref = _make(store, nbytes, byte)
            view = store.get(ref)
            for w in writes:
                view[w % nbytes] = 0                    # private pages, this process
            assert store.get(ref).tobytes() == bytes([byte]) * nbytes   # a later get
            if fork:
                here, there = ctx.Pipe()
                child = ctx.Process(target=_child_checks, args=(store, there))
                child.start()                           # inherits the written view
                there.close()
                assert here.poll(DEADLOCK_TIMEOUT) and here.recv()
                children.append((child, here))
            del view, ref                               # freed here, reused next
            gc.collect()
            again = _make(store, nbytes, byte + 1)
            assert store.get(again).tobytes() == bytes([byte + 1]) * nbytes
            for _, conn in children:
                conn.send((again, nbytes, byte + 1))
                assert conn.poll(DEADLOCK_TIMEOUT) and conn.recv(), "stale page in a child"
            del again
            gc.collect()
        for child, conn in children:
            conn.send(None)
            child.join(DEADLOCK_TIMEOUT)
            conn.close()
            assert child.exitcode == 0
