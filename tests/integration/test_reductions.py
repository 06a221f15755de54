"""Reductions registered with ``multiprocessing.reduction.ForkingPickler``
apply to everything shmpool pickles: the store, the queues, Pool and
executor arguments and results; and what the standard library sends by
descriptor (connections, file descriptors) arrives usable."""

import multiprocessing
import os
import tempfile
from multiprocessing import reduction

import numpy as np
import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

pytestmark = pytest.mark.timeout(DEADLOCK_TIMEOUT * 2)


class Counted:
    """A value whose only way across is the reduction registered below."""

    reductions = 0          # in this process

    def __init__(self, payload) -> None:
        self.payload = payload
        self.via_reducer = False

    def __reduce__(self):
        raise AssertionError("Counted must be pickled by its registered reduction")


def _rebuild_counted(payload) -> Counted:
    value = Counted(payload)
    value.via_reducer = True
    return value


def _reduce_counted(value: Counted):
    Counted.reductions += 1
    return _rebuild_counted, (value.payload,)


# Module level, so that every process that imports this module (spawn and
# forkserver workers unpickling its functions) has the reduction too.
reduction.ForkingPickler.register(Counted, _reduce_counted)


def _echo(value):
    """The value received and whether it came through the reduction."""
    return value.via_reducer, value


def _get(queue):
    """The next item; SimpleQueue.get has no timeout (the test's own bounds it)."""
    if isinstance(queue, shmpool.SimpleQueue):
        return queue.get()
    return queue.get(timeout=DEADLOCK_TIMEOUT)


def _echo_queue(inbox, outbox):
    outbox.put(_echo(_get(inbox)))


def _use_connection(inbox):
    conn = _get(inbox)
    conn.send("through the connection")
    conn.close()


def _read_fd(inbox, outbox):
    fd = _get(inbox).detach()
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        outbox.put(os.read(fd, 100))
    finally:
        os.close(fd)


def _big() -> np.ndarray:
    return np.arange(1 << 18, dtype=np.float64)       # 2 MiB: out of band


# -- the store -----------------------------------------------------------------

def test_store_put_get_uses_the_registered_reduction(store):
    before = Counted.reductions
    value = store.get(store.put(Counted(_big())))
    assert Counted.reductions == before + 1
    assert value.via_reducer
    # The payload still went out of band: a read-only view of the store.
    assert testing.in_any_store(value.payload)
    np.testing.assert_array_equal(value.payload, _big())


def test_store_messages_use_the_registered_reduction(store):
    small, big = store.decode(store.encode(Counted(3))), store.decode(store.encode(Counted(_big())))
    assert small.via_reducer and small.payload == 3
    assert big.via_reducer and testing.in_any_store(big.payload)


def test_reduction_registered_after_the_store_was_made(store):
    class Late:
        pass

    store.put(1)                      # the store has pickled before
    reduction.ForkingPickler.register(Late, lambda late: (int, (7,)))
    try:
        assert store.get(store.put(Late())) == 7
    finally:
        del reduction.ForkingPickler._extra_reducers[Late]


# -- queues, Pool, executor ----------------------------------------------------

@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue", "JoinableQueue"])
def test_queues_use_the_registered_reduction(mp_context, kind):
    inbox, outbox = getattr(shmpool, kind)(ctx=mp_context), getattr(shmpool, kind)(ctx=mp_context)
    child = mp_context.Process(target=_echo_queue, args=(inbox, outbox))
    child.start()
    before = Counted.reductions
    inbox.put(Counted(_big()))
    assert Counted.reductions == before + 1
    seen_by_child, value = _get(outbox)
    child.join(DEADLOCK_TIMEOUT)
    assert child.exitcode == 0
    assert seen_by_child and value.via_reducer
    assert testing.in_any_store(value.payload)      # through the store, zero-copy
    np.testing.assert_array_equal(value.payload, _big())
    inbox.close(), outbox.close()


def test_pool_arguments_and_results_use_the_registered_reduction(mp_context):
    before = Counted.reductions
    with shmpool.Pool(2, context=mp_context) as pool:
        results = pool.map(_echo, [Counted(1), Counted(_big())])
    assert Counted.reductions == before + 2
    assert [seen for seen, _ in results] == [True, True]
    assert all(value.via_reducer for _, value in results)
    np.testing.assert_array_equal(results[1][1].payload, _big())


def test_executor_arguments_and_results_use_the_registered_reduction(mp_context):
    with shmpool.ProcessPoolExecutor(2, mp_context=mp_context) as executor:
        seen, value = executor.submit(_echo, Counted(_big())).result(timeout=DEADLOCK_TIMEOUT)
    assert seen and value.via_reducer
    np.testing.assert_array_equal(value.payload, _big())


# -- descriptors -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue"])
def test_connection_through_a_queue_arrives_usable(mp_context, kind):
    inbox = getattr(shmpool, kind)(ctx=mp_context)
    reader, writer = multiprocessing.Pipe(duplex=False)
    child = mp_context.Process(target=_use_connection, args=(inbox,))
    child.start()
    inbox.put(writer)
    writer.close()
    assert reader.poll(DEADLOCK_TIMEOUT), "the child never wrote to the connection it got"
    assert reader.recv() == "through the connection"
    child.join(DEADLOCK_TIMEOUT)
    assert child.exitcode == 0
    reader.close(), inbox.close()


def test_file_descriptor_through_a_queue_arrives_usable(mp_context):
    inbox, outbox = shmpool.Queue(ctx=mp_context), shmpool.Queue(ctx=mp_context)
    child = mp_context.Process(target=_read_fd, args=(inbox, outbox))
    child.start()
    with tempfile.TemporaryFile() as f:
        f.write(b"read through a passed descriptor")
        f.flush()
        inbox.put(reduction.DupFd(f.fileno()))
        assert outbox.get(timeout=DEADLOCK_TIMEOUT) == b"read through a passed descriptor"
    child.join(DEADLOCK_TIMEOUT)
    assert child.exitcode == 0
    inbox.close(), outbox.close()


def _send_through(conn, text):
    conn.send(text)
    conn.close()
    return True


def test_connection_as_a_pool_argument_arrives_usable(mp_context):
    reader, writer = multiprocessing.Pipe(duplex=False)
    with shmpool.Pool(1, context=mp_context) as pool:
        assert pool.apply(_send_through, (writer, "a task argument"))
    writer.close()
    assert reader.poll(DEADLOCK_TIMEOUT)
    assert reader.recv() == "a task argument"
    reader.close()
